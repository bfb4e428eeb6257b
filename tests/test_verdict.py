"""The verdict: a test split that only reports, the best epoch kept and registered, and a
classical baseline on the same rows, through real Ray, MLflow and Parquet."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raypipe.config import parse_config
from raypipe.data.synthetic import generate_quickstart
from raypipe.data.text import encode_labeled
from raypipe.engine.checkpoint import load_task, read_meta, read_tokenizer
from raypipe.pipeline import run_pipeline
from raypipe.summary import format_summary

pytestmark = pytest.mark.slow


def _table(directory: str) -> tuple[list[str], np.ndarray]:
    table = pq.read_table(directory)
    return table.column("text").to_pylist(), np.array(table.column("label").to_pylist())


def _raw(quickstart_data: dict, other: dict, storage) -> dict:
    """A fine-tune-only pipeline from scratch with a test split."""
    raw = {
        "name": "verdict",
        "storage": str(storage),
        "seed": 3,
        "data": {
            "labeled": {
                "train": {"path": quickstart_data["train"]},
                "validation": {"path": quickstart_data["validation"]},
                "test": {"path": other["test"]},
            }
        },
        "tokenizer": {"vocab_size": 300},
        "model": {"dim": 32, "layers": 1, "heads": 2, "max_len": 32},
        "finetune": {
            "init": "scratch", "epochs": 6, "batch_size": 16,
            "optimizer": {"lr": 3e-3},
            "sweep": {"num_samples": 1, "scheduler": "fifo"},
        },
    }  # fmt: skip
    return raw


@pytest.fixture(scope="module")
def verdict(ray_session, quickstart_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("verdict")
    other = {k: str(root / k) for k in ("unlabeled", "train", "test")}
    generate_quickstart(unlabeled_dir=other["unlabeled"], train_dir=other["train"],
                        validation_dir=other["test"], num_unlabeled=300, num_train=8,
                        num_validation=48, seed=7)  # fmt: skip
    raw = _raw(quickstart_data, other, root / "runs")
    cfg = parse_config(raw)
    return cfg, run_pipeline(cfg), other


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_the_registered_checkpoint_is_the_best_epoch_not_the_last(verdict):
    cfg, summary, _ = verdict
    client = _client(summary.tracking_uri)
    version = client.get_model_version("verdict", summary.model["version"])
    checkpoint = version.tags["raypipe.checkpoint"]
    exp = client.get_run(summary.run_id).info.experiment_id
    (trial,) = client.search_runs([exp], filter_string="tags.`raypipe.kind` = 'trial'")
    history = [m.value for m in sorted(client.get_metric_history(trial.info.run_id,
                                                                 "val/accuracy"),
                                       key=lambda m: m.step)]  # fmt: skip
    best_epoch = int(np.argmax(history)) + 1  # the first of equal bests, as the loop keeps it
    assert len(history) == 6 and best_epoch < 6, history  # this seeded run peaks early
    assert read_meta(checkpoint)["epoch"] == best_epoch
    assert summary.arms["scratch"]["best_epoch"] == best_epoch
    assert version.tags["raypipe.best_epoch"] == str(best_epoch)
    assert f"epoch {best_epoch}" in format_summary(summary)


def test_test_metrics_equal_an_independent_evaluation_of_the_registered_model(verdict):
    cfg, summary, other = verdict
    client = _client(summary.tracking_uri)
    version = client.get_model_version("verdict", summary.model["version"])
    checkpoint = version.tags["raypipe.checkpoint"]
    texts, labels = _table(other["test"])
    encoded = encode_labeled(
        {"text": np.array(texts, dtype=object), "label": labels},
        tokenizer_json=read_tokenizer(checkpoint), text_column="text", label_column="label",
        max_len=cfg.finetune.max_len,
    )  # fmt: skip
    task = load_task(checkpoint).eval()
    with torch.no_grad():
        predicted = task.predict(torch.as_tensor(encoded["input_ids"]).long()).argmax(-1)
    accuracy = float((predicted.numpy() == labels).mean())
    reported = summary.arms["scratch"]["test_metrics"]["test/accuracy"]
    assert reported == pytest.approx(accuracy, abs=1e-9)
    assert float(version.tags["raypipe.test/accuracy"]) == pytest.approx(accuracy, abs=1e-9)
    exp = client.get_run(summary.run_id).info.experiment_id
    (trial,) = client.search_runs([exp], filter_string="tags.`raypipe.kind` = 'trial'")
    assert trial.data.metrics["test/accuracy"] == pytest.approx(accuracy, abs=1e-9)
    text = format_summary(summary)
    assert "test/accuracy of those checkpoints" in text and "test " in text


def test_the_baseline_equals_scikit_learns_own_on_the_same_rows(verdict, quickstart_data):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    cfg, summary, other = verdict
    train_x, train_y = _table(quickstart_data["train"])
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    model = LogisticRegression(max_iter=2000, random_state=cfg.seed)
    model.fit(vectorizer.fit_transform(train_x), train_y)
    baseline = summary.arms["baseline"]
    for split, directory in (("val", quickstart_data["validation"]), ("test", other["test"])):
        x, y = _table(directory)
        accuracy = float((model.predict(vectorizer.transform(x)) == y).mean())
        got = (
            baseline["best_metric"] if split == "val" else baseline["test_metrics"]["test/accuracy"]
        )
        assert got == pytest.approx(accuracy, abs=1e-9), split
    # Chance beside it: always the most common training class, on the test split.
    counts = Counter(train_y.tolist())
    common = min(y for y, n in counts.items() if n == max(counts.values()))  # lowest on a tie
    test_y = _table(other["test"])[1]
    assert baseline["majority"] == pytest.approx(float(np.mean(test_y == common)), abs=1e-12)
    assert baseline["num_train_rows"] == len(train_y) and baseline["best_checkpoint"] is None
    client = _client(summary.tracking_uri)
    exp = client.get_run(summary.run_id).info.experiment_id
    (run,) = client.search_runs([exp], filter_string="tags.`raypipe.kind` = 'baseline'")
    assert run.data.metrics["val/accuracy"] == pytest.approx(baseline["best_metric"])
    assert "vs linear" in format_summary(summary)


def test_a_test_split_shows_in_the_stage_inputs(verdict):
    cfg, summary, other = verdict
    client = _client(summary.tracking_uri)
    exp = client.get_run(summary.run_id).info.experiment_id
    (stage,) = client.search_runs([exp], filter_string="tags.`raypipe.stage` = 'finetune'")
    contexts = {
        tag.value
        for d in stage.inputs.dataset_inputs
        for tag in d.tags
        if tag.key == "mlflow.data.context"
    }
    assert contexts == {"train", "validation", "test"}
    assert Path(other["test"]).is_dir()


def test_repeats_give_each_arm_paired_seeds_an_interval_and_a_median_seed_model(
    ray_session, quickstart_data, verdict, tmp_path
):
    from scipy import stats as scipy_stats
    from test_pipeline_e2e import tiny_config

    from raypipe.stages.counts import repeat_seeds

    _, _, other = verdict
    raw = tiny_config(quickstart_data, tmp_path, name="repeats")
    raw["pretrain"].update(max_steps=10, log_every=5, checkpoint_every=10)
    raw["data"]["labeled"]["test"] = {"path": other["test"]}
    raw["finetune"].update(epochs=2, repeats=3, baseline="none")
    raw["finetune"]["sweep"].update(num_samples=1, scheduler="fifo")
    cfg = parse_config(raw)
    summary = run_pipeline(cfg)
    seeds = repeat_seeds(cfg.seed, cfg.finetune)
    assert seeds == [cfg.seed, cfg.seed + 1000, cfg.seed + 2000]  # one setting: the trial is #1
    test = {}
    for arm in ("pretrained", "scratch"):
        repeats = summary.arms[arm]["repeats"]
        assert [r["seed"] for r in repeats] == seeds  # the same seeds: paired
        assert all(r["checkpoint"] and r["test_metrics"] for r in repeats)
        names = [f"{arm}-00000"] + [f"{arm}-seed{s}" for s in seeds[1:]]
        assert [read_meta(r["checkpoint"])["trial"] for r in repeats] == names
        test[arm] = [r["test_metrics"]["test/accuracy"] for r in repeats]
    ref = scipy_stats.ttest_rel(test["pretrained"], test["scratch"]).confidence_interval(0.95)
    text = format_summary(summary)
    assert f"[{ref.low:+.4f}, {ref.high:+.4f}: 95% paired t over 3 seeds" in text, text
    assert " ± " in text

    client = _client(summary.tracking_uri)
    exp = client.get_run(summary.run_id).info.experiment_id
    runs = client.search_runs([exp], filter_string="tags.`raypipe.kind` = 'repeat'")
    assert sorted(r.info.run_name for r in runs) == sorted(
        f"{arm}-seed{s}" for arm in ("pretrained", "scratch") for s in seeds[1:]
    )
    every = client.search_runs([exp])
    seeded = sorted((r.info.run_name, r.data.tags["raypipe.seed"]) for r in every
                    if "raypipe.seed" in r.data.tags)  # fmt: skip
    expected = [(f"{arm}-00000", str(seeds[0])) for arm in ("pretrained", "scratch")]
    expected += [(f"{arm}-seed{s}", str(s)) for arm in ("pretrained", "scratch") for s in seeds[1:]]
    assert seeded == sorted(expected)  # every repeat's run is tagged with its seed
    # The registered model: the better arm (mean validation metric), its median-seed run.
    version = client.get_model_version("repeats", summary.model["version"])
    best = summary.arms[version.tags["raypipe.arm"]]
    ranked = sorted(best["repeats"], key=lambda r: r["metric"])
    assert version.tags["raypipe.checkpoint"] == ranked[1]["checkpoint"]
    assert version.tags["raypipe.seed"] == str(ranked[1]["seed"])


def _pretrain_val_loss(summary) -> dict[int, float]:
    """The pretrain run's held-out val/loss by step."""
    client = _client(summary.tracking_uri)
    exp = client.get_run(summary.run_id).info.experiment_id
    (pre,) = client.search_runs([exp], filter_string="tags.`raypipe.stage` = 'pretrain'")
    return {m.step: m.value for m in client.get_metric_history(pre.info.run_id, "val/loss")}


def test_pretraining_is_scored_on_held_out_rows_and_the_best_checkpoint_is_kept(
    ray_session, quickstart_data, verdict, tmp_path
):
    from test_pipeline_e2e import tiny_config

    _, _, other = verdict
    raw = tiny_config(quickstart_data, tmp_path, name="heldout")
    raw["data"]["unlabeled_validation"] = {"path": other["unlabeled"]}
    raw["pretrain"].update(max_steps=30, log_every=10, checkpoint_every=10, eval_every=10,
                           keep="best", optimizer={"lr": 3e-2, "warmup_steps": 2})  # fmt: skip
    raw["finetune"].update(epochs=1, compare_scratch=False, baseline="none")
    raw["finetune"]["sweep"] = {"num_samples": 1, "scheduler": "fifo"}
    summary = run_pipeline(parse_config(raw))
    held_out = _pretrain_val_loss(summary)
    assert sorted(held_out) == [10, 20, 30]
    best = min(held_out, key=held_out.get)
    stage = summary.stages[0].metrics
    assert stage["kept step"] == best and stage["best val/loss"] == round(held_out[best], 4)
    client = _client(summary.tracking_uri)
    exp = client.get_run(summary.run_id).info.experiment_id
    (trial,) = client.search_runs([exp], filter_string="tags.`raypipe.kind` = 'trial'")
    assert trial.data.tags["raypipe.pretrain_step"] == str(best)  # lineage names the kept step
    assert read_meta(trial.data.tags["raypipe.init_checkpoint"])["step"] == best


def test_resampled_labels_give_each_repeat_seed_its_own_rows(
    ray_session, quickstart_data, verdict, tmp_path
):
    _, _, other = verdict
    raw = {**_raw(quickstart_data, other, tmp_path), "name": "resample"}
    raw["finetune"].update(epochs=1, label_fractions=[0.5], repeats=2, resample_labels=True,
                           baseline="none")  # fmt: skip
    summary = run_pipeline(parse_config(raw))
    repeats = summary.arms["scratch_0.5"]["repeats"]
    assert len(repeats) == 2
    # The one-setting sweep's trial is the first repeat, on the pipeline seed's rows; the
    # other seed draws its own.
    assert [r["seed"] for r in repeats] == [3, 1003]
    folders = ["labels-0.5", "labels-0.5-seed1003"]
    subsets = []
    for r, folder in zip(repeats, folders, strict=True):
        assert f"/{folder}/" in r["checkpoint"]
        (shard,) = (tmp_path / "resample").glob(f"finetune-*/{folder}/*.parquet")
        subsets.append(sorted(pq.read_table(shard).column("text").to_pylist()))
    assert subsets[0] != subsets[1] and len(subsets[0]) == len(subsets[1])  # own rows, same size


def test_a_held_out_share_of_the_unlabeled_rows_scores_pretraining(
    ray_session, quickstart_data, tmp_path
):
    from test_pipeline_e2e import tiny_config

    raw = tiny_config(quickstart_data, tmp_path, name="holdout")
    raw["data"]["unlabeled_holdout"] = 0.1
    raw["pretrain"].update(max_steps=20, log_every=10, checkpoint_every=10)
    raw["finetune"].update(epochs=1, compare_scratch=False, baseline="none")
    raw["finetune"]["sweep"] = {"num_samples": 1, "scheduler": "fifo"}
    summary = run_pipeline(parse_config(raw))
    held_out = _pretrain_val_loss(summary)
    assert sorted(held_out) == [10, 20]  # eval_every defaults to checkpoint_every
    assert summary.stages[0].metrics["best val/loss"] == round(min(held_out.values()), 4)
    assert summary.stages[0].metrics["kept step"] == 20  # keep: last
