"""Fine-tuning tasks: classification (accuracy, macro-F1) on text and images, regression,
translation (target-only loss, batched greedy decoding, BLEU from summed counts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sacrebleu.metrics import BLEU

from raypipe.data.text import encode_translation, train_tokenizer
from raypipe.engine.step import evaluate
from raypipe.models import build_model
from raypipe.tasks import build_task
from raypipe.tasks.classification import Classification
from raypipe.tasks.regression import Regression

CPU = torch.device("cpu")


def text_model(causal=False, vocab=60):
    torch.manual_seed(0)
    config = {"vocab_size": vocab, "dim": 32, "num_layers": 2, "num_heads": 4, "max_len": 32,
              "causal": causal}  # fmt: skip
    return build_model({"type": "transformer", "config": config})


def test_macro_f1_from_summed_counts_matches_a_direct_computation():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0])
    preds = torch.tensor([0, 1, 1, 1, 2, 0, 2, 2])
    c = 3
    stats = {
        "loss_sum": torch.tensor(1.0),
        "correct": (preds == labels).sum().float(),
        "count": torch.tensor(8.0),
        "true_pos": torch.stack([((preds == k) & (labels == k)).sum() for k in range(c)]).float(),
        "pred_pos": torch.stack([(preds == k).sum() for k in range(c)]).float(),
        "label_pos": torch.stack([(labels == k).sum() for k in range(c)]).float(),
    }
    f1s = []
    for k in range(c):
        tp = int(((preds == k) & (labels == k)).sum())
        fp = int(((preds == k) & (labels != k)).sum())
        fn = int(((preds != k) & (labels == k)).sum())
        precision, recall = tp / (tp + fp), tp / (tp + fn)
        f1s.append(2 * precision * recall / (precision + recall))
    out = Classification.summarize(stats)
    assert out["macro_f1"] == pytest.approx(sum(f1s) / c)
    assert out["accuracy"] == pytest.approx(5 / 8)


def test_classification_stats_add_up_over_batches():
    task = build_task("classification", text_model(), {"num_classes": 3}).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (12, 10), generator=g)
    labels = torch.randint(0, 3, (12,), generator=g)
    whole = evaluate(task, [{"input_ids": ids, "label": labels}], device=CPU)
    parts = evaluate(
        task,
        [{"input_ids": ids[i : i + 4], "label": labels[i : i + 4]} for i in (0, 4, 8)],
        device=CPU,
    )
    for k in whole:
        assert torch.allclose(whole[k], parts[k], atol=1e-4)
    with torch.no_grad():
        pred = task.predict(ids).argmax(-1)
    assert Classification.summarize(whole)["accuracy"] == pytest.approx(
        float((pred == labels).float().mean())
    )


def test_image_classification_reads_the_image_column():
    torch.manual_seed(0)
    cnn = build_model({"type": "cnn", "config": {"dim": 16, "num_layers": 2, "image_size": 16}})
    task = build_task("classification", cnn, {"num_classes": 4, "input": "image"})
    images = torch.randint(0, 255, (5, 3, 16, 16), dtype=torch.uint8)
    loss, stats = task({"image": images, "label": torch.tensor([0, 1, 2, 3, 0])})
    assert loss.requires_grad and stats["count"] == 5
    assert task.serving_spec()["input"] == ("image", np.dtype(np.uint8), (-1, 3, 16, 16))
    with pytest.raises(ValueError, match="reads"):
        build_task("classification", cnn, {"num_classes": 4, "input": "text"})


def test_regression_reports_mse_and_mae():
    task = Regression(text_model()).eval()
    ids = torch.randint(5, 60, (6, 8))
    target = torch.linspace(-1, 1, 6)
    _, stats = task({"input_ids": ids, "label": target})
    with torch.no_grad():
        err = task.predict(ids) - target
    out = Regression.summarize(stats)
    assert out["mse"] == pytest.approx(float((err**2).mean()), rel=1e-5)
    assert out["mae"] == pytest.approx(float(err.abs().mean()), rel=1e-5)


@pytest.fixture(scope="module")
def pairs():
    texts = ["the red cat sees a dog", "a small dog likes the house", "le chat rouge voit un chien"]
    tok = train_tokenizer(texts * 20, vocab_size=300)
    batch = {
        "text": np.array(["the red cat", "a small dog likes the house", "the dog"], dtype=object),
        "target": np.array(["le chat rouge", "un petit chien", "le chien voit"], dtype=object),
    }
    enc = encode_translation(
        batch, tokenizer_json=tok.to_str(), text_column="text", target_column="target", max_len=32
    )
    return tok, {k: torch.as_tensor(v) for k, v in enc.items()}


def test_translation_loss_counts_target_tokens_only(pairs):
    tok, batch = pairs
    task = build_task("translation", text_model(True, 300), {}, tokenizer_json=tok.to_str())
    _, stats = task.train()(batch)
    target_tokens = sum(len(tok.encode(t).ids) + 1 for t in ["le chat rouge", "un petit chien",
                                                               "le chien voit"])  # fmt: skip
    assert float(stats["count"]) == target_tokens  # each target's tokens and its <eos>


def test_batched_greedy_decoding_equals_one_row_at_a_time(pairs):
    tok, batch = pairs
    task = build_task(
        "translation", text_model(True, 300), {"max_new_tokens": 6}, tokenizer_json=tok.to_str()
    ).eval()
    together = task.translate(batch["input_ids"], batch["target_start"])
    alone = [
        task.translate(batch["input_ids"][i : i + 1], batch["target_start"][i : i + 1])[0]
        for i in range(3)
    ]
    assert together == alone and all(len(t) <= 6 for t in together)


def test_bleu_from_summed_counts_equals_corpus_bleu(pairs):
    tok, batch = pairs
    task = build_task("translation", text_model(True, 300), {}, tokenizer_json=tok.to_str())
    hyps = ["le chat rouge", "un chien", "le chien voit bien"]
    refs = ["le chat rouge", "un petit chien", "le chien voit"]
    parts = [BLEU().corpus_score(hyps[i : i + 1], [refs[i : i + 1]]) for i in range(3)]
    stats = {
        "loss_sum": torch.tensor(1.0),
        "count": torch.tensor(1.0),
        "bleu_correct": torch.tensor([sum(p.counts[n] for p in parts) for n in range(4)]).double(),
        "bleu_total": torch.tensor([sum(p.totals[n] for p in parts) for n in range(4)]).double(),
        "bleu_sys_len": torch.tensor(float(sum(p.sys_len for p in parts))),
        "bleu_ref_len": torch.tensor(float(sum(p.ref_len for p in parts))),
    }
    expected = BLEU().corpus_score(hyps, [refs]).score
    assert task.summarize(stats)["bleu"] == pytest.approx(expected)
    assert expected > 0
