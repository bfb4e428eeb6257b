"""Each pretraining loss against an independent reference computed by hand (explicit loops in
float64), on random inputs, within 1e-6."""

from __future__ import annotations

import math

import pytest
import torch

from raypipe.objectives.lm import bert_mask
from raypipe.objectives.losses import (
    IGNORE,
    clip_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    masked_patch_mse,
    nt_xent,
    skipgram_loss,
    token_cross_entropy,
)
from raypipe.vocab import MASK_ID, NUM_SPECIAL

TOL = 1e-6


def _log_softmax_at(row: list[float], index: int) -> float:
    m = max(row)
    return row[index] - m - math.log(sum(math.exp(v - m) for v in row))


def test_token_cross_entropy_ignores_unmasked_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    targets = torch.randint(0, 11, (3, 5), generator=g)
    targets[0, :3] = IGNORE
    targets[2, 4] = IGNORE
    total, count = 0.0, 0
    for b in range(3):
        for t in range(5):
            if targets[b, t] != IGNORE:
                total -= _log_softmax_at(logits[b, t].double().tolist(), int(targets[b, t]))
                count += 1
    assert abs(float(token_cross_entropy(logits, targets)) - total / count) < TOL


def test_bert_mask_proportions_and_specials():
    torch.manual_seed(0)
    ids = torch.randint(NUM_SPECIAL, 1000, (64, 512))
    ids[:, 0] = 1  # <bos> and <eos> are never chosen
    ids[:, -1] = 2
    inputs, targets = bert_mask(ids, mask_prob=0.15, vocab_size=1000)
    chosen = targets != IGNORE
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    assert torch.equal(targets[chosen], ids[chosen])  # targets are the original tokens
    assert torch.equal(inputs[~chosen], ids[~chosen])  # nothing else changes
    share = chosen.float().mean().item()
    assert abs(share - 0.15 * 510 / 512) < 0.005
    n = chosen.sum().item()
    masked = (inputs[chosen] == MASK_ID).sum().item() / n
    kept = (inputs[chosen] == ids[chosen]).sum().item() / n
    assert abs(masked - 0.8) < 0.01
    assert abs(kept - 0.1) < 0.01  # (a random draw equal to the original is ~0.1 % more)
    assert (inputs[chosen] >= NUM_SPECIAL).logical_or(inputs[chosen] == MASK_ID).all()


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_matches_loop_over_pairs(temperature):
    g = torch.Generator().manual_seed(1)
    n, d = 6, 8
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    views = [v / v.norm() for v in torch.cat([z1, z2]).double()]
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        sims = [float(views[i] @ views[k]) / temperature for k in range(2 * n)]
        num = math.exp(sims[positive])
        den = sum(math.exp(sims[k]) for k in range(2 * n) if k != i)
        total += -math.log(num / den)
    assert abs(float(nt_xent(z1, z2, temperature)) - total / (2 * n)) < TOL


def test_skipgram_loss_matches_the_formula_pair_by_pair():
    g = torch.Generator().manual_seed(2)
    n, k, d = 5, 3, 4
    centres, contexts = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    negatives = torch.randn(n, k, d, generator=g)

    def log_sigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x))

    total = 0.0
    for i in range(n):
        c = centres[i].double()
        total -= log_sigmoid(float(c @ contexts[i].double()))
        total -= sum(log_sigmoid(-float(c @ negatives[i, j].double())) for j in range(k))
    assert abs(float(skipgram_loss(centres, contexts, negatives)) - total / n) < TOL
    empty = skipgram_loss(torch.zeros(0, d), torch.zeros(0, d), torch.zeros(0, k, d))
    assert float(empty) == 0.0


def test_skipgram_pairs_stay_within_a_document_and_skip_special_tokens():
    from raypipe.objectives.skipgram import context_pairs
    from raypipe.vocab import BOS_ID, EOS_ID

    ids = torch.tensor([[BOS_ID, 10, 11, EOS_ID, 12, 13, 14]])
    centre, context = context_pairs(ids, window=2)
    pairs = sorted(zip(centre.tolist(), context.tolist(), strict=True))
    # Document 1 is positions 1-2, document 2 is 4-6; <bos> and <eos> pair with nothing.
    want = [(1, 2), (2, 1), (4, 5), (4, 6), (5, 4), (5, 6), (6, 4), (6, 5)]
    assert pairs == want


def test_skipgram_noise_and_subsampling_follow_word2vec_formulas():
    from raypipe.objectives.skipgram import keep_probability, noise_weights

    counts = torch.zeros(NUM_SPECIAL + 4, dtype=torch.float64)
    counts[NUM_SPECIAL:] = torch.tensor([1000.0, 100.0, 10.0, 0.0])
    total_real = [c + 1.0 for c in (1000.0, 100.0, 10.0, 0.0)]
    want = [0.0] * NUM_SPECIAL + [c**0.75 for c in total_real]
    assert noise_weights(counts, 0.75).tolist() == pytest.approx(want)
    assert noise_weights(counts, 0.0).tolist() == [0.0] * NUM_SPECIAL + [1.0] * 4
    # word2vec: keep with probability sqrt(t / f), at most 1; f = count / all counts.
    t, n = 1e-2, 1110.0
    expected = [min(1.0, math.sqrt(t / (c / n))) if c else 1.0 for c in counts.tolist()]
    assert keep_probability(counts, t).tolist() == pytest.approx(expected, rel=1e-6)
    assert keep_probability(torch.zeros(6), t).tolist() == [1.0] * 6


def test_skipgram_draws_negatives_by_frequency_and_counts_only_training_batches():
    import tiny

    torch.manual_seed(0)
    objective = tiny.build("skipgram")
    objective.negative_power, objective.subsample = 0.75, 0.0
    ids = torch.full((4, 12), NUM_SPECIAL + 1)
    ids[:, ::4] = NUM_SPECIAL + 2  # token a: 36 of 48, token b: 12 of 48
    objective.eval()
    objective({"input_ids": ids})
    assert float(objective.counts.sum()) == 0.0  # held-out batches do not count
    objective.train()
    objective({"input_ids": ids})
    assert objective.counts[NUM_SPECIAL + 1] == 36 and objective.counts[NUM_SPECIAL + 2] == 12
    drawn = objective._noise(20_000, ids.device).flatten()
    assert int((drawn < NUM_SPECIAL).sum()) == 0
    weights = [0.0 if i < NUM_SPECIAL else (float(c) + 1) ** 0.75
               for i, c in enumerate(objective.counts.tolist())]  # fmt: skip
    share = weights[NUM_SPECIAL + 1] / sum(weights)
    seen = float((drawn == NUM_SPECIAL + 1).double().mean())
    assert abs(seen - share) < 0.01, (seen, share)


def test_skipgram_subsampling_drops_frequent_tokens_from_the_pairs():
    from raypipe.objectives.skipgram import context_pairs

    ids = torch.arange(NUM_SPECIAL, NUM_SPECIAL + 6).view(1, 6)
    keep = torch.tensor([[True, False, True, True, True, True]])
    centre, context = context_pairs(ids, window=1, keep=keep)
    pairs = sorted(zip(centre.tolist(), context.tolist(), strict=True))
    assert pairs == [(2, 3), (3, 2), (3, 4), (4, 3), (4, 5), (5, 4)]


def test_clip_loss_matches_loop_both_directions():
    g = torch.Generator().manual_seed(2)
    n, d = 5, 7
    img, txt = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    scale = torch.tensor(math.log(1 / 0.07))
    a = [v / v.norm() for v in img.double()]
    b = [v / v.norm() for v in txt.double()]
    s = math.exp(float(scale))
    i2t = -sum(_log_softmax_at([s * float(a[i] @ b[j]) for j in range(n)], i) for i in range(n))
    t2i = -sum(_log_softmax_at([s * float(a[i] @ b[j]) for i in range(n)], j) for j in range(n))
    expected = (i2t / n + t2i / n) / 2
    assert abs(float(clip_loss(img, txt, scale)) - expected) < TOL


@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_patch_mse_counts_only_masked_patches(norm_pix):
    g = torch.Generator().manual_seed(3)
    b, n, p = 2, 6, 12
    pred, target = torch.randn(b, n, p, generator=g), torch.randn(b, n, p, generator=g)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 0, 1, 0, 1, 1]], dtype=torch.float32)
    total, count = 0.0, 0
    for i in range(b):
        for j in range(n):
            if not mask[i, j]:
                continue
            t = target[i, j].double().tolist()
            if norm_pix:
                mean = sum(t) / p
                var = sum((v - mean) ** 2 for v in t) / (p - 1)  # unbiased, as MAE
                t = [(v - mean) / math.sqrt(var + 1e-6) for v in t]
            q = pred[i, j].double().tolist()
            total += sum((q[k] - t[k]) ** 2 for k in range(p)) / p
            count += 1
    got = float(masked_patch_mse(pred, target, mask, norm_pix=norm_pix))
    assert abs(got - total / count) < TOL


def test_gan_losses_match_the_formulas():
    g = torch.Generator().manual_seed(4)
    real, fake = torch.randn(9, generator=g) * 3, torch.randn(9, generator=g) * 3

    def d(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    d_expected = (
        sum(
            -(math.log(d(r)) + math.log(1 - d(f)))
            for r, f in zip(real.double().tolist(), fake.double().tolist(), strict=True)
        )
        / 9
    )
    g_expected = sum(-math.log(d(f)) for f in fake.double().tolist()) / 9
    assert abs(float(gan_discriminator_loss(real, fake)) - d_expected) < TOL
    assert abs(float(gan_generator_loss(fake)) - g_expected) < TOL
