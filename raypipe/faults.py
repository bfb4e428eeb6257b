"""Injected faults, for the fault-tolerance tests: a worker that dies, hangs or raises, a loss
that turns NaN.

Read from the RAYPIPE_FAULTS environment variable on the driver and handed to the workers in
their loop config (a cluster's workers need not share the driver's environment). Unset in
normal use: `parse("")` is empty and `check` never fires.

    RAYPIPE_FAULTS="crash:pretrain:rank=1:at=6:once=/tmp/crashed;nan:pretrain:rank=0:at=9"

Each entry is `kind:place:key=value…`. kind `crash` ends the worker process at once (as a
preempted node would); `stall` blocks it for an hour (a test kills it meanwhile); `raise`
raises an error in the training loop (as a failed storage write would); `nan` poisons a
weight so the next loss is NaN. place is `pretrain` or
a trial name (`scratch-00001`); `at` is the step (pretrain) or epoch (trials). With `once=FILE`
the fault fires only while FILE does not exist, and creates it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

ENV = "RAYPIPE_FAULTS"


class InjectedFault(RuntimeError):
    """What a `raise` fault raises."""


@dataclass(frozen=True)
class Fault:
    kind: str
    place: str
    rank: int
    at: int
    once: str | None = None


def parse(spec: str | None) -> list[Fault]:
    out = []
    for entry in filter(None, (spec or "").split(";")):
        kind, place, *rest = entry.split(":")
        if kind not in ("crash", "stall", "raise", "nan"):
            raise ValueError(f"{ENV}: unknown fault kind {kind!r} in {entry!r}")
        keys = dict(item.split("=", 1) for item in rest)
        out.append(Fault(kind, place, int(keys.get("rank", 0)), int(keys["at"]), keys.get("once")))
    return out


def from_env() -> list[Fault]:
    return parse(os.environ.get(ENV))


def check(faults: list[Fault], *, place: str, rank: int, at: int) -> str | None:
    """The kind of the fault due here, if any ("crash" exits the process before returning,
    "stall" returns after an hour)."""
    for f in faults:
        if (f.place, f.rank, f.at) != (place, rank, at):
            continue
        if f.once:
            if Path(f.once).exists():
                continue
            Path(f.once).write_text(f"{f.kind} at {place} rank {rank} {at}\n")
        if f.kind == "crash":
            os._exit(17)
        if f.kind == "stall":
            time.sleep(3600)
        if f.kind == "raise":
            raise InjectedFault(f"injected fault at {place} rank {rank} {at}")
        return f.kind
    return None
