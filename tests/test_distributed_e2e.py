"""End to end on the shared local Ray: two DDP workers for the objectives that gather across
workers or own their step, and tasks beyond classification."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raypipe.config import parse_config
from raypipe.engine.checkpoint import read_meta
from raypipe.pipeline import run_pipeline

pytestmark = pytest.mark.slow

TWO = {"num_workers": 2, "cpus_per_worker": 0.5}
IMAGE_MODEL = {"dim": 32, "layers": 2, "image_size": 16}


def _pretrain(objective: str, **extra) -> dict:
    return {"objective": objective, "max_steps": 3, "batch_size": 8, "log_every": 1,
            "checkpoint_every": 3, "scaling": TWO, **extra}  # fmt: skip


# CLIP pretrains sharded (FSDP2); its unsharded checkpoint is what fine-tuning loads.
@pytest.mark.parametrize(("objective", "strategy"), [("gan", "ddp"), ("clip", "fsdp")])
def test_two_workers(objective, strategy, ray_session, media_data, tmp_path):
    from mlflow.tracking import MlflowClient

    model = {
        "gan": {"type": "cnn"},
        "clip": {"type": "clip", "max_len": 16, "heads": 2, "patch_size": 4},
    }[objective]
    raw = {
        "name": f"two-{objective}",
        "storage": str(tmp_path),
        "tokenizer": {"vocab_size": 300},
        "data": {
            "unlabeled": {"path": media_data["shapes_train"], "text_column": "caption"},
            "labeled": {
                "train": {"path": media_data["shapes_train"]},
                "validation": {"path": media_data["shapes_val"]},
            },
        },
        "model": {**IMAGE_MODEL, **model},
        "pretrain": _pretrain(objective, strategy=strategy,
                              options={"generator_width": 8} if objective == "gan" else {}),
        "finetune": {"input": "image", "num_classes": 4, "epochs": 1, "batch_size": 8,
                     "compare_scratch": False, "scaling": TWO,
                     "sweep": {"num_samples": 1, "scheduler": "fifo"}},
    }  # fmt: skip
    summary = run_pipeline(parse_config(raw))
    assert summary.stages[0].metrics["steps"] == 3
    assert summary.arms["pretrained"]["best_metric"] is not None
    client = MlflowClient(summary.tracking_uri)
    exp = client.get_run(summary.run_id).info.experiment_id
    (pre,) = client.search_runs([exp], filter_string="attributes.run_name = 'pretrain'")
    # Three logged steps, with throughput counted over both workers.
    assert [m.step for m in client.get_metric_history(pre.info.run_id, "train/loss")] == [1, 2, 3]
    assert pre.data.metrics["perf/images_per_s"] > 0
    meta = read_meta(pre.data.tags["raypipe.checkpoint"])
    assert meta["strategy"] == strategy and meta["step"] == 3
    if objective == "gan":
        assert "train/d_real" in pre.data.metrics and "train/generator_loss" in pre.data.metrics


def test_regression_finetune_from_scratch(ray_session, media_data, tmp_path):
    raw = {
        "name": "reg",
        "storage": str(tmp_path),
        "tokenizer": {"vocab_size": 300},
        "data": {"labeled": {"train": {"path": media_data["reg_train"]},
                             "validation": {"path": media_data["reg_val"]}}},
        "model": {"dim": 32, "layers": 1, "heads": 2, "max_len": 32},
        "finetune": {"task": "regression", "init": "scratch", "epochs": 2, "batch_size": 16,
                     "sweep": {"num_samples": 1, "scheduler": "fifo"}},
    }  # fmt: skip
    cfg = parse_config(raw)
    summary = run_pipeline(cfg)
    assert (cfg.finetune.sweep.metric, cfg.finetune.sweep.mode) == ("val/mse", "min")
    assert set(summary.arms) == {"scratch", "baseline"}  # ridge regression beside it
    assert 0 <= summary.arms["scratch"]["best_metric"] < 10
    # The baseline's chance: the mse of always answering the training mean, on validation.
    train, val = (
        pq.read_table(media_data[s]).column("label").to_numpy() for s in ("reg_train", "reg_val")
    )
    assert summary.arms["baseline"]["majority"] == pytest.approx(
        float(((val - train.mean()) ** 2).mean())
    )
    import mlflow
    import torch

    mlflow.set_tracking_uri(summary.tracking_uri)
    mlflow.set_registry_uri(summary.tracking_uri)
    model = mlflow.pytorch.load_model(f"models:/reg/{summary.model['version']}")  # pt2
    out = model(torch.ones((3, 5), dtype=torch.int64))
    assert tuple(out.shape) == (3,) and torch.isfinite(out).all()


def test_max_rows_limits_what_a_stage_reads(ray_session, media_data):
    from raypipe.config import LabeledSource, Source
    from raypipe.data.pipelines import build_dataset, labeled_dataset

    files = [str(p) for p in sorted(Path(media_data["shapes_train"]).glob("*.parquet"))]
    model_config = {"image_size": 8, "channels": 3}
    ds = labeled_dataset(files, source=LabeledSource(path="x", max_rows=40), kind="labeled",
                         input="image", label_dtype="int64", tokenizer_json=None, max_len=8,
                         model_config=model_config)  # fmt: skip
    assert ds.count() == 40
    stream = build_dataset(files, kind="image_views", source=Source(path="x", max_rows=24),
                           tokenizer_json=None, seq_len=8, text_extra=0,
                           model_config=model_config)  # fmt: skip
    batches = list(stream.iter_batches(batch_size=None))
    assert sum(len(b["view1"]) for b in batches) == 24
    assert batches[0]["view1"].shape[1:] == (3, 8, 8)


def test_one_epoch_makes_enough_passes_for_the_run(ray_session, media_data, monkeypatch):
    from raypipe.config import PretrainConfig, Source
    from raypipe.data import pipelines
    from raypipe.data.pipelines import MAX_PASSES, build_dataset, data_footprint, passes_per_epoch

    files = [str(p) for p in sorted(Path(media_data["shapes_train"]).glob("*.parquet"))]
    source = Source(path="x", max_rows=24)

    def passes(max_steps, batch_size, world=1):
        cfg = PretrainConfig(max_steps=max_steps, batch_size=batch_size)
        footprint = data_footprint(files, kind="images", source=source)
        return passes_per_epoch(footprint, kind="images", cfg=cfg, block_size=0, world=world)

    # 24 rows (max_rows): the run needs max_steps x batch_size x workers of them
    assert passes(3, 8) == 1
    assert passes(4, 8) == 2
    assert passes(10, 8, world=2) == 7
    assert passes(10**6, 8) == MAX_PASSES
    model_config = {"image_size": 8, "channels": 3}
    options = ray_session.data.DataContext.get_current().execution_options
    options.preserve_order = True  # as the trainer streams it (see run_pretrain)

    def images(**kw):
        stream = build_dataset(files, kind="images", source=source, tokenizer_json=None,
                               seq_len=8, text_extra=0, model_config=model_config, **kw)  # fmt: skip
        return np.concatenate([b["image"] for b in stream.iter_batches(batch_size=None)])

    try:
        first = images()  # small data: read on the driver into the object store
        cached = images(passes=3)  # ... then three passes over it
        monkeypatch.setattr(pipelines, "BLOCK_BYTES", 1)  # a block per row
        blocks = images(passes=3)
        monkeypatch.setattr(pipelines, "CACHE_MAX_BYTES", 0)
        streamed = images(passes=3)  # big data: Ray Data's reader, one pass an epoch
        assert passes(10**6, 8) == 1
    finally:
        options.preserve_order = False
    assert len(first) == 24  # max_rows
    np.testing.assert_array_equal(first, streamed)  # the same rows in the same order
    # Three passes one after the other (a union of the data with itself dealt its blocks out
    # in turn: each block three times in a row).
    for repeated in (cached, blocks):
        np.testing.assert_array_equal(repeated, np.concatenate([first] * 3))


def test_small_data_is_read_in_order_in_blocks(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raypipe.data.files import read_blocks

    for i in range(3):
        pq.write_table(
            pa.table({"n": range(i * 10, i * 10 + 10), "other": ["x"] * 10}),
            tmp_path / f"{i}.parquet",
            row_group_size=4,
        )
    files = [str(tmp_path / f"{i}.parquet") for i in range(3)]
    blocks = read_blocks(files, ["n"], rows_per_block=4)
    assert [b.column_names for b in blocks] == [["n"]] * len(blocks)
    assert max(b.num_rows for b in blocks) == 4
    assert [v for b in blocks for v in b.column("n").to_pylist()] == list(range(30))
    blocks = read_blocks(files, ["n"], rows_per_block=4, max_rows=13)
    assert [v for b in blocks for v in b.column("n").to_pylist()] == list(range(13))


def test_text_passes_are_estimated_low_from_the_footers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raypipe.config import PretrainConfig
    from raypipe.data.files import footprint
    from raypipe.data.pipelines import MAX_BYTES_PER_TOKEN, Footprint, passes_per_epoch

    # Unique texts (a repeated one is dictionary-encoded, smaller: more passes, never fewer).
    texts = [f"{i:05d} " + "x" * 93 + " " for i in range(1000)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet", compression="none")
    files = [str(tmp_path / "a.parquet")]
    # ~100,000 bytes of text (plus 4 per value for its length) and at most MAX_BYTES_PER_TOKEN
    # per token: >= ~200 blocks of 64; 50 steps x 8 blocks = 400 blocks need 2 passes.
    rows, size = footprint(files, ["text"])
    assert rows == 1000 and 100_000 <= size <= 110_000
    blocks = size / (MAX_BYTES_PER_TOKEN * 64)
    cfg = PretrainConfig(max_steps=50, batch_size=8)
    got = passes_per_epoch(
        Footprint(rows=rows, size=size), kind="text_blocks", cfg=cfg, block_size=64, world=1
    )
    assert got == int(np.ceil(400 / blocks)) == 2


def test_footprint_counts_the_columns_a_stage_reads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raypipe.config import Source
    from raypipe.data.pipelines import data_footprint

    table = pa.table({
        "image": [bytes([i]) * 1000 for i in range(10)],
        "text": [f"{i}" * 100 for i in range(10)],
        "unread": [f"{i}" * 5000 for i in range(10)],
    })  # fmt: skip
    pq.write_table(table, tmp_path / "a.parquet", compression="none", use_dictionary=False)
    files = [str(tmp_path / "a.parquet")]
    images = data_footprint(files, kind="images", source=Source(path="x"))
    both = data_footprint(files, kind="image_text", source=Source(path="x"))
    first = data_footprint(files, kind="image_text", source=Source(path="x", max_rows=5))
    assert images.rows == both.rows == 10 and first.rows == 5
    # The image column (10,000 bytes plus page overhead), then the text's 1,000 bytes on top;
    # never the unread column's 50,000.
    assert 10_000 <= images.size < 20_000
    assert 1_000 <= both.size - images.size < 5_000
    assert first.size == both.size // 2
