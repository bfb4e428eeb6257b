"""`budget`: the pipeline's worker-hours, how they split between its stages, and the clock
pretraining keeps of its share.

A worker-hour is one training worker held for an hour: pretraining spends num_workers times
its wall-clock time (from asking Ray Train for the workers to getting them back); a sweep
spends each running trial's workers for as long as it runs (stages/budget.py). Pretraining's
share is its own budget, less what the fine-tuning stages are promised; each task's
fine-tuning gets its own budget, or an equal share of what pretraining left of the
pipeline's. Every clock is saved in its stage's directory, so a restarted driver counts the
time before the crash.
"""

from __future__ import annotations

import json
import threading
import time

from raypipe import storage
from raypipe.config import PipelineConfig
from raypipe.errors import UserError
from raypipe.stages.budget import WORKER_FILE, Budget, worker_hours

HOUR = 3600.0


def pretrain_share_s(cfg: PipelineConfig, tasks: int) -> float | None:
    """Pretraining's worker-seconds: budget.pretrain_worker_hours, and at most what
    budget.worker_hours leaves after `tasks` fine-tuning stages' budget.finetune_worker_hours
    (None: no budget)."""
    b = cfg.budget
    caps = [b.pretrain_worker_hours * HOUR] if b.pretrain_worker_hours else []
    if b.worker_hours is not None:
        promised = tasks * (b.finetune_worker_hours or 0.0)
        caps.append((b.worker_hours - promised) * HOUR)
    return min(caps) if caps else None


def finetune_share_s(cfg: PipelineConfig, tasks: int, pretrain_spent_s: float) -> float | None:
    """One task's fine-tuning worker-seconds: budget.finetune_worker_hours, and at most an equal
    share of what pretraining (`pretrain_spent_s`) left of budget.worker_hours."""
    b = cfg.budget
    caps = [b.finetune_worker_hours * HOUR] if b.finetune_worker_hours else []
    if b.worker_hours is not None:
        left = b.worker_hours * HOUR - pretrain_spent_s
        if left <= 0:
            raise UserError(
                f"budget.worker_hours: pretraining spent {worker_hours(pretrain_spent_s)}, the "
                f"whole budget ({worker_hours(b.worker_hours * HOUR)}): nothing is left to "
                "fine-tune; raise budget.worker_hours or lower budget.pretrain_worker_hours"
            )
        caps.append(left / tasks)
    return min(caps) if caps else None


def pipeline_spent(cfg: PipelineConfig, pretrain_s: float, tasks: list[dict]) -> dict | None:
    """The pipeline's worker-seconds: pretraining's and each task's sweeps' (`tasks`: each
    task's arms, as the summary holds them); None without a worker-hour budget."""
    b = cfg.budget
    if not any((b.worker_hours, b.pretrain_worker_hours, b.finetune_worker_hours)):
        return None
    sweeps = sum((a.get("budget") or {}).get("worker_spent_s", 0.0)
                 for arms in tasks for a in arms.values())  # fmt: skip
    limit = b.worker_hours * HOUR if b.worker_hours is not None else None
    return {"limit_s": limit, "spent_s": pretrain_s + sweeps, "pretrain_s": pretrain_s,
            "finetune_s": sweeps}  # fmt: skip


class StageClock:
    """A stage's worker-seconds (earlier drivers' + this one's: `workers` times the time
    inside the `with`), saved in its directory every second from a thread, and at the end."""

    def __init__(self, budget: Budget, directory: str, *, workers: int):
        self.budget, self.workers = budget, workers
        self.path = storage.join(directory, WORKER_FILE)
        self.start = time.monotonic()
        self.ended: float | None = None  # the spend at the end of the `with`, once it ended
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raypipe-budget", daemon=True)

    def spent_s(self) -> float:
        if self.ended is not None:
            return self.ended
        return self.budget.spent_s + self.workers * (time.monotonic() - self.start)

    def deadline(self) -> float:
        """The wall-clock moment (time.time()) the budget runs out at, with these workers."""
        return time.time() + self.budget.left_s / self.workers

    def save(self) -> None:
        storage.write_text(self.path, json.dumps({"spent_s": self.spent_s(),
                                                  "limit_s": self.budget.limit_s}))  # fmt: skip

    def _run(self) -> None:
        while not self._done.wait(1.0):
            try:
                self.save()
            except Exception:  # the clock only matters after a crash: it never ends a stage
                pass

    def __enter__(self) -> StageClock:
        self.start = time.monotonic()
        self.save()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.ended = self.spent_s()
        self.save()
