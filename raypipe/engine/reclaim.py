"""Spot preemption. For both loops, the wait after a node reclaim notice (`wait_for_reclaim`).
For fine-tuning, the just-in-time checkpoint a trial writes mid-epoch on that notice, and the
resume from it, so the batches of that epoch already trained are not trained (or logged) again.
(Pretraining's step checkpoints already resume at any step.)

The checkpoint `<trial dir>/reclaim-<step>` holds the weights, optimizer, schedule and RNG at
the step of the notice, the epoch in progress and how many of its batches were done, their
summed training stats, and the best metric so far. It is not a result: it has no metrics and
names no trial (the sweep's search for a trial's best checkpoint passes it by), and it is
deleted once its epoch's training is over.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from raypipe import storage
from raypipe.engine.checkpoint import latest_checkpoint, read_meta

#: A reclaim checkpoint's name: `reclaim-<optimizer step, 8 digits>`.
RECLAIM_PREFIX = "reclaim-"
#: How long past a reclaim deadline a loop waits for Ray to take its workers down; a node
#: still here then was not reclaimed after all, and training goes on.
RECLAIM_GRACE_S = 120.0


@dataclass
class EpochPoint:
    """Where a trial is inside one epoch: what a reclaim checkpoint records."""

    epoch: int  # the epoch in progress
    best: float | None = None  # the best sweep metric of the epochs before it
    done: int = 0  # batches of it trained
    totals: dict[str, torch.Tensor] = field(default_factory=dict)  # their summed stats
    noticed: bool = False  # a reclaim notice came (in this epoch or before): one is enough
    written: str | None = None  # the reclaim checkpoint this epoch wrote or resumed from

    def next(self, best: float | None) -> EpochPoint:
        return EpochPoint(epoch=self.epoch + 1, best=best, noticed=self.noticed)

    def state(self) -> dict[str, Any]:
        """What train_state.pt keeps of it (tensors on the CPU; loads with weights_only)."""
        return {
            "epoch": self.epoch,
            "done_in_epoch": self.done,
            "best": self.best,
            "totals": {k: torch.as_tensor(v).detach().cpu() for k, v in self.totals.items()},
        }


def wait_for_reclaim(deadline: float) -> None:
    """No more steps until the node is gone (Ray takes the workers down at the deadline) or,
    past the deadline and its grace, turns out to stay. Without a deadline: go on at once."""
    if math.isfinite(deadline):
        time.sleep(max(deadline + RECLAIM_GRACE_S - time.time(), 0.0))


def same_settings(a: Any, b: Any) -> bool:
    """Settings equal as they are written to meta.json (JSON: tuples become lists)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def find(directory: str, *, hp: dict, fingerprint: str) -> tuple[str, dict[str, Any]] | None:
    """The newest whole reclaim checkpoint in `directory` written with these settings (and
    this stage's fingerprint): (path, train state), or None."""
    found = latest_checkpoint(directory, prefix=RECLAIM_PREFIX)
    if found is None:
        return None
    meta = read_meta(found[0])
    if not (
        same_settings(meta.get("hyperparameters"), hp) and meta.get("fingerprint") == fingerprint
    ):
        return None
    return found


def discard(point: EpochPoint) -> None:
    """The epoch's training is over: its reclaim checkpoint is not needed again."""
    if point.written is not None:
        storage.delete_dir(point.written)
        point.written = None
