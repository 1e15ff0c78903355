"""Declared comparisons of a study (``study.compare``): is a difference between two arms real?

Each arm of a comparison is a set of seeds of one cell group; the difference of the arms'
means gets a confidence interval from Welch's t (unequal variances, Welch-Satterthwaite degrees
of freedom), and the verdict says which arm is higher only when the interval excludes zero.
With three seeds the interval is wide on purpose: a difference it cannot resolve is reported as
not resolved, never as a win.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Interval", "welch_interval", "verdict", "LEVEL"]

#: the confidence level of every interval in a study report
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """``mean(a) - mean(b)`` with its confidence interval ``[low, high]`` at ``level``."""

    difference: float
    low: float
    high: float
    dof: float
    level: float = LEVEL


def _mean_var(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def welch_interval(a: Sequence[float], b: Sequence[float], *, level: float = LEVEL) -> Interval | None:
    """Welch's interval of ``mean(a) - mean(b)``; ``None`` when an arm has fewer than two values
    (no spread to judge a difference by).  Two arms without any spread (every seed equal) give
    the difference itself as a zero-width interval."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy.stats import t

    mean_a, var_a = _mean_var(a)
    mean_b, var_b = _mean_var(b)
    diff = mean_a - mean_b
    sa, sb = var_a / len(a), var_b / len(b)
    se = math.sqrt(sa + sb)
    if se == 0.0:
        return Interval(diff, diff, diff, math.inf, level)
    dof = (sa + sb) ** 2 / (sa**2 / (len(a) - 1) + sb**2 / (len(b) - 1))
    half = float(t.ppf(0.5 + level / 2, dof)) * se
    return Interval(diff, diff - half, diff + half, dof, level)


def verdict(interval: Interval | None, a: str, b: str, *, higher_is_better: bool = True) -> str:
    """What the interval says, in words: which arm is better, or that it is not resolved."""
    if interval is None:
        return "needs >= 2 seeds per arm"
    if interval.low <= 0 <= interval.high and not (interval.low == interval.high == 0):
        return "not resolved (the interval contains 0)"
    if interval.difference == 0:
        return "equal on every seed"
    a_higher = interval.difference > 0
    return f"{a if a_higher == higher_is_better else b} better"
