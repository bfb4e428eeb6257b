"""Ray's sessions for the training loops (the `Session` protocol of engine/session.py).

- `TrainSession`: a loop inside Ray Train, in a TorchTrainer worker (several: DDP) or in the
  driver under Ray Train's local mode.
- `TrialSession`: a one-worker fine-tuning trial in its own Tune process, with no TorchTrainer.

And `scaling_config`, the workers a section asks for, as Ray Train's ScalingConfig.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.data
import ray.train
import ray.train.torch
import torch
from ray import tune
from ray.train import ScalingConfig

from raypipe import storage
from raypipe.config import ScalingConfig as ScalingSection
from raypipe.engine.checkpoint import latest_checkpoint, save_into
from raypipe.stages.checkpoint_models import CheckpointRecorder
from raypipe.tracking import RunRef, logger_for

#: Ray Train's switch for its preemption watcher (on unless "0"; raypipe's local Ray sets "0").
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def _iterate(data, device: torch.device, *, batch_size: int, drop_last: bool = False,
             shuffle_buffer: int | None = None, shuffle_seed: int | None = None,
             prefetch: int = 1):  # fmt: skip
    return data.iter_torch_batches(
        batch_size=batch_size,
        drop_last=drop_last,
        device=device,
        prefetch_batches=prefetch,
        pin_memory=device.type == "cuda",  # then the copy to the GPU does not block
        local_shuffle_buffer_size=shuffle_buffer,
        local_shuffle_seed=shuffle_seed,
    )


def record_in_train(
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


class TrainSession:
    """A loop inside Ray Train. `checkpoints` + `prefix`: resume from the newest whole
    checkpoint in that storage directory (Ray Train's own record lags one behind after a
    crash); without them, from the checkpoint Ray Train hands a restarted worker group.
    `keep_here`: write checkpoints straight to `checkpoints` (local mode persists none), and
    run the training stream's execution in a coordinator actor (see `batches`)."""

    def __init__(self, run: RunRef | None, *, checkpoints: str | None = None, prefix: str = "",
                 keep_here: bool = False, num_to_keep: int | None = None,
                 recorder: CheckpointRecorder | None = None):  # fmt: skip
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.logger = logger_for(run, self.rank)
        self._checkpoints, self._prefix = checkpoints, prefix
        self._into = checkpoints if keep_here else None
        self._num_to_keep = num_to_keep
        self._here = keep_here
        self._shards: dict[str, Any] = {}
        #: records each checkpoint in MLflow as it is written (rank 0; needs `checkpoints`)
        self._recorder = recorder if self.rank == 0 and checkpoints else None

    def batches(self, name: str, **kwargs):
        """Dataset `name`'s batches. In the driver (Ray Train's local mode hands the loop the
        dataset itself), the training stream is one `streaming_split`, as a Train worker's is:
        Ray Data's executor then runs in its coordinator actor, a process of its own, instead
        of in this one, where its scheduling loop would take the GIL from the step."""
        if name not in self._shards:
            shard = ray.train.get_dataset_shard(name)
            if self._here and name == "train" and isinstance(shard, ray.data.Dataset):
                shard = shard.streaming_split(1)[0]
            self._shards[name] = shard
        return _iterate(self._shards[name], self.device, **kwargs)

    def wrap(self, module: torch.nn.Module, *, find_unused_parameters: bool) -> torch.nn.Module:
        kwargs = {"find_unused_parameters": True} if find_unused_parameters else None
        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs=kwargs)

    @contextlib.contextmanager
    def resumed(self):
        if self._checkpoints is not None:
            found = latest_checkpoint(self._checkpoints, prefix=self._prefix)
            yield found[0] if found else None
            return
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield d

    def record(self, metrics: dict[str, Any], *, save, checkpoint_name: str) -> None:
        record_in_train(
            metrics, rank=self.rank, save=save, checkpoint_name=checkpoint_name,
            into=self._into, num_to_keep=self._num_to_keep,
        )  # fmt: skip
        if save is not None and self._recorder is not None:
            self._recorder.add(storage.join(self._checkpoints, checkpoint_name))

    def reclaim_notice(self) -> float | None:
        """Ray Train's preemption notice (`ray.train.get_preemption_info`, agreed across the
        workers). Not asked where Ray's preemption watcher is off (raypipe's embedded local
        Ray: one machine is not preempted), which saves a call to Ray's synchronization
        actor each step."""
        if os.environ.get(PREEMPTION_WATCHER, "1") == "0":
            return None
        info = ray.train.get_preemption_info()
        if info is None:
            return None
        return info.deadline_ms / 1000 if info.deadline_ms else math.inf


#: How often a one-worker trial asks Ray whether its node is draining (a GCS call).
RECLAIM_POLL_S = 1.0


def draining_deadline(node_id: str) -> float | None:
    """The deadline (UNIX seconds; `math.inf` if none) of a drain of node `node_id` (a spot
    reclaim notice, as `ray drain-node` or the autoscaler gives it), or None. Ray Train's
    preemption watcher asks Ray Core the same; a failed call is no notice."""
    try:
        drains = ray._private.state.state.get_draining_nodes() or {}
    except Exception:  # noqa: BLE001 - a GCS hiccup: ask again at the next poll
        return None
    if node_id not in drains:
        return None
    return drains[node_id] / 1000 if drains[node_id] else math.inf


class TrialSession:
    """A one-worker fine-tuning trial in the Tune trial's own process, with no TorchTrainer: no
    controller and worker processes to start and no dataset split to coordinate for each
    trial. Checkpoints go to the same place with the same names as a TorchTrainer's; a trial
    that Tune restarts (a crash, a restarted driver) continues from its newest one."""

    rank, world = 0, 1

    def __init__(self, run: RunRef | None, *, run_dir: str, prefix: str, datasets: dict,
                 use_gpu: bool, num_to_keep: int | None, to_tune: bool):  # fmt: skip
        self.run_dir, self.prefix, self.datasets = run_dir, prefix, datasets
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.num_to_keep, self.to_tune = num_to_keep, to_tune
        self.logger = logger_for(run, 0)
        self.last_metrics: dict[str, Any] | None = None
        self._watch = os.environ.get(PREEMPTION_WATCHER, "1") != "0"
        self._polled, self._notice = -math.inf, None

    def batches(self, name: str, **kwargs):
        return _iterate(self.datasets[name], self.device, **kwargs)

    def wrap(self, module: torch.nn.Module, *, find_unused_parameters: bool) -> torch.nn.Module:
        return module

    @contextlib.contextmanager
    def resumed(self):
        found = latest_checkpoint(self.run_dir, prefix=self.prefix)
        yield found[0] if found else None

    def reclaim_notice(self) -> float | None:
        """A drain of this trial's node (no Ray Train here to watch for it): asked of Ray at
        most every RECLAIM_POLL_S; never where Ray's preemption watcher is off (raypipe's
        embedded local Ray)."""
        now = time.monotonic()
        if self._watch and self._notice is None and now - self._polled >= RECLAIM_POLL_S:
            self._polled = now
            self._notice = draining_deadline(ray.get_runtime_context().get_node_id())
        return self._notice

    def record(self, metrics: dict[str, Any], *, save, checkpoint_name: str) -> None:
        if save is not None:
            save_into(self.run_dir, checkpoint_name, save, num_to_keep=self.num_to_keep)
        self.last_metrics = metrics
        if self.to_tune:
            tune.report(metrics)


def scaling_config(section: ScalingSection) -> ScalingConfig:
    """Ray Train's scaling for a `scaling` section: its workers and what each one holds."""
    resources = {"CPU": section.cpus_per_worker, **section.resources_per_worker}
    if section.use_gpu:
        resources["GPU"] = 1
    return ScalingConfig(
        num_workers=section.num_workers,
        use_gpu=section.use_gpu,
        resources_per_worker=resources,
    )
