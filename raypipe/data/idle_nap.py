"""A pause for Ray Data's scheduling loop when it goes round without doing anything.

The streaming executor's loop blocks in `ray.wait` (up to 0.1 s) until a task has output.
Held back (the read-ahead limit reached, the trainer's batches already waiting), it does not
block: its read tasks' next outputs are ready, only not taken, so `ray.wait` returns at once
and the loop goes round again and again, changing nothing. In the driver that holds the GIL
against the training step; in a Ray Train split coordinator it takes a core (P1 in
BENCHMARKS.md). `IdleNap` sleeps NAP_S after a quick step that moved nothing: no task
submitted or finished, no block made, received or taken by any operator. A step that moves
anything, and the one after it, run at Ray's pace.
"""

from __future__ import annotations

import time

from ray.data._internal.execution.execution_callback import ExecutionCallback

NAP_S = 0.02
#: What each operator has done so far, from its runtime metrics: a step that changes none of
#: them did nothing.
COUNTS = ("num_tasks_submitted", "num_tasks_finished", "num_task_outputs_generated",
          "num_inputs_received", "num_outputs_taken")  # fmt: skip


def progress(executor) -> tuple | None:
    """Every operator's counts (None: this Ray's executor does not show them, and the loop
    runs as Ray made it)."""
    try:
        return tuple(getattr(op.metrics, c) for op in executor._topology for c in COUNTS)
    except (AttributeError, TypeError):
        return None


class IdleNap(ExecutionCallback):
    def __init__(self):
        self.last: tuple | None = None
        self.at = time.monotonic()

    def on_execution_step(self, executor) -> None:
        now, seen = time.monotonic(), progress(executor)
        if seen is not None and seen == self.last and now - self.at < NAP_S:
            time.sleep(NAP_S)
        self.last, self.at = seen, time.monotonic()


def nap_when_idle(ds):
    """`ds` with IdleNap among its execution callbacks (its own context: no other dataset's)."""
    ctx = ds.context
    if IdleNap not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes = [*ctx.custom_execution_callback_classes, IdleNap]
    return ds
