"""The statistics of a seeded sweep: a metric's spread over seeds, its interval, and whether two
variants differ by more than that spread.

- ``summary``: mean, sample standard deviation and a 95% Student-t interval over seeds (with
  2 or more seeds; one seed has no spread, and no interval is claimed).
- ``paired``: a paired t-test between two variants over the seeds both ran (seed s of one
  against seed s of the other: each seed shares initialisation and data order, so pairing
  removes that part of the noise); two-sided p-value, mean difference and its 95% interval.

scipy (installed with mlflow, which requires it) gives the t quantiles and tail probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

LEVEL = 0.95
ALPHA = 1 - LEVEL


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float | None  # sample standard deviation (None with one seed)
    low: float | None  # 95% t interval of the mean
    high: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.low is None else (self.high - self.low) / 2


@dataclass(frozen=True)
class Paired:
    n: int
    difference: float  # mean of (variant - baseline) over the shared seeds
    low: float | None
    high: float | None
    p: float | None  # two-sided paired t-test (None below 2 pairs, or when every difference is equal)

    def significant(self, alpha: float = ALPHA) -> bool:
        return self.p is not None and self.p < alpha


def _t_quantile(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(1 - ALPHA / 2, df))


def summary(values: Sequence[float]) -> Summary:
    values = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(values)
    if n == 0:
        return Summary(0, math.nan, None, None, None)
    mean = sum(values) / n
    if n < 2:
        return Summary(1, mean, None, None, None)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = _t_quantile(n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def paired(variant: Mapping[int, float], baseline: Mapping[int, float]) -> Paired:
    """``variant`` and ``baseline``: a metric's value by seed."""
    from scipy.stats import t

    seeds = sorted(s for s in set(variant) & set(baseline)
                   if math.isfinite(variant[s]) and math.isfinite(baseline[s]))
    diffs = [float(variant[s]) - float(baseline[s]) for s in seeds]
    n = len(diffs)
    if n == 0:
        return Paired(0, math.nan, None, None, None)
    mean = sum(diffs) / n
    if n < 2:
        return Paired(n, mean, None, None, None)
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if std == 0:  # every seed moved by exactly the same amount: no spread to test against
        return Paired(n, mean, mean, mean, None if mean == 0 else 0.0)
    se = std / math.sqrt(n)
    stat = mean / se
    p = float(2 * t.sf(abs(stat), n - 1))
    half = _t_quantile(n - 1) * se
    return Paired(n, mean, mean - half, mean + half, p)


__all__ = ["ALPHA", "LEVEL", "Paired", "Summary", "paired", "summary"]
