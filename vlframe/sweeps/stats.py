"""The statistics of a seeded sweep: a metric's spread over seeds, its interval, and whether two
variants differ by more than that spread.

- ``summary``: mean, sample standard deviation and a 95% Student-t interval over seeds (with
  2 or more seeds; one seed has no spread, and no interval is claimed).
- ``paired``: a paired t-test between two variants over the seeds both ran (seed s of one
  against seed s of the other: each seed shares initialisation and data order, so pairing
  removes that part of the noise); two-sided p-value, mean difference and its 95% interval.
- ``paired_bootstrap``: for metrics that are a mean over test items (retrieval recall, per-image
  CIDEr), a paired bootstrap over the items within the seeds: the items are resampled with
  replacement (the same resample for every seed) and the difference of the two variants' means,
  averaged over seeds, recomputed each time. It measures how much the test set's sampling moves
  a difference, needs no extra training and works with one seed.

scipy gives the t quantiles and tail probabilities, and the bootstrap (``scipy.stats.bootstrap``,
percentile method).
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


@dataclass(frozen=True)
class Bootstrap:
    items: int  # test items both variants scored in every shared seed
    seeds: int
    difference: float  # mean over items and seeds of (variant - baseline)
    low: float | None  # 95% percentile interval of the difference
    high: float | None
    p: float | None  # two-sided: twice the smaller share of resamples on either side of 0 (ties half)

    def significant(self, alpha: float = ALPHA) -> bool:
        return self.p is not None and self.p < alpha


#: Bootstrap resamples: enough that a p-value near 0.05 is resolved to about +-0.005.
RESAMPLES = 9999


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


def paired_bootstrap(variant: Mapping[int, Mapping[str, float]], baseline: Mapping[int, Mapping[str, float]], *,
                     resamples: int = RESAMPLES, seed: int = 0) -> Bootstrap:
    """``variant`` and ``baseline``: per seed, each test item's score (the metric is their mean).

    Only the seeds both have, and the items both scored in every one of those seeds, count. Each
    item's difference is averaged over the seeds first, so one resample of the items is shared by
    every seed (the test set is the same in each); its mean is the statistic resampled.
    """
    import numpy as np
    from scipy.stats import bootstrap

    seeds = sorted(set(variant) & set(baseline))
    if not seeds:
        return Bootstrap(0, 0, math.nan, None, None, None)
    keys = set.intersection(*(set(variant[s]) & set(baseline[s]) for s in seeds))
    order = sorted(keys)
    diffs = np.array([[float(variant[s][k]) - float(baseline[s][k]) for k in order] for s in seeds], dtype=np.float64)
    diffs = diffs[:, np.isfinite(diffs).all(axis=0)].mean(axis=0) if order else np.empty(0)
    n = int(diffs.size)
    if n == 0:
        return Bootstrap(0, len(seeds), math.nan, None, None, None)
    mean = float(diffs.mean())
    if n < 2 or float(np.ptp(diffs)) == 0.0:  # nothing to resample: every item moved by the same amount
        return Bootstrap(n, len(seeds), mean, mean, mean, None if mean == 0 or n < 2 else 0.0)
    import inspect

    generator = {"rng" if "rng" in inspect.signature(bootstrap).parameters else "random_state":  # scipy < 1.15
                 np.random.default_rng(seed)}
    result = bootstrap((diffs,), np.mean, n_resamples=resamples, confidence_level=LEVEL, method="percentile",
                       batch=max(1, 4_000_000 // n), **generator)
    dist = result.bootstrap_distribution
    ties = 0.5 * float((dist == 0).sum())  # a resample exactly at 0 counts half to each side (mid-p)
    below, above = float((dist < 0).sum()) + ties, float((dist > 0).sum()) + ties
    p = min(1.0, 2 * (min(below, above) + 1) / (resamples + 1))
    low, high = result.confidence_interval
    return Bootstrap(n, len(seeds), mean, float(low), float(high), p)


__all__ = ["ALPHA", "LEVEL", "RESAMPLES", "Bootstrap", "Paired", "Summary", "paired", "paired_bootstrap", "summary"]
