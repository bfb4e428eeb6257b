"""`finetune.sweep.time_budget_s`: the wall-clock seconds each arm's sweep may take, counted
across driver restarts.

The sweep's clock lives in its Tune folder as `budget.json` (plain JSON, raypipe's own), saved
every second while Tune runs: a sweep resumed after its driver died gets only what is left,
and a sweep whose budget is spent is not started again. Tune's own `time_budget_s` does the
cutting: when it runs out, running trials stop at their last reported epoch and pending ones
never start; the best checkpoint among the trials that did not fail stands.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from ray import tune

from raypipe import storage

BUDGET_FILE = "budget.json"


@dataclass(frozen=True)
class Budget:
    limit_s: float
    spent_s: float  # before this driver's part

    @property
    def left_s(self) -> float:
        return max(self.limit_s - self.spent_s, 0.0)


def read_budget(limit_s: float | None, sweep_dir: str) -> Budget | None:
    """The arm's budget and what earlier drivers spent of it (None: no budget set)."""
    if limit_s is None:
        return None
    path = storage.join(sweep_dir, BUDGET_FILE)
    spent = 0.0
    if storage.exists(path):
        try:
            spent = float(json.loads(storage.read_text(path))["spent_s"])
        except (ValueError, KeyError, TypeError):
            spent = 0.0  # an unreadable clock restarts; it never blocks a sweep
    return Budget(limit_s=float(limit_s), spent_s=spent)


class BudgetClock(tune.Callback):
    """Saves the sweep's spent seconds (earlier drivers' + this one's) while Tune runs."""

    def __init__(self, budget: Budget, sweep_dir: str):
        self.budget, self.path = budget, storage.join(sweep_dir, BUDGET_FILE)
        self.start = time.monotonic()
        self.saved_at = 0.0

    def spent_s(self) -> float:
        return self.budget.spent_s + time.monotonic() - self.start

    def save(self) -> None:
        self.saved_at = time.monotonic()
        storage.write_text(self.path, json.dumps({"spent_s": self.spent_s(),
                                                  "limit_s": self.budget.limit_s}))  # fmt: skip

    def setup(self, **info):
        self.start = time.monotonic()
        self.save()

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self.saved_at >= 1.0:
            self.save()

    def on_experiment_end(self, trials, **info):
        self.save()


def budget_line(label: str, *, limit_s: float, spent_s: float, cut: int, total: int) -> str:
    """The console's and summary's account of one arm's budget."""
    state = f"{cut} of {total} trial(s) cut" if cut else "nothing cut"
    return f"{label} {spent_s:.0f} s of {limit_s:.0f} s, {state}"
