"""Every checkpoint a stage keeps, recorded in MLflow as one of MLflow 3's logged models, so
checkpoints compare side by side in the experiment's Models tab: a pretraining checkpoint with
its step, loss and what it had seen; a fine-tuning trial's (or repeat's) kept epoch with its
train and validation metrics and its hyperparameters.

The weights stay where raypipe keeps them (safetensors in `storage`; the logged model's
`raypipe.checkpoint` tag says where): a logged model here is a record with no artifacts, never
a second copy. A pretraining checkpoint is recorded as it is written (by the rank that wrote
it, on a thread of its own: `CheckpointRecorder`), so the history stays in MLflow after
`pretrain.num_checkpoints_to_keep` has pruned its files; and from the driver when a stage ends
(and again when it is reused), adding only what is missing: each checkpoint once.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from raypipe import storage, tracking
from raypipe.engine.checkpoint import META_FILE
from raypipe.progress import console
from raypipe.tracking import Tag

MODEL_TYPE = "raypipe-checkpoint"
#: What a checkpoint's meta.json holds, by kind.
REQUIRED = {"pretrain": {"step"}, "trial": {"trial", "epoch"}}
#: Pretraining checkpoint facts recorded as metrics (by the unit it counts, for items_seen).
_PRETRAIN_FACTS = ("loss", "samples_seen", "train_flops")


def _pretrain_record(meta: dict[str, Any]) -> tuple[str, int, dict, dict]:
    step = int(meta["step"])
    metrics = {k: meta[k] for k in _PRETRAIN_FACTS if isinstance(meta.get(k), int | float)}
    if isinstance(meta.get("items_seen"), int | float):
        metrics[f"{meta.get('unit', 'items')}_seen"] = meta["items_seen"]
    return f"pretrain-step-{step:08d}", step, metrics, {"objective": str(meta.get("objective"))}


def _trial_record(meta: dict[str, Any]) -> tuple[str, int, dict, dict]:
    epoch = int(meta["epoch"])
    metrics = {k: v for k, v in (meta.get("metrics") or {}).items()
               if isinstance(v, int | float) and k != "epoch" and not k.startswith("perf/")}  # fmt: skip
    params = {k: str(v) for k, v in (meta.get("hyperparameters") or {}).items()}
    return f"{meta['trial']}-epoch-{epoch:04d}", epoch, metrics, params


class CheckpointRecorder:
    """Records each checkpoint of a pretraining run as it is written, on one thread (the
    step loop does not wait for MLflow). `close` waits for what is queued. Never fails the
    run: a store that cannot take them is said once (the stage's end tries again)."""

    def __init__(self, run: tracking.RunRef):
        self.run = run
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="raypipe-checkpoint-models")
        self._failed = False

    def add(self, path: str) -> None:
        self._pool.submit(self._record, path)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _record(self, path: str) -> None:
        from mlflow.tracking import MlflowClient

        try:
            meta = json.loads(storage.read_text(storage.join(path, META_FILE)))
            name, step, metrics, params = _pretrain_record(meta)
            client = MlflowClient(tracking_uri=self.run.tracking_uri)
            _record(client, self.run.experiment_id, self.run.run_id, name, step, metrics,
                    params, path)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - a record for the UI: never worth a run
            if not self._failed:
                self._failed = True
                console.line(f"[mlflow] could not record checkpoint {path} as a logged model "
                             f"({e}); the stage's end tries again")  # fmt: skip


def record_checkpoints(run: tracking.RunRef, folder: str, *, kind: str) -> int:
    """Record each checkpoint under `folder` (kind "pretrain" or "trial") as a logged model of
    `run`'s experiment; returns how many were new. A pretraining checkpoint's source is `run`
    (the pretrain run), a trial's its own trial run (a child of `run`); its metrics go on that
    run as `checkpoint/<metric>` at the checkpoint's step or epoch. Never fails a stage: a
    store that cannot take them is said once."""
    from mlflow.tracking import MlflowClient

    describe = _pretrain_record if kind == "pretrain" else _trial_record
    client = MlflowClient(tracking_uri=run.tracking_uri)
    try:
        known = _recorded_paths(client, run.experiment_id)
        sources = {} if kind == "pretrain" else {
            r.info.run_name: r.info.run_id for r in tracking.child_runs(run)
        }  # fmt: skip
        new = 0
        for meta_file in storage.list_files(folder, META_FILE):
            meta = json.loads(storage.read_text(meta_file))
            if not REQUIRED[kind] <= meta.keys():
                continue  # not a checkpoint's meta.json
            name, step, metrics, params = describe(meta)
            if meta_file.rsplit("/", 1)[0] not in known:
                source = sources.get(meta.get("trial"), run.run_id)
                _record(client, run.experiment_id, source, name, step, metrics, params,
                        meta_file.rsplit("/", 1)[0])  # fmt: skip
                new += 1
        return new
    except Exception as e:  # noqa: BLE001 - a record for the UI: never worth a stage
        console.line(f"[mlflow] could not record checkpoints as logged models ({e})")
        return 0


def _recorded_paths(client, experiment_id: str) -> set[str]:
    """The checkpoints already recorded in the experiment (by their storage path)."""
    paths, token = set(), None
    while True:
        page = client.search_logged_models([experiment_id], page_token=token)
        paths |= {m.tags.get(Tag.CHECKPOINT) for m in page if m.model_type == MODEL_TYPE}
        token = page.token
        if not token:
            return paths


def _record(client, experiment_id: str, run_id: str, name: str, step: int, metrics: dict,
            params: dict, path: str) -> None:  # fmt: skip
    from mlflow.entities import Metric

    model = client.create_logged_model(
        experiment_id, name=name, source_run_id=run_id, params=params, model_type=MODEL_TYPE,
        tags={Tag.CHECKPOINT: path, "raypipe.step": str(step)},
    )  # fmt: skip
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[
        Metric(f"checkpoint/{k}", float(v), now, step, model_id=model.model_id)
        for k, v in metrics.items()
    ])  # fmt: skip
    client.finalize_logged_model(model.model_id, "READY")
