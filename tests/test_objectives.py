"""Every registered objective, driven by the registry: it trains, a seeded run is pinned, and the
contrastive losses on 2 workers equal the 1-worker loss on the same global batch."""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import tiny
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raypipe import registry
from raypipe.objectives.losses import clip_loss, gather_with_grad, nt_xent

OBJECTIVES = sorted(registry.OBJECTIVES)


def _steps(name: str, num_steps: int, lr: float) -> list[float]:
    objective = tiny.build(name, seed=0)
    batch = tiny.batch(name)
    torch.manual_seed(123)
    lr = tiny.LR.get(name, lr)
    optimizers = [torch.optim.AdamW(p, lr=lr) for p in objective.param_groups()]
    losses = []
    for _ in range(num_steps):
        if objective.owns_step:
            loss, stats = objective.step(
                objective, optimizers, [batch], grad_clip=1.0, autocast=contextlib.nullcontext
            )
            # A GAN's losses fight each other: the discriminator's is the one that must fall.
            losses.append(float(stats["discriminator_loss"]) if num_steps > 3 else float(loss))
        else:
            loss, _ = objective(batch)
            optimizers[0].zero_grad()
            loss.backward()
            optimizers[0].step()
            losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("name", OBJECTIVES)
def test_seeded_tiny_run_lowers_the_loss(name):
    losses = _steps(name, 25, lr=2e-3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses


#: The first three losses of each seeded tiny run (tests/tiny.py), CPU float32, torch 2.13.
GOLDEN = {
    "causal_lm": [3.703007, 3.62738, 3.56762],
    "masked_lm": [3.7269, 3.652751, 3.651074],
    "masked_image": [1.372627, 1.176208, 1.096895],
    "simclr": [2.697137, 2.665259, 2.615702],
    "clip": [2.988247, 2.239878, 2.039502],
    "captioning": [3.685628, 3.610132, 3.552942],
    "gan": [0.649329, 0.704852, 0.757287],
    "skipgram": [2.772589, 2.77176, 2.764929],  # (1 + 3 negatives) log 2 at the start
}


def test_golden_losses_cover_every_objective():
    assert set(GOLDEN) == set(registry.OBJECTIVES)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_golden_first_losses(name):
    # Any change to init, masking, augmentation order or the losses moves these numbers.
    assert _steps(name, 3, lr=1e-3) == pytest.approx(GOLDEN[name], abs=2e-4)


def test_masked_image_hides_the_configured_share():
    objective = tiny.build("masked_image")
    seen = {}
    encode = objective.model.encode

    def spy(tokens):
        seen["visible"] = tokens.shape[1]
        return encode(tokens)

    objective.model.encode = spy
    objective(tiny.batch("masked_image"))
    assert seen["visible"] == int(objective.model.num_patches * 0.25)


def test_gan_updates_each_network_in_its_own_phase():
    objective = tiny.build("gan")
    gen0 = [p.detach().clone() for p in objective.generator.parameters()]
    disc0 = [p.detach().clone() for p in objective.model.parameters()]
    optimizers = [torch.optim.SGD(p, lr=0.1) for p in objective.param_groups()]
    loss, stats = objective.step(
        objective, optimizers, [tiny.batch("gan")], grad_clip=None, autocast=contextlib.nullcontext
    )
    assert set(stats) >= {"discriminator_loss", "generator_loss", "d_real", "d_fake"}
    changed = lambda new, old: any(not torch.equal(a, b) for a, b in zip(new, old, strict=True))  # noqa: E731
    assert changed(list(objective.generator.parameters()), gen0)
    assert changed(list(objective.model.parameters()), disc0)


def test_captioner_generates_captions():
    objective = tiny.build("captioning").eval()
    captions = objective.model.generate(tiny.batch("captioning")["image"][:3], max_new_tokens=5)
    assert len(captions) == 3 and all(len(c) <= 5 for c in captions)
    assert all(isinstance(t, int) for c in captions for t in c)


# --- 2 workers vs 1 worker -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data: dict, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        per = data["a"].shape[0] // world
        part = {k: data[k][rank * per : (rank + 1) * per].clone().requires_grad_() for k in "ab"}
        a, b = gather_with_grad(part["a"]), gather_with_grad(part["b"])
        for name, loss in (("nt_xent", nt_xent(a, b, 0.2)), ("clip", clip_loss(a, b, data["s"]))):
            grads = torch.autograd.grad(loss, [part["a"], part["b"]])
            # DDP averages gradients over ranks; the gather's backward summed them first.
            out[f"{name}-{rank}"] = (float(loss), [g / world for g in grads])
    finally:
        dist.destroy_process_group()


def test_contrastive_losses_on_two_workers_equal_one_worker_on_the_global_batch():
    g = torch.Generator().manual_seed(5)
    data = {"a": torch.randn(8, 6, generator=g), "b": torch.randn(8, 6, generator=g)}
    scale = torch.tensor(2.0)
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), {**data, "s": scale}, out), nprocs=2, join=True)
    a, b = data["a"].clone().requires_grad_(), data["b"].clone().requires_grad_()
    for name, loss in (("nt_xent", nt_xent(a, b, 0.2)), ("clip", clip_loss(a, b, scale))):
        ga, gb = torch.autograd.grad(loss, [a, b])
        for rank in range(2):
            got_loss, (ra, rb) = out[f"{name}-{rank}"]
            assert abs(got_loss - float(loss)) < 1e-6
            rows = slice(rank * 4, (rank + 1) * 4)
            assert torch.allclose(ra, ga[rows], atol=1e-6)
            assert torch.allclose(rb, gb[rows], atol=1e-6)


def test_a_tiny_masked_lm_learns_context_beyond_unigram():
    """On text with structure (each row counts on from a random start in steps of 1-3), a
    masked token follows from its neighbours: a masked LM must fall well below the unigram
    loss, log(n) for these uniformly drawn tokens, within a few hundred steps on fresh rows.
    (A loss stuck at unigram level is a model that ignores context.)"""
    import math

    from raypipe.models import build_model
    from raypipe.objectives.lm import MaskedLM
    from raypipe.vocab import NUM_SPECIAL

    vocab, length, rows = 64, 32, 32
    n = vocab - NUM_SPECIAL
    torch.manual_seed(0)
    spec = {"type": "transformer", "config": {"vocab_size": vocab, "dim": 64, "num_layers": 2,
            "num_heads": 4, "max_len": length, "pad_id": 0, "causal": False}}  # fmt: skip
    objective = MaskedLM(build_model(spec))
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(250):
        start = torch.randint(0, n, (rows, 1), generator=gen)
        stride = torch.randint(1, 4, (rows, 1), generator=gen)
        ids = NUM_SPECIAL + (start + torch.arange(length)[None] * stride) % n
        loss, _ = objective({"input_ids": ids})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    unigram = math.log(n)
    assert sum(losses[:10]) / 10 > 0.9 * unigram  # it starts at unigram level
    assert sum(losses[-25:]) / 25 < 0.6 * unigram, losses[-25:]
