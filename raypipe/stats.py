"""The statistics of a verdict: mean and standard deviation over seeds, and the paired
interval of a gap (pretrained - scratch on the same seeds and rows)."""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Named in the summary, so a reader knows what the interval is.
METHOD = "paired t"


def mean_sd(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_interval(a: list[float], b: list[float], level: float = 0.95) -> Interval | None:
    """The `level` confidence interval of mean(a - b) over pairs, by Student's t on the paired
    differences; None for fewer than two pairs."""
    from scipy.stats import t

    if len(a) != len(b):
        raise ValueError(f"pairs need as many values on each side, got {len(a)} and {len(b)}")
    if len(a) < 2:
        return None
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean, sd = mean_sd(diffs)
    half = t.ppf(0.5 + level / 2, df=len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return Interval(mean, mean - half, mean + half, len(diffs), level)
