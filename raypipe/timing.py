"""Cold start: wall-clock marks from the `raypipe run` process's start to the first step.

The driver marks its milestones (imports, checks, Ray start, dataset planning) in `MARKS`;
the pretrain workers add theirs (worker start, model ready, first batch, first step) and rank
0 logs them all as `startup/*` metrics and one progress line. Wall clocks (`time.time()`), so
marks taken in different processes on one machine line up; across machines they are as good
as the nodes' clock sync.
"""

from __future__ import annotations

import os
import time

#: Milestone name -> wall-clock time, in the order they happen.
MARKS: dict[str, float] = {}

#: Each milestone and what the span before it covers (the span from the previous mark).
SPANS = {
    "checks": "Python, torch, config, data, storage and tracking checks (before Ray starts)",
    "imports": "MLflow, Ray Train and Tune imports",
    "ray": "Ray start (or connect)",
    "setup": "tokenizer and model plan, stage bookkeeping",
    "dataset": "dataset planning",
    "workers": "Ray Train worker start",
    "model": "model built and wrapped (DDP/FSDP), optimizer",
    "first_batch": "first batch through Ray Data",
    "first_step": "first optimizer step",
}


def process_start() -> float:
    """When this process started (wall clock), from the kernel's record of it (Linux), else
    the first mark."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return MARKS.get("checks", time.time())


def mark(name: str) -> None:
    """Record milestone `name` once (a resumed or repeated stage keeps the first time)."""
    MARKS.setdefault(name, time.time())


def breakdown(marks: dict[str, float], start: float) -> dict[str, float]:
    """Seconds spent in each span, in milestone order, plus `total` (start -> last mark)."""
    out, previous = {}, start
    for name in SPANS:
        if name in marks:
            out[name] = max(0.0, marks[name] - previous)
            previous = marks[name]
    out["total"] = previous - start
    return out


def describe(spans: dict[str, float]) -> str:
    parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in spans.items() if k != "total")
    return f"first step {spans['total']:.1f} s after process start ({parts})"
