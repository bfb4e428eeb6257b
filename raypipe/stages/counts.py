"""How many trials and repeats a fine-tuning sweep runs (no Ray: `raypipe validate --plan`
counts them too)."""

from __future__ import annotations

import math

from raypipe.config import FinetuneConfig, SweepConfig


def num_trials(sweep: SweepConfig) -> int:
    """Trials in one arm: num_samples times every grid point."""
    points = math.prod(len(d.grid) for d in sweep.space.values() if d.kind == "grid")
    return sweep.num_samples * points


def sweep_is_a_repeat(cfg: FinetuneConfig) -> bool:
    """A sweep of one setting picks nothing: its trial (the pipeline's seed, every epoch, the
    same for each arm) is the arms' first repeat, and only the other seeds run again. Not
    under PBT, whose one trial may change its settings as it goes."""
    return num_trials(cfg.sweep) == 1 and cfg.sweep.scheduler != "pbt"


def repeat_seeds(seed: int, cfg: FinetuneConfig) -> list[int]:
    """The seeds of the repeats: the same for every arm, so arm k and arm k are a pair. The
    first is the pipeline's own when the sweep's one trial is a repeat (`sweep_is_a_repeat`)."""
    if sweep_is_a_repeat(cfg):
        return [seed] + [seed + 1000 * k for k in range(1, cfg.repeats)]
    return [seed + 1000 * (k + 1) for k in range(cfg.repeats)]
