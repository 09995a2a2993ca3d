"""Statistics over seeds for the study report: the mean with a 95% confidence interval (Student
t), and paired differences against a baseline on the same seed and partition.

The t quantiles are exact to three decimals for 1-30 degrees of freedom (the usual table), and
from the Cornish-Fisher expansion of the t distribution around the normal quantile beyond,
which is within 0.001 of the exact value there.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

Z_975 = 1.959963984540054  # the standard normal's 0.975 quantile
# t_{0.975, df} for df = 1..30 (any statistics table)
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


@dataclass(frozen=True)
class Interval:
    """A mean over n values and the half-width of its 95% confidence interval (None: n = 1)."""

    mean: float
    half_width: float | None
    n: int

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    def text(self, signed: bool = False) -> str:
        sign = "+" if signed else ""
        if self.half_width is None:
            return f"{self.mean:{sign}.4f} (n=1, no CI)"
        return f"{self.mean:{sign}.4f} ± {self.half_width:.4f}"


def mean_ci(values: list[float]) -> Interval:
    """Mean and 95% CI half-width ``t_{0.975, n-1} * s / sqrt(n)`` (s: sample std)."""
    if not values:
        raise ValueError("no values")
    n = len(values)
    mean = statistics.fmean(values)
    if n == 1:
        return Interval(mean, None, 1)
    return Interval(mean, t_975(n - 1) * statistics.stdev(values) / math.sqrt(n), n)


@dataclass(frozen=True)
class Paired:
    """Differences ``value - baseline`` matched by seed: their interval and how many are > 0."""

    interval: Interval
    wins: int

    def text(self) -> str:
        return f"{self.interval.text(signed=True)}, won {self.wins}/{self.interval.n}"


def paired(values: dict[int, float], baseline: dict[int, float]) -> Paired | None:
    """Compare two groups seed by seed (keys: seeds); None when no seed is in both."""
    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        return None
    diffs = [values[s] - baseline[s] for s in seeds]
    return Paired(mean_ci(diffs), sum(d > 0 for d in diffs))
