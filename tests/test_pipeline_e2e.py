"""End to end on a shared local Ray: Ray Data -> Ray Train -> Ray Tune -> MLflow, for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raypipe.config import parse_config
from raypipe.engine.checkpoint import load_train_state
from raypipe.errors import UserError
from raypipe.pipeline import run_pipeline
from raypipe.summary import format_summary

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent


def tiny_config(data: dict[str, str], storage: Path, **overrides) -> dict:
    raw = {
        "name": "tiny",
        "storage": str(storage),
        "data": {
            "unlabeled": {"path": data["unlabeled"]},
            "labeled": {
                "train": {"path": data["train"]},
                "validation": {"path": data["validation"]},
            },
        },
        "tokenizer": {"vocab_size": 300},
        "model": {"dim": 32, "layers": 2, "heads": 2, "max_len": 32},
        "pretrain": {
            "max_steps": 30,
            "batch_size": 16,
            "log_every": 10,
            "checkpoint_every": 10,
            "optimizer": {"lr": 3e-3, "warmup_steps": 5},
        },
        "finetune": {
            "epochs": 2,
            "batch_size": 16,
            "sweep": {"num_samples": 2, "space": {"lr": {"loguniform": [3e-4, 3e-3]}}},
        },
    }
    raw.update(overrides)
    return raw


@pytest.fixture(scope="module")
def first_run(ray_session, quickstart_data, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    # System metrics sampled often enough to land within a tiny pretraining.
    cfg = parse_config(tiny_config(quickstart_data, storage, tracking={"system_metrics_s": 0.5}))
    return cfg, run_pipeline(cfg), storage


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_summary_compares_arms(first_run):
    cfg, summary, _ = first_run
    assert [s.name for s in summary.stages] == ["pretrain", "finetune"]
    assert all(s.status == "done" for s in summary.stages)
    assert summary.stages[0].metrics["steps"] == 30
    assert set(summary.arms) == {"pretrained", "scratch", "baseline"}  # linear: the default
    assert summary.arms["baseline"]["best_checkpoint"] is None
    for arm in (summary.arms["pretrained"], summary.arms["scratch"]):
        assert arm["num_trials"] == 2
        assert 0.0 <= arm["best_metric"] <= 1.0
        assert Path(arm["best_checkpoint"]).is_dir()
    text = format_summary(summary)
    assert "pretrained" in text and "scratch" in text and "mlflow ui --backend-store-uri" in text
    # How many training texts finetune.max_len cuts (the tiny model's 32 tokens) is said.
    assert "training rows longer than max_len 32" in summary.stages[1].metrics["texts cut"]
    assert (
        "(pretrained - scratch; higher val/accuracy is better, so + means pretrained wins)" in text
    )


def test_pretrain_checkpoints_in_storage(first_run):
    cfg, summary, storage = first_run
    (stage_dir,) = (storage / "tiny").glob("pretrain-*")
    steps = sorted(p.name for p in (stage_dir / "train").glob("step-*"))
    assert steps == ["step-00000020", "step-00000030"]
    final = stage_dir / "train" / "step-00000030"
    for name in (
        "model.safetensors",
        "model.json",
        "tokenizer.json",
        "train_state.pt",
        "meta.json",
    ):
        assert (final / name).is_file()
    assert (stage_dir / "stage.json").is_file() and (stage_dir / "config.yaml").is_file()


def test_mlflow_run_tree(first_run):
    cfg, summary, _ = first_run
    client = _client(summary.tracking_uri)
    parent = client.get_run(summary.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["raypipe.kind"] == "pipeline"
    assert parent.data.params["pretrain.max_steps"] == "30"
    assert "pipeline/seconds" in parent.data.metrics
    # The answer on the pipeline run itself (runs table, charts): each arm and the gap, equal
    # to the summary's, and the same figures as the run's description.
    metric = cfg.finetune.sweep.metric
    pre, scr, base = (summary.arms[a]["best_metric"] for a in ("pretrained", "scratch", "baseline"))
    found = {k: v for k, v in parent.data.metrics.items() if k.startswith("headline/")}
    assert found == {
        f"headline/{metric}/pretrained_1": pytest.approx(pre),
        f"headline/{metric}/scratch_1": pytest.approx(scr),
        f"headline/{metric}/baseline_1": pytest.approx(base),
        f"headline/{metric}/gap_1": pytest.approx(pre - scr),
    }
    note = parent.data.tags["mlflow.note.content"]
    assert (
        f"| tiny | {metric} | 1 | {pre:.4f} | {scr:.4f} | {base:.4f} | {pre - scr:+.4f} |" in note
    )
    assert "config/pipeline.yaml" in [
        a.path for a in client.list_artifacts(summary.run_id, "config")
    ]
    exp = parent.info.experiment_id

    def children(run_id):
        return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")

    stages = {r.info.run_name: r for r in children(summary.run_id)}
    assert set(stages) == {"pretrain", "finetune"}
    pre = stages["pretrain"]
    losses = client.get_metric_history(pre.info.run_id, "train/loss")
    assert [m.step for m in losses] == [10, 20, 30]
    assert "perf/data_wait_share" in pre.data.metrics and "perf/tokens_per_s" in pre.data.metrics
    # MLflow's system metrics of the node that trained (its first rank), named by node.
    import socket

    node = f"system/{socket.gethostname()}-rank0"
    cpu = client.get_metric_history(pre.info.run_id, f"{node}/cpu_utilization_percentage")
    assert cpu and all(0 <= m.value <= 100 for m in cpu)
    assert pre.data.metrics[f"{node}/system_memory_usage_megabytes"] > 0

    trials = [
        r
        for r in children(stages["finetune"].info.run_id)
        if r.data.tags["raypipe.kind"] == "trial"
    ]
    # ... and of the node each trial trained on, on the trial's own run.
    assert any(f"{node}/cpu_utilization_percentage" in t.data.metrics for t in trials)
    assert (
        sorted(t.data.tags["raypipe.arm"] for t in trials) == ["pretrained"] * 2 + ["scratch"] * 2
    )
    for t in trials:
        assert t.info.status == "FINISHED"
        assert "lr" in t.data.params
        history = client.get_metric_history(t.info.run_id, "val/accuracy")
        assert 1 <= len(history) <= 2
    ft = stages["finetune"]
    assert f"best/pretrained/{cfg.finetune.sweep.metric}" in ft.data.metrics


def test_each_trial_keeps_its_best_checkpoint(first_run):
    """One-worker trials train in the trial's own process and keep their newest checkpoint,
    which is the best epoch's (a checkpoint is written only when the metric improves)."""
    import json

    cfg, summary, storage = first_run
    client = _client(summary.tracking_uri)
    exp = client.get_run(summary.run_id).info.experiment_id
    trials = client.search_runs([exp], filter_string="tags.`raypipe.kind` = 'trial'")
    (trials_dir,) = (storage / "tiny").glob("finetune-*/trials")
    assert sorted(p.name for p in trials_dir.iterdir()) == sorted(t.info.run_name for t in trials)
    for t in trials:
        (checkpoint,) = (trials_dir / t.info.run_name).glob("epoch-*")
        meta = json.loads((checkpoint / "meta.json").read_text())
        history = client.get_metric_history(t.info.run_id, "val/accuracy")
        assert meta["metrics"]["val/accuracy"] == pytest.approx(max(m.value for m in history))
        assert checkpoint.name == f"epoch-{meta['epoch']:04d}"


def test_registered_model_loads_and_predicts(first_run, quickstart_data):
    import mlflow

    from raypipe.data.text import encode_labeled
    from raypipe.engine.checkpoint import load_task
    from raypipe.registered import load_model

    cfg, summary, _ = first_run
    version = summary.model["version"]
    mlflow.set_tracking_uri(summary.tracking_uri)
    mlflow.set_registry_uri(summary.tracking_uri)
    model = load_model(f"models:/tiny/{version}")  # the README's way: pt2 only, no pickle

    local = mlflow.artifacts.download_artifacts(f"models:/tiny/{version}")
    tokenizer_json = (Path(local) / "extra_files" / "tokenizer.json").read_text()
    table = pq.read_table(next(Path(quickstart_data["validation"]).glob("*.parquet")))
    batch = encode_labeled(
        {
            "text": np.array(table.column("text").to_pylist()[:16], dtype=object),
            "label": np.array(table.column("label").to_pylist()[:16]),
        },
        tokenizer_json=tokenizer_json,
        text_column="text",
        label_column="label",
        max_len=32,
    )
    ids = torch.from_numpy(batch["input_ids"]).long()
    with torch.no_grad():
        logits = model(ids)
        expected = load_task(summary.model["checkpoint"]).eval().predict(ids)
    assert logits.shape == (16, 2)
    assert torch.allclose(logits, expected, atol=1e-4)
    mv = _client(summary.tracking_uri).get_model_version("tiny", version)
    assert mv.tags["raypipe.arm"] == summary.model["arm"]


def _validation_ids(quickstart_data, tokenizer_json: str, rows: int | None = None):
    from raypipe.data.text import encode_labeled

    table = pq.read_table(next(Path(quickstart_data["validation"]).glob("*.parquet")))
    texts = table.column("text").to_pylist()[:rows]
    batch = encode_labeled(
        {"text": np.array(texts, dtype=object), "label": np.zeros(len(texts), dtype=np.int64)},
        tokenizer_json=tokenizer_json, text_column="text", label_column="label", max_len=32,
    )  # fmt: skip
    return table, torch.from_numpy(batch["input_ids"]).long()


def _registered(summary):
    """The registered version's URI, its graph, tokenizer and local folder."""
    import mlflow

    from raypipe.registered import global_store, load_model

    uri = f"models:/tiny/{summary.model['version']}"
    with global_store(summary.tracking_uri):  # models:/ resolves through MLflow's global URIs
        local = Path(mlflow.artifacts.download_artifacts(uri))
    model = load_model(uri, tracking_uri=summary.tracking_uri)
    return uri, model, (local / "extra_files" / "tokenizer.json").read_text(), local


def test_predict_writes_the_registered_models_outputs(first_run, quickstart_data, tmp_path):
    """`raypipe predict` through real Ray Data: every validation row's probabilities and label
    equal the registered model's own on the same rows, beside the rows' label column."""
    from raypipe.predict import run_predict

    cfg, summary, _ = first_run
    uri, model, tokenizer_json, _ = _registered(summary)
    out = tmp_path / "preds"
    outcome = run_predict(uri, quickstart_data["validation"], str(out),
                          tracking_uri=summary.tracking_uri, batch_size=16)  # fmt: skip
    table, ids = _validation_ids(quickstart_data, tokenizer_json)
    got = pq.read_table(out)
    assert outcome.rows == got.num_rows == table.num_rows == 64
    assert got.column_names == ["label", "prediction", "probabilities"]
    assert got.column("label").to_pylist() == table.column("label").to_pylist()  # order kept
    with torch.no_grad():
        expected = torch.softmax(model(ids), -1).numpy()
    probs = np.array(got.column("probabilities").to_pylist())
    assert np.allclose(probs, expected, atol=1e-5)
    # The label each row's probabilities pick, where they pick one: a barely trained model
    # scores some rows near a tie, which another batch's float rounding can tip.
    top2 = np.sort(expected, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4
    assert clear.sum() >= len(clear) // 2
    picked = np.array(got.column("prediction").to_pylist())
    assert (picked[clear] == expected.argmax(-1)[clear]).all()


def test_predict_reads_and_writes_an_object_store(first_run, quickstart_data, tmp_path):
    """`raypipe predict` (the command, its own Ray) from Parquet in S3 (a real S3 server) to a
    new S3 prefix: the same rows out as from the local copy; that prefix, now taken, is
    refused in one line."""
    from raypipe import storage
    from raypipe.predict import run_predict
    from tests.servers import patched_env, s3_server

    _, summary, _ = first_run
    uri = f"models:/tiny/{summary.model['version']}"
    local = tmp_path / "local"
    run_predict(uri, quickstart_data["validation"], str(local), tracking_uri=summary.tracking_uri,
                batch_size=16)  # fmt: skip
    with s3_server(tmp_path, "preds") as s3, patched_env(s3):
        storage._remote_fs.cache_clear()
        try:
            for i, f in enumerate(sorted(Path(quickstart_data["validation"]).glob("*.parquet"))):
                storage.write_bytes(f"s3://preds/in/part-{i}.parquet", f.read_bytes())
            env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
            cmd = [sys.executable, "-m", "raypipe", "predict", uri, "s3://preds/in", "--out",
                   "s3://preds/out", "--tracking-uri", summary.tracking_uri, "--batch-size", "16"]  # fmt: skip
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            written = storage.list_files("s3://preds/out", "*.parquet")
            got = pa.concat_tables(pq.read_table(pa.BufferReader(storage.read_bytes(f)))
                                   for f in written)  # fmt: skip
            again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        finally:
            storage._remote_fs.cache_clear()
    assert got.equals(pq.read_table(local))
    assert again.returncode == 2 and "already holds files" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1, again.stderr


def test_predict_bad_input_is_one_line_and_keeps_files(first_run, quickstart_data, tmp_path,
                                                       capsys):  # fmt: skip
    from raypipe.cli import main

    _, summary, _ = first_run
    uri = f"models:/tiny/{summary.model['version']}"
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.parquet").write_bytes(b"user data")
    noncol = tmp_path / "other.parquet"
    pq.write_table(pa.table({"body": ["a film"]}), noncol)
    cases = [
        ([uri, quickstart_data["validation"], "--out", str(taken)], "already holds files"),
        ([uri, str(noncol), "--out", str(tmp_path / "a")], "DATA has no column 'text'"),
        (["models:/nope/1", str(noncol), "--out", str(tmp_path / "b")], "cannot load model"),
    ]
    for args, message in cases:
        code = main(["predict", *args, "--tracking-uri", summary.tracking_uri])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert (taken / "mine.parquet").read_bytes() == b"user data"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_mlflow_serves_the_registered_model(first_run, quickstart_data, tmp_path):
    """A real `mlflow models serve` answers a real request with the registered model's own
    outputs (token ids as the README's pre-step makes them), and its own serving example."""
    from tests.servers import model_server, post_json

    _, summary, _ = first_run
    uri, model, tokenizer_json, example = _registered(summary)
    _, ids = _validation_ids(quickstart_data, tokenizer_json, rows=5)
    with model_server(tmp_path, uri, summary.tracking_uri) as server:
        status, body = post_json(f"{server.url}/invocations", {"inputs": ids.tolist()})
        assert status == 200, body
        served = json.loads((example / "serving_input_example.json").read_text())
        assert post_json(f"{server.url}/invocations", served)[0] == 200
    with torch.no_grad():
        expected = model(ids).numpy()
    assert np.allclose(np.array(body["predictions"]), expected, atol=1e-5)


def test_checkpoints_are_logged_models(first_run):
    """Every pretraining checkpoint (also one pruned since) and every trial's kept checkpoint
    is one of MLflow 3's logged models (no artifacts: its storage path as a tag), with its
    metrics, comparable in the experiment's Models tab."""
    from raypipe.stages.checkpoint_models import MODEL_TYPE

    cfg, summary, storage = first_run
    client = _client(summary.tracking_uri)
    parent = client.get_run(summary.run_id)
    models = [m for m in client.search_logged_models([parent.info.experiment_id])
              if m.model_type == MODEL_TYPE]  # fmt: skip
    by_name = {m.name: m for m in models}
    assert len(by_name) == len(models)  # each checkpoint once
    (stage_dir,) = (storage / "tiny").glob("pretrain-*")
    assert not (stage_dir / "train" / "step-00000010").exists()  # pruned: 2 are kept
    for step in (10, 20, 30):  # each recorded as it was written
        m = by_name[f"pretrain-step-{step:08d}"]
        assert m.tags["raypipe.checkpoint"] == str(stage_dir / "train" / f"step-{step:08d}")
        assert {x.key for x in m.metrics} >= {"checkpoint/loss", "checkpoint/tokens_seen"}
    trials = [m for m in models if not m.name.startswith("pretrain-")]
    kept = list((storage / "tiny").glob("finetune-*/**/epoch-*/meta.json"))
    assert len(trials) == len(kept) > 0
    best = summary.arms["pretrained"]
    m = next(m for m in trials if m.tags["raypipe.checkpoint"] == best["best_checkpoint"])
    metrics = {x.key: x.value for x in m.metrics}
    assert metrics[f"checkpoint/{cfg.finetune.sweep.metric}"] == pytest.approx(best["best_metric"])
    assert "lr" in m.params
    trial_run = client.get_run(m.source_run_id)  # the trial's own run
    assert trial_run.info.run_name == best["best_trial"]


def test_lineage_in_mlflow(first_run, quickstart_data):
    """Datasets as run inputs with digests; trials and the registered version tied to the
    pretraining run and step; the champion alias on the first version."""
    from raypipe import storage
    from raypipe.data import files as datafiles

    cfg, summary, _ = first_run
    client = _client(summary.tracking_uri)
    parent = client.get_run(summary.run_id)
    exp = parent.info.experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([exp])}

    def inputs(run) -> dict[str, tuple[str, str]]:
        got = client.get_run(run.info.run_id).inputs.dataset_inputs
        return {i.tags[0].value: (i.dataset.name, i.dataset.digest) for i in got}

    digest = {
        split: datafiles.manifest_digest(
            datafiles.resolve_parquet_files(quickstart_data[split], key=split)
        )[:36]
        for split in ("unlabeled", "train", "validation")
    }
    assert inputs(runs["pretrain"]) == {"pretrain": ("tiny-pretrain", digest["unlabeled"])}
    assert inputs(runs["finetune"]) == {
        "train": ("tiny-train", digest["train"]),
        "validation": ("tiny-validation", digest["validation"]),
    }
    assert set(inputs(parent)) == {"pretrain", "train", "validation"}

    pretrain_run = runs["pretrain"].info.run_id
    for name in ("pretrained-00000", "pretrained-00001"):
        tags = runs[name].data.tags
        assert tags["raypipe.pretrain_run_id"] == pretrain_run
        assert tags["raypipe.pretrain_step"] == "30"
        assert tags["raypipe.init_checkpoint"].endswith("step-00000030")
    assert "raypipe.pretrain_run_id" not in runs["scratch-00000"].data.tags

    mv = client.get_model_version("tiny", summary.model["version"])
    # The version says what it is: task, arm, data and metric, in words.
    assert mv.description.startswith(
        f"classification fine-tuned by raypipe pipeline 'tiny': arm {summary.model['arm']} "
        f"(1 of the labels, "
    )
    assert quickstart_data["train"] in mv.description and "val/accuracy" in mv.description
    assert mv.tags["raypipe.pipeline_fingerprint"] == parent.data.tags["raypipe.fingerprint"]
    assert mv.tags["raypipe.pipeline_run_id"] == summary.run_id
    assert mv.tags["raypipe.label_fraction"] == "1.0"
    assert mv.tags["raypipe.validation_digest"] == datafiles.manifest_digest(
        datafiles.resolve_parquet_files(quickstart_data["validation"], key="v")
    )
    if summary.model["arm"] == "pretrained":
        assert mv.tags["raypipe.pretrain_run_id"] == pretrain_run
    assert client.get_model_version_by_alias("tiny", "champion").version == mv.version
    assert summary.model["champion"] == str(mv.version)
    assert storage.exists(mv.tags["raypipe.checkpoint"])


def test_plots_are_logged_as_real_images(first_run, tmp_path):
    """The pretraining loss curve and the best trial per arm, as PNGs on the stage runs."""
    from PIL import Image

    from raypipe.plots import SIZE_PX

    cfg, summary, _ = first_run
    client = _client(summary.tracking_uri)
    exp = client.get_run(summary.run_id).info.experiment_id
    runs = {r.info.run_name: r.info.run_id for r in client.search_runs([exp])}
    for stage, name in (("pretrain", "pretrain_loss.png"), ("finetune", "finetune_curves.png")):
        local = client.download_artifacts(runs[stage], f"plots/{name}", str(tmp_path))
        with Image.open(local) as image:
            assert image.format == "PNG" and image.size == SIZE_PX
            # Drawn on: axes, lines and text, not a blank canvas.
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50


def test_report_prints_the_summary_from_mlflow(first_run, tmp_path):
    cfg, summary, _ = first_run
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}

    def report(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "raypipe", "report", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )

    done = report(summary.run_id, "--tracking-uri", summary.tracking_uri)
    assert done.returncode == 0, done.stderr
    assert done.stdout == format_summary(summary) + "\n"
    assert "alias 'champion' -> version" in done.stdout

    stage = _client(summary.tracking_uri).search_runs(
        [_client(summary.tracking_uri).get_run(summary.run_id).info.experiment_id],
        filter_string="attributes.run_name = 'pretrain'",
    )[0]
    for args, message in (
        (["0" * 32, "--tracking-uri", summary.tracking_uri], "no run '" + "0" * 32 + "'"),
        ([stage.info.run_id, "--tracking-uri", summary.tracking_uri], "is a stage run, not a"),
        ([summary.run_id], "no tracking store: pass --tracking-uri"),
    ):
        done = report(*args)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.startswith("raypipe: error: ") and message in done.stderr
        assert done.stderr.count("\n") == 1  # one line, no traceback


def test_label_fractions_sweep_both_arms_on_the_same_rows(ray_session, quickstart_data, tmp_path):
    import json
    from collections import Counter

    from PIL import Image

    from raypipe.plots import SIZE_PX

    raw = tiny_config(quickstart_data, tmp_path)
    raw["pretrain"].update(max_steps=10, log_every=5, checkpoint_every=10)
    labels = pq.read_table(quickstart_data["train"]).column("label").to_pylist()
    half = sum(max(1, round(0.5 * n)) for n in Counter(labels).values())  # stratified
    # An epoch covers at least the full set's rows: the half subset is repeated in each epoch.
    raw["finetune"].update(epochs=1, label_fractions=[0.5, 1.0], min_epoch_rows=len(labels))
    raw["finetune"]["sweep"].update(num_samples=1, scheduler="fifo")
    summary = run_pipeline(parse_config(raw))
    assert {k: (a["label_fraction"], a["num_train_rows"]) for k, a in summary.arms.items()} == {
        "pretrained": (1.0, len(labels)),
        "scratch": (1.0, len(labels)),
        "pretrained_0.5": (0.5, half),
        "scratch_0.5": (0.5, half),
        "baseline": (1.0, len(labels)),  # the classical baseline on the same rows
        "baseline_0.5": (0.5, half),
    }
    repeat = -(-len(labels) // half)
    assert repeat > 1
    for fraction, rows in (("labels-0.5/", half * repeat), ("", len(labels))):
        for arm in ("pretrained", "scratch"):
            (ckpt,) = tmp_path.glob(f"tiny/finetune-*/{fraction}trials/{arm}*/epoch-0001")
            assert load_train_state(ckpt)["steps"] == rows // 16  # optimizer steps in the epoch
    # One subset, written once, read by both arms.
    (subset,) = tmp_path.glob("tiny/finetune-*/labels-0.5/*.parquet")
    picked = pq.read_table(subset).column("label").to_pylist()
    assert Counter(picked) == {y: max(1, round(0.5 * n)) for y, n in Counter(labels).items()}

    text = format_summary(summary)
    assert "label efficiency: best val/accuracy by fraction of the labeled rows" in text
    client = _client(summary.tracking_uri)
    table = json.loads(
        Path(
            client.download_artifacts(summary.run_id, "label_efficiency.json", str(tmp_path))
        ).read_text()
    )
    assert [(r["fraction"], r["rows"]) for r in table] == [(0.5, half), (1.0, len(labels))]
    val_labels = pq.read_table(quickstart_data["validation"]).column("label").to_pylist()
    for row in table:
        for arm in ("pretrained", "scratch"):
            best = summary.arms[arm if row["fraction"] == 1 else f"{arm}_0.5"]["best_metric"]
            assert row[arm] == best
        # Chance on validation: the training rows' most common class (the same on both
        # fractions: the half subset is stratified).
        counts = Counter(labels)
        common = min(y for y, n in counts.items() if n == max(counts.values()))  # lowest on a tie
        assert row["majority"] == pytest.approx(val_labels.count(common) / len(val_labels))
    assert "majority" in text.split("label efficiency:")[1]
    png = client.download_artifacts(summary.run_id, "plots/label_efficiency.png", str(tmp_path))
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == SIZE_PX

    exp = client.get_run(summary.run_id).info.experiment_id
    trials = client.search_runs([exp], filter_string="tags.`raypipe.kind` = 'trial'")
    assert sorted((t.data.tags["raypipe.arm"], t.data.tags["raypipe.label_fraction"])
                  for t in trials) == [("pretrained", "1.0"), ("pretrained_0.5", "0.5"),
                                       ("scratch", "1.0"), ("scratch_0.5", "0.5")]  # fmt: skip
    version = client.get_model_version("tiny", summary.model["version"])
    best = summary.arms[version.tags["raypipe.arm"]]
    assert version.tags["raypipe.label_fraction"] == str(best["label_fraction"])


def test_rerun_reuses_completed_stages(first_run):
    cfg, summary, _ = first_run
    again = run_pipeline(cfg)
    assert [s.status for s in again.stages] == ["reused", "reused"]
    assert again.arms == summary.arms and again.model == summary.model
    client = _client(again.tracking_uri)
    exp = client.get_run(again.run_id).info.experiment_id
    stages = client.search_runs(
        [exp], filter_string=f"tags.`mlflow.parentRunId` = '{again.run_id}'"
    )
    assert {r.data.tags["raypipe.reused"] for r in stages} == {"true"}
    assert all(r.data.metrics for r in stages)  # a reused stage's run still shows its outcome
    assert len(client.search_model_versions("name='tiny'")) == 1


def test_out_of_range_labels_fail_clearly(ray_session, tmp_path, quickstart_data):
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(
        pa.table({"text": ["a fine film ."] * 8, "label": [0, 1, 2, 5, 0, 1, 0, 1]}),
        bad / "part.parquet",
    )
    raw = tiny_config(quickstart_data, tmp_path / "runs")
    del raw["pretrain"]
    raw["data"] = {"labeled": {"train": {"path": str(bad)}, "validation": {"path": str(bad)}}}
    raw["finetune"]["init"] = "scratch"
    with pytest.raises(
        UserError, match=r"labels range over \[0, 5\] but finetune.num_classes is 2"
    ):
        run_pipeline(parse_config(raw))


def _cli(*args, cwd, timeout=900):
    # A clean MLflow environment: other tests in this process set the global tracking URI.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run(
        [sys.executable, "-m", "raypipe", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_cli_runs_the_quickstart_at_smoke_size(ray_session, tmp_path):
    """The shipped quickstart through the real CLI, joining the session's Ray via --address."""
    address = ray_session.get_runtime_context().gcs_address
    proc = _cli(
        "run",
        str(ROOT / "pipelines" / "quickstart.yaml"),
        "--address",
        address,
        "--set",
        "pretrain.max_steps=20",
        "--set",
        "model.dim=32",
        "--set",
        "model.layers=1",
        "--set",
        "finetune.epochs=1",
        "--set",
        "finetune.sweep.num_samples=1",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "raypipe: pipeline 'quickstart' finished" in out
    assert "pretrain step 20/20" in out  # progress lines reach the driver's console
    # Each stage's last status line is in the log: the sweep's says every trial finished.
    for arm in ("pretrained", "scratch"):
        assert f"finetune {arm}: 1/1 trials done, 0 running, best val/accuracy" in out
    assert "pretrained" in out and "scratch" in out and "registered 'quickstart' version 1" in out
    assert (tmp_path / "data" / "quickstart" / "unlabeled").is_dir()  # generated on first run
    assert (tmp_path / "raypipe-runs" / "mlflow.db").is_file()
    assert "Traceback" not in proc.stderr
    # MLflow's own registration prints are left out: the summary says what was registered.
    assert "Successfully registered model" not in proc.stderr + out
    assert "Created version" not in proc.stderr + out
    # The cold start, process start -> first step, printed once and logged on the stage's run.
    (line,) = [x for x in out.splitlines() if "after process start" in x]
    spans = ("imports", "checks", "ray", "setup", "dataset", "workers", "model", "first batch")
    assert all(f"{name} " in line for name in spans), line
    client = _client(f"sqlite:///{tmp_path / 'raypipe-runs' / 'mlflow.db'}")
    (pre,) = client.search_runs(
        [client.get_experiment_by_name("quickstart").experiment_id],
        "tags.`raypipe.stage` = 'pretrain'",
    )
    startup = {k: v for k, v in pre.data.metrics.items() if k.startswith("startup/")}
    total = startup.pop("startup/total_s")
    assert len(startup) == 9 and all(v >= 0 for v in startup.values())
    assert total == pytest.approx(sum(startup.values())) and total > startup["startup/imports_s"]
    assert f"first step {total:.1f} s" in line

    # The same command again reuses both stages and never needs Ray: pointing it at an address
    # where nothing listens proves no connection is attempted.
    again = _cli(
        "run", str(ROOT / "pipelines" / "quickstart.yaml"), "--address", "127.0.0.1:1",
        "--set", "pretrain.max_steps=20", "--set", "model.dim=32", "--set", "model.layers=1",
        "--set", "finetune.epochs=1", "--set", "finetune.sweep.num_samples=1",
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "pretrain  reused" in again.stdout and "finetune  reused" in again.stdout


def test_cli_bad_data_path_fails_before_anything_starts(tmp_path):
    (tmp_path / "p.yaml").write_text(
        "name: t\nstorage: runs\ndata: {unlabeled: {path: nowhere}}\npretrain: {max_steps: 5}\n"
    )
    proc = _cli("run", "p.yaml", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "raypipe: error: data.unlabeled.path: data path 'nowhere' does not exist; "
        "fix the path or create the data"
    )
    assert not (tmp_path / "runs").exists()


def test_error_inside_every_trial_surfaces_as_one_user_error(
    ray_session, tmp_path, quickstart_data, monkeypatch
):
    from raypipe import preflight

    # The batch is checked against the rows up front too; here the trials' own check speaks.
    monkeypatch.setattr(preflight, "_check_batch_fits", lambda cfg, rows: None)
    raw = tiny_config(quickstart_data, tmp_path / "runs")
    del raw["pretrain"]
    del raw["data"]["unlabeled"]
    raw["finetune"].update(init="scratch", batch_size=512)
    raw["finetune"]["sweep"] = {"num_samples": 1}
    with pytest.raises(UserError, match="gives no full batch of 512 rows per worker"):
        run_pipeline(parse_config(raw))


def test_cli_unreachable_cluster_fails_fast(tmp_path, quickstart_data):
    import yaml

    raw = tiny_config(quickstart_data, tmp_path / "runs")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    proc = _cli("run", "p.yaml", "--address", "127.0.0.1:1", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(
        "raypipe: error: cannot reach the Ray cluster at '127.0.0.1:1'"
    )


def test_finetune_from_a_checkpoint_directory(first_run, quickstart_data, tmp_path):
    """init: <checkpoint dir> takes the model, its weights and its tokenizer from there."""
    from raypipe.engine.checkpoint import read_meta

    cfg, summary, storage = first_run
    (stage_dir,) = (storage / "tiny").glob("pretrain-*")
    checkpoint = stage_dir / "train" / "step-00000030"
    raw = tiny_config(quickstart_data, tmp_path / "runs", name="from-ckpt")
    del raw["pretrain"]
    del raw["data"]["unlabeled"]
    raw["finetune"].update(init=str(checkpoint), epochs=1)
    raw["finetune"]["sweep"] = {"num_samples": 1}
    result = run_pipeline(parse_config(raw))
    assert set(result.arms) == {"pretrained", "scratch", "baseline"}
    best = result.arms["pretrained"]["best_checkpoint"]
    assert read_meta(best)["init_checkpoint"] == str(checkpoint)
    assert (Path(best) / "tokenizer.json").read_text() == (
        checkpoint / "tokenizer.json"
    ).read_text()
