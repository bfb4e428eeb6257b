"""What a training loop needs from where it runs: the `Session` protocol, and a plain in-memory
session for tests and benchmarks.

The loops (`engine/pretrain_loop.py`, `engine/finetune_loop.py`) call only these methods, so the
same loop runs in a Ray Train worker, in a Tune trial's process (the sessions in
`stages/sessions.py`) and here, without Ray.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from raypipe.engine.checkpoint import latest_checkpoint, save_into

if TYPE_CHECKING:
    from raypipe.tracking import MetricsLogger

#: save(directory) -> the checkpoint directory written: how a loop hands over a checkpoint.
Save = Any


class Session(Protocol):
    rank: int
    world: int
    device: torch.device
    logger: MetricsLogger

    def batches(
        self,
        name: str,
        *,
        batch_size: int,
        drop_last: bool = True,
        shuffle_buffer: int | None = None,
        shuffle_seed: int | None = None,
        prefetch: int = 1,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """One epoch of dataset `name` (this rank's share), as tensor batches on `device`."""

    def wrap(self, module: nn.Module, *, find_unused_parameters: bool) -> nn.Module:
        """The module to train: DDP around it with several ranks, itself with one."""

    def resumed(self) -> contextlib.AbstractContextManager[str | None]:
        """The checkpoint directory this run continues from, or None for a fresh start."""

    def record(self, metrics: dict[str, Any], *, save: Save | None, checkpoint_name: str) -> None:
        """Every rank calls this; rank 0's `save(directory)` writes the checkpoint, if any."""

    def reclaim_notice(self) -> float | None:
        """Whether a node this run trains on is about to be reclaimed (spot preemption): its
        deadline in UNIX seconds (`math.inf` when none was given), the same answer on every
        rank; None while there is no notice. Every rank calls it at the same steps."""


class RecordingLogger:
    """A logger that keeps what it is given: [(step, metrics)] and the params."""

    def __init__(self):
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.params: dict[str, Any] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def flush(self, timeout: float) -> bool:
        return True

    def close(self, timeout: float = 0.0) -> None:
        pass

    def series(self, key: str) -> list[float]:
        return [m[key] for _, m in self.metrics if key in m]


class MemorySession:
    """One rank, no Ray: each dataset is a dict of tensors (columns of rows), batched here in
    order, or in a seeded random order when a shuffle is asked for; checkpoints go to
    `checkpoint_dir`, newest `num_to_keep` kept, and a new session over the same directory
    resumes from the newest."""

    rank, world = 0, 1

    def __init__(
        self,
        datasets: dict[str, dict[str, torch.Tensor]],
        *,
        checkpoint_dir: str | Path,
        prefix: str,
        device: str | torch.device = "cpu",
        num_to_keep: int | None = 2,
    ):
        self.datasets = datasets
        self.checkpoint_dir, self.prefix = str(checkpoint_dir), prefix
        self.device = torch.device(device)
        self.num_to_keep = num_to_keep
        self.logger = RecordingLogger()
        self.records: list[dict[str, Any]] = []
        #: {step: deadline}: the reclaim notice this session gives once that step is done
        self.reclaims: dict[int, float] = {}
        self._steps_asked = 0

    def batches(
        self,
        name: str,
        *,
        batch_size: int,
        drop_last: bool = False,
        shuffle_buffer: int | None = None,
        shuffle_seed: int | None = None,
        prefetch: int = 1,
    ) -> Iterator[dict[str, torch.Tensor]]:
        columns = self.datasets[name]
        rows = len(next(iter(columns.values())))
        if shuffle_buffer:
            order = torch.randperm(rows, generator=torch.Generator().manual_seed(shuffle_seed or 0))
        else:
            order = torch.arange(rows)
        for start in range(0, rows, batch_size):
            idx = order[start : start + batch_size]
            if drop_last and len(idx) < batch_size:
                return
            yield {k: v[idx].to(self.device) for k, v in columns.items()}

    def wrap(self, module: nn.Module, *, find_unused_parameters: bool) -> nn.Module:
        return module

    @contextlib.contextmanager
    def resumed(self):
        found = latest_checkpoint(self.checkpoint_dir, prefix=self.prefix)
        yield found[0] if found else None

    def reclaim_notice(self) -> float | None:
        self._steps_asked += 1  # asked once a step
        return next((d for at, d in self.reclaims.items() if self._steps_asked >= at), None)

    def record(self, metrics: dict[str, Any], *, save: Save | None, checkpoint_name: str) -> None:
        if save is not None:
            save_into(self.checkpoint_dir, checkpoint_name, save, num_to_keep=self.num_to_keep)
        self.records.append(dict(metrics))
