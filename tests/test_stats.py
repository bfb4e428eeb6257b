"""The verdict's statistics against independent computations (scipy's paired t-test)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from raypipe import stats


def test_mean_and_sd_are_numpys_with_one_degree_of_freedom():
    values = [0.61, 0.64, 0.58, 0.66]
    mean, sd = stats.mean_sd(values)
    assert mean == pytest.approx(np.mean(values)) and sd == pytest.approx(np.std(values, ddof=1))
    assert stats.mean_sd([0.5]) == (0.5, 0.0)


def test_the_paired_interval_is_scipys_paired_t_interval():
    pretrained = [0.64, 0.66, 0.61, 0.65, 0.63]
    scratch = [0.60, 0.61, 0.60, 0.62, 0.58]
    got = stats.paired_interval(pretrained, scratch)
    ref = scipy_stats.ttest_rel(pretrained, scratch).confidence_interval(0.95)
    assert got.low == pytest.approx(ref.low) and got.high == pytest.approx(ref.high)
    assert got.mean == pytest.approx(np.mean(np.subtract(pretrained, scratch)))
    assert got.n == 5 and got.excludes_zero


def test_a_gap_inside_the_noise_includes_zero_and_one_pair_has_no_interval():
    got = stats.paired_interval([0.60, 0.66, 0.59], [0.62, 0.61, 0.60])
    assert got.low < 0 < got.high and not got.excludes_zero
    # By hand: t(0.975, 2) = 4.3027; differences -0.02, 0.05, -0.01.
    d = [-0.02, 0.05, -0.01]
    half = 4.302652729911275 * np.std(d, ddof=1) / math.sqrt(3)
    assert got.high == pytest.approx(np.mean(d) + half, rel=1e-9)
    assert stats.paired_interval([0.6], [0.5]) is None
    with pytest.raises(ValueError, match="as many values"):
        stats.paired_interval([0.6, 0.7], [0.5])
