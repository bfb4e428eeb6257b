"""Storage on a local path and in S3 (a moto server on loopback): shards found and checked there,
checkpoints read from there, and the up-front errors for a store that cannot be used."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from servers import patched_env, s3_server

from raypipe import storage
from raypipe.config import parse_config
from raypipe.data import files as datafiles
from raypipe.engine.checkpoint import (
    CheckpointError,
    load_train_state,
    load_weights,
    read_meta,
    read_spec,
    save_checkpoint,
)
from raypipe.errors import UserError
from raypipe.preflight import preflight

BUCKET = "storage-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The S3 server, with this process's environment pointing pyarrow at it."""
    root = tmp_path_factory.mktemp("s3")
    with s3_server(root, BUCKET) as env, patched_env(env):
        storage._remote_fs.cache_clear()
        try:
            yield f"s3://{BUCKET}"
        finally:
            storage._remote_fs.cache_clear()


def _write_shards(base: str, n: int = 2) -> None:
    fs, path = storage.resolve(base)
    for i in range(n):
        table = pa.table(
            {"text": [f"row {i} {j}" for j in range(5)], "label": [j % 2 for j in range(5)]}
        )
        pq.write_table(table, f"{path}/part-{i}.parquet", filesystem=fs)


def test_local_paths_and_uris_are_told_apart(tmp_path):
    assert storage.is_remote("s3://b/k") and storage.is_remote("gs://b/k")
    assert not storage.is_remote("/data/x") and not storage.is_remote("file:///data/x")
    assert storage.normalize("relative/dir") == os.path.abspath("relative/dir")
    assert storage.join("s3://b/runs", "a", "b.json") == "s3://b/runs/a/b.json"
    assert storage.qualify("b/runs/ckpt", like="s3://b/runs") == "s3://b/runs/ckpt"
    assert storage.qualify("/tmp/x", like="/tmp") == "/tmp/x"
    target = tmp_path / "d" / "f.txt"
    storage.write_text(str(target), "one")
    storage.write_text(str(target), "two")  # replaced through a renamed temp file
    assert storage.read_text(str(target)) == "two"
    assert os.listdir(target.parent) == ["f.txt"]


def test_shards_are_found_and_checked_in_s3(s3):
    _write_shards(f"{s3}/data/train")
    files = datafiles.resolve_parquet_files(f"{s3}/data/train", key="k")
    assert files == [f"{s3}/data/train/part-0.parquet", f"{s3}/data/train/part-1.parquet"]
    assert datafiles.resolve_parquet_files(f"{s3}/data/*/part-1.parquet", key="k") == files[1:]
    datafiles.check_columns(files, ["text", "label"], key="k")
    with pytest.raises(UserError, match=r"column\(s\) \['image'\] not in 's3://.*part-0.parquet'"):
        datafiles.check_columns(files, ["image"], key="k")
    assert datafiles.read_column_sample(files, "text", 7)[:2] == ["row 0 0", "row 0 1"]
    assert len(datafiles.manifest_digest(files)) == 64
    with pytest.raises(UserError, match=r"data path 's3://storage-test/nowhere' does not exist"):
        datafiles.resolve_parquet_files(f"{s3}/nowhere", key="data.unlabeled.path")
    storage.write_text(f"{s3}/notes/readme.txt", "not parquet")
    with pytest.raises(UserError, match="holds no .parquet files"):
        datafiles.resolve_parquet_files(f"{s3}/notes", key="k")


def test_checkpoints_load_straight_from_s3(s3, tmp_path):
    model = torch.nn.Linear(3, 2)
    local = save_checkpoint(
        tmp_path / "ckpt",
        module=model,
        spec={"type": "x", "config": {}},
        meta={"step": 7},
        train_state={"step": 7},
    )
    fs, path = storage.resolve(f"{s3}/runs/ckpt")
    pafs.copy_files(str(local), path, destination_filesystem=fs)
    other = torch.nn.Linear(3, 2)
    load_weights(f"{s3}/runs/ckpt", other)
    assert torch.equal(other.weight, model.weight)
    assert read_meta(f"{s3}/runs/ckpt")["step"] == 7
    assert load_train_state(f"{s3}/runs/ckpt")["step"] == 7
    with pytest.raises(CheckpointError, match="has no model.json"):
        read_spec(f"{s3}/runs/missing")
    assert storage.is_dir(f"{s3}/runs/ckpt") and not storage.is_dir(f"{s3}/runs/nothing")
    names = [f.rsplit("/", 1)[1] for f in storage.list_files(f"{s3}/runs/ckpt")]
    assert names == sorted(os.listdir(local))


def test_a_checkpoint_is_uploaded_whole_and_the_newest_found(s3, tmp_path):
    """What a one-worker fine-tuning trial does with its checkpoints in an object store."""
    from raypipe.engine.checkpoint import latest_checkpoint

    model = torch.nn.Linear(3, 2)
    for epoch in (1, 2):
        local = save_checkpoint(
            tmp_path / f"e{epoch}",
            module=model,
            spec={"type": "x", "config": {}},
            meta={"epoch": epoch},
            train_state={"epoch": epoch},
        )
        storage.upload_dir(local, f"{s3}/trial/epoch-{epoch:04d}", last="meta.json")
    assert [f.rsplit("/", 1)[1] for f in storage.list_files(f"{s3}/trial/epoch-0002")] == sorted(
        os.listdir(local)
    )
    # A newer checkpoint cut short (no weights) is passed over.
    storage.write_text(f"{s3}/trial/epoch-0003/meta.json", '{"epoch": 3}')
    path, state = latest_checkpoint(f"{s3}/trial", prefix="epoch-")
    assert path == f"{s3}/trial/epoch-0002" and state["epoch"] == 2
    storage.delete_dir(f"{s3}/trial/epoch-0002")
    storage.delete_dir(f"{s3}/trial/epoch-0003")
    assert latest_checkpoint(f"{s3}/trial", prefix="epoch-")[0] == f"{s3}/trial/epoch-0001"


def _raw(s3: str, **changes) -> dict:
    _write_shards(f"{s3}/q/unlabeled")
    raw = {
        "name": "s3",
        "storage": f"{s3}/runs",
        "data": {"unlabeled": {"path": f"{s3}/q/unlabeled"}},
        "tokenizer": {"vocab_size": 300},
        "model": {"dim": 16, "layers": 1, "heads": 2, "max_len": 16},
        "pretrain": {"max_steps": 2},
    }
    raw.update(changes)
    return raw


def test_object_store_needs_a_tracking_server(s3, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(UserError, match="set tracking.uri to an MLflow server"):
        preflight(parse_config(_raw(s3)))


def test_unusable_bucket_is_named_before_anything_runs(s3, tmp_path):
    tracking = {"uri": f"sqlite:///{tmp_path / 'm.db'}"}
    raw = _raw(s3, storage="s3://no-such-bucket/runs", tracking=tracking)
    with pytest.raises(UserError, match=r"storage: 's3://no-such-bucket/runs' is not writable"):
        preflight(parse_config(raw))
    inputs = preflight(parse_config(_raw(s3, tracking=tracking)))
    assert inputs.storage == f"{s3}/runs" and inputs.unlabeled[0].startswith(f"{s3}/q/")


def test_generated_data_is_never_written_to_an_object_store(s3, tmp_path):
    raw = {
        "name": "gen",
        "storage": str(tmp_path),
        "data": {
            "generate": "quickstart",
            "unlabeled": {"path": f"{s3}/gen/unlabeled"},
            "labeled": {"train": {"path": f"{s3}/gen/train"},
                        "validation": {"path": f"{s3}/gen/validation"}},
        },
        "pretrain": {"max_steps": 2},
    }  # fmt: skip
    with pytest.raises(UserError, match="data.generate: writes local files"):
        preflight(parse_config(raw))
