"""What a sweep may spend, counted across driver restarts: `finetune.sweep.time_budget_s`
(wall-clock seconds of each arm's sweep) and its arm's share of `budget.finetune_worker_hours`
(worker-seconds: each running trial's training workers, for as long as it runs).

Each clock lives in the sweep's Tune folder (`budget.json`, `worker_budget.json`: plain JSON,
raypipe's own), saved every second while Tune runs: a sweep resumed after its driver died
gets only what is left, and a sweep whose budget is spent is not started again. Tune does the
cutting (its `time_budget_s`, and `SpentStopper` as the run's stopper): running trials stop at
their last reported epoch and pending ones never start; the best checkpoint among the trials
that did not fail stands.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from ray import tune
from ray.tune.experiment import Trial

from raypipe import storage

BUDGET_FILE = "budget.json"  # wall-clock seconds
WORKER_FILE = "worker_budget.json"  # worker-seconds


@dataclass(frozen=True)
class Budget:
    limit_s: float
    spent_s: float  # before this driver's part

    @property
    def left_s(self) -> float:
        return max(self.limit_s - self.spent_s, 0.0)


def read_spent(directory: str, file: str) -> float:
    """The seconds recorded in `directory`/`file` (0 when there is none, or it is unreadable:
    a clock restarts; it never blocks a stage)."""
    path = storage.join(directory, file)
    if not storage.exists(path):
        return 0.0
    try:
        return float(json.loads(storage.read_text(path))["spent_s"])
    except (ValueError, KeyError, TypeError):
        return 0.0


def read_budget(limit_s: float | None, sweep_dir: str, file: str = BUDGET_FILE) -> Budget | None:
    """The arm's budget and what earlier drivers spent of it (None: no budget set)."""
    if limit_s is None:
        return None
    return Budget(limit_s=float(limit_s), spent_s=read_spent(sweep_dir, file))


class BudgetClock(tune.Callback):
    """Saves the sweep's spent seconds (earlier drivers' + this one's) while Tune runs: wall
    clock, or with `workers` (each trial's training workers) worker-seconds, the running
    trials' workers times the time between Tune's loop steps."""

    def __init__(self, budget: Budget, sweep_dir: str, *, file: str = BUDGET_FILE,
                 workers: int | None = None):  # fmt: skip
        self.budget, self.path, self.workers = budget, storage.join(sweep_dir, file), workers
        self.start = self.ticked = time.monotonic()
        self.counted = 0.0  # worker-seconds of this driver's part
        self.saved_at = 0.0

    def spent_s(self) -> float:
        if self.workers is None:
            return self.budget.spent_s + time.monotonic() - self.start
        return self.budget.spent_s + self.counted

    def save(self) -> None:
        self.saved_at = time.monotonic()
        storage.write_text(self.path, json.dumps({"spent_s": self.spent_s(),
                                                  "limit_s": self.budget.limit_s}))  # fmt: skip

    def setup(self, **info):
        self.start = self.ticked = time.monotonic()
        self.save()

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if self.workers is not None:
            running = sum(t.status == Trial.RUNNING for t in trials)
            self.counted += running * self.workers * (now - self.ticked)
        self.ticked = now
        if now - self.saved_at >= 1.0:
            self.save()

    def on_experiment_end(self, trials, **info):
        self.save()


class SpentStopper(tune.Stopper):
    """Tune's stopper for a worker-second budget: the whole sweep stops once it is spent."""

    def __init__(self, clock: BudgetClock):
        self.clock = clock

    def __call__(self, trial_id, result):
        return False

    def stop_all(self):
        return self.clock.spent_s() >= self.clock.budget.limit_s


def worker_hours(seconds: float) -> str:
    """Worker-seconds as worker-hours, to three significant figures."""
    return f"{seconds / 3600:.3g} worker-h"


def spends_text(*, limit_s: float | None = None, spent_s: float | None = None,
                worker_limit_s: float | None = None, worker_spent_s: float | None = None) -> str:  # fmt: skip
    """Each budget's spend: "12 s of 60 s and 0.01 worker-h of 0.02 worker-h"."""
    spends = []
    if limit_s is not None:
        spends.append(f"{spent_s:.0f} s of {limit_s:.0f} s")
    if worker_limit_s is not None:
        spends.append(f"{worker_hours(worker_spent_s)} of {worker_hours(worker_limit_s)}")
    return " and ".join(spends)


def budget_line(label: str, *, cut: int, total: int, **spends: float) -> str:
    """The console's and summary's account of one arm's budgets."""
    state = f"{cut} of {total} trial(s) cut" if cut else "nothing cut"
    return f"{label} {spends_text(**spends)}, {state}"
