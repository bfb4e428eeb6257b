"""What both Ray stages share: scaling, checkpoint reporting, batch iteration, error unwrapping."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import ScalingConfig

from raypipe import storage
from raypipe.config import PreprocessConfig
from raypipe.config import ScalingConfig as ScalingSection
from raypipe.engine.checkpoint import META_FILE, MODEL_FILE, load_train_state, read_meta
from raypipe.errors import UserError


def scaling_config(section: ScalingSection) -> ScalingConfig:
    resources = {"CPU": section.cpus_per_worker, **section.resources_per_worker}
    if section.use_gpu:
        resources["GPU"] = 1
    return ScalingConfig(
        num_workers=section.num_workers,
        use_gpu=section.use_gpu,
        resources_per_worker=resources,
    )


def preprocess_args(section: PreprocessConfig | None) -> dict[str, Any]:
    """Ray Data map arguments: CPUs only (preprocessing never holds a GPU), optional cap."""
    section = section or PreprocessConfig()
    args: dict[str, Any] = {"num_cpus": section.cpus_per_task, "num_gpus": 0}
    if section.concurrency is not None:
        args["concurrency"] = section.concurrency
    return args


def save_into(run_dir: str, name: str, save, *, num_to_keep: int | None) -> str:
    """Write checkpoint `run_dir/name` with `save(dir)` straight to storage, whole or not at
    all, and keep only the newest `num_to_keep` (as Train's CheckpointConfig does): for
    training that runs without Ray Train workers, whose checkpoints Train does not persist."""
    path = storage.join(run_dir, name)
    if storage.is_remote(path):
        with tempfile.TemporaryDirectory() as tmp:
            storage.upload_dir(save(Path(tmp) / "checkpoint"), path, last=META_FILE)
    else:
        save(Path(path))  # written whole or not at all
    if num_to_keep is not None:
        older = sorted({f.rsplit("/", 2)[-2] for f in storage.list_files(run_dir, META_FILE)})
        for stale in older[:-num_to_keep]:
            storage.delete_dir(storage.join(run_dir, stale))
    return path


def report(
    metrics: dict[str, Any],
    *,
    rank: int,
    save=None,
    checkpoint_name: str | None = None,
    into: str | None = None,
    num_to_keep: int | None = None,
) -> None:
    """Every rank calls this (it is a barrier); rank 0 writes the checkpoint via `save(dir)`.
    With `into` (one worker in the driver: Ray Train's local mode keeps no checkpoint), the
    checkpoint goes straight to `into/checkpoint_name` (see `save_into`)."""
    if save is None:
        ray.train.report(metrics)
        return
    if into is not None:
        save_into(into, checkpoint_name, save, num_to_keep=num_to_keep)
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            path = save(Path(tmp) / "checkpoint")
            checkpoint = ray.train.Checkpoint.from_directory(str(path))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name)


def latest_checkpoint(directory: str, *, prefix: str) -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint `directory/<prefix>…` in storage that loads whole: (path, train
    state). Names sort by age (zero-padded counts).

    Read from storage rather than from Ray Train's record, which registers a checkpoint a
    moment after its report and so, after a crash, can point one interval back. A checkpoint
    cut short by the crash fails to load and the one before it is taken.
    """
    dirs = {m.rsplit("/", 1)[0] for m in storage.list_files(directory, META_FILE)}
    for path in sorted((d for d in dirs if d.rsplit("/", 1)[-1].startswith(prefix)), reverse=True):
        try:
            state = load_train_state(path)
            read_meta(path)
            storage.read_bytes(storage.join(path, MODEL_FILE))
        except Exception:  # noqa: BLE001 - any damage means "not this one"
            continue
        return path, state
    return None


@ray.remote(num_cpus=0)
class Tally:
    """A count that Ray Data tasks add to (e.g. images skipped as undecodable)."""

    def __init__(self):
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n

    def get(self) -> int:
        return self.count


def skip_bad_images(ds, *, image_column: str, channels: int, batch_size: int, preprocess, tally):
    """Put the undecodable-row filter in front of a dataset's decoding transform."""
    from raypipe.data.vision import drop_undecodable

    return ds.map_batches(
        drop_undecodable,
        batch_format="numpy",
        batch_size=batch_size,
        fn_kwargs={"image_column": image_column, "channels": channels, "tally": tally},
        **preprocess_args(preprocess),
    )


def find_user_error(exc: BaseException) -> UserError | None:
    """Ray wraps errors raised in workers and tasks; dig out a raypipe UserError if there is one."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(e, UserError) and not isinstance(cause, UserError):
            # Ray Data appends its retry advice to the message; the user's line comes first.
            lines = str(e).strip().splitlines()
            return e if len(lines) <= 1 else UserError(lines[0])
        for attr in ("__cause__", "__context__", "cause"):
            inner = getattr(e, attr, None)
            if isinstance(inner, BaseException):
                stack.append(inner)
        # Train V2 collects per-worker errors in a dict.
        for attr in ("worker_failures", "_worker_failures"):
            failures = getattr(e, attr, None)
            if isinstance(failures, dict):
                stack.extend(v for v in failures.values() if isinstance(v, BaseException))
        for arg in getattr(e, "args", ()):
            if isinstance(arg, BaseException):
                stack.append(arg)
    return None
