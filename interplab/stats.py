"""Statistics for the experiments' claims: intervals, bootstrap, permutation tests, percentiles.

One home, on `scipy.stats` where it has the test, so every table in interplab states its uncertainty
the same way and every random resample comes from an explicit seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from . import checks


def t_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): a Student-t interval for the mean; (mean, nan, nan) for fewer than two values."""
    x = checks.sample(values, "t_interval's values", finite=False)  # a NaN metric stays NaN in the table
    level = checks.number(level, "level", above=0, high=1)
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    sem = float(x.std(ddof=1) / math.sqrt(x.size))
    if sem == 0:
        return mean, mean, mean
    low, high = stats.t.interval(level, x.size - 1, loc=mean, scale=sem)
    return mean, float(low), float(high)


def bootstrap_ci(values, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` `[n]` (resamples drawn from `seed`)."""
    values = checks.sample(values, "a bootstrap interval's values", at_least=2)
    checks.number(confidence, "confidence", above=0, high=1)
    n_resamples, seed = checks.count(n_resamples, "n_resamples"), checks.seed(seed)
    if np.all(values == values[0]):
        return float(values[0]), float(values[0])
    res = stats.bootstrap((values,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                          method="percentile", random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


@dataclass(frozen=True)
class PermutationTest:
    """A two-sample permutation test of the difference of means, with everything a table must state.

    statistic: `mean(a) - mean(b)`; alternative: "two-sided", "greater" (a above b) or "less";
    p: the p-value; exact: True when every one of the `arrangements` = C(n_a + n_b, n_a) splits of the
    pooled values was enumerated (otherwise `resamples` random splits); min_p: the smallest p this test
    can return for these group sizes, whatever the data (2 / arrangements two-sided, 1 / arrangements
    one-sided; 2 / (resamples + 1) and 1 / (resamples + 1) when sampled).
    """

    observed: float
    p: float
    alternative: str
    n_a: int
    n_b: int
    exact: bool
    arrangements: int
    resamples: int
    min_p: float
    statistic: str = "mean(a) - mean(b)"

    def describe(self) -> str:
        how = "exact, all" if self.exact else f"{self.resamples} random of"
        show = lambda p: f"{p:.4f}" if p >= 1e-3 else f"{p:.1e}"  # noqa: E731  (a small p keeps its digits)
        return (f"{self.alternative} permutation test of {self.statistic}, {self.n_a} vs {self.n_b} "
                f"({how} {self.arrangements} splits): p = {show(self.p)} (smallest attainable {show(self.min_p)})")


def permutation_test(a, b, seed: int, alternative: str = "two-sided", max_exact: int = 200_000,
                     resamples: int = 99_999) -> PermutationTest:
    """Permutation test of `mean(a) - mean(b)` for two independent samples (`scipy.stats.permutation_test`).

    Exact enumeration of every split of the pooled values into groups of `len(a)` and `len(b)` when there
    are at most `max_exact` splits, else `resamples` random splits drawn from `seed`. One-sided p-values
    count the splits at least as extreme in the named direction (the observed split included); the
    two-sided p is twice the smaller one-sided p, capped at 1 (scipy's convention), so its smallest value
    is 2 / C(n_a + n_b, n_a) however extreme the data.
    """
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}")
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or b.ndim != 1 or a.size < 1 or b.size < 1:
        raise ValueError(f"a permutation test needs two non-empty 1-d samples, got shapes {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("a permutation test needs finite values; a NaN or inf would make every p meaningless")
    arrangements = math.comb(a.size + b.size, a.size)
    exact = arrangements <= max_exact
    n = arrangements if exact else resamples
    test = stats.permutation_test((a, b), lambda x, y, axis: x.mean(axis) - y.mean(axis), vectorized=True,
                                  permutation_type="independent", alternative=alternative,
                                  n_resamples=n if exact else resamples, random_state=np.random.default_rng(seed))
    sides = 2 if alternative == "two-sided" else 1
    smallest = sides / arrangements if exact else sides / (resamples + 1)
    return PermutationTest(float(a.mean() - b.mean()), float(test.pvalue), alternative, a.size, b.size, exact,
                           arrangements, 0 if exact else resamples, min(1.0, smallest))


def standing(value: float, null) -> tuple[float, float]:
    """Where `value` falls among draws `null` `[n]`: `(percentile, p)`.

    percentile: 100 x (share of draws below + half the ties); p: the one-sided
    permutation p-value `(1 + #draws >= value) / (1 + n)` that a draw scores at least as high.
    """
    null = checks.sample(null, "the null draws")
    value = checks.number(value, "value")
    below, ties = (null < value).sum(), (null == value).sum()
    return float(100 * (below + ties / 2) / null.size), float((1 + (null >= value).sum()) / (1 + null.size))


def hierarchical_means(values, groups, n_resamples: int = 2000, seed: int = 0,
                       seed_stream: int = 0) -> np.ndarray:
    """Means `[n_resamples]` of a two-level bootstrap of `values` `[S, C]` (S training seeds x C units).

    Each resample draws S seeds with replacement, then, inside every group of `groups` `[C]` (a fold:
    its units share one trained edit per seed), as many units as the group has, with replacement; the
    statistic is the mean of the drawn seeds' values at the drawn units. The units are drawn from
    `default_rng(seed)` and the seeds from `default_rng([seed, 1, seed_stream])`, so two calls with the same
    `groups` and `seed` draw the same units (paired) and, given different `seed_stream`s, independent seeds.
    """
    values = np.asarray(values, dtype=float)
    groups = np.asarray(groups)
    if values.ndim != 2 or values.shape[1] != groups.shape[0] or values.size == 0:
        raise ValueError(f"values must be [seeds, units] with units = len(groups); got {values.shape} and "
                         f"{groups.shape[0]} groups")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    units = np.empty((n_resamples, groups.size), dtype=np.int64)
    start = 0
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        units[:, start:start + members.size] = rng.choice(members, size=(n_resamples, members.size))
        start += members.size
    n_seeds = values.shape[0]
    seed_rng = np.random.default_rng([seed, 1, seed_stream])  # not [seed, 0]: numpy seeds that like `seed`
    seeds = seed_rng.integers(0, n_seeds, size=(n_resamples, n_seeds))
    return values[seeds[:, :, None], units[:, None, :]].mean(axis=(1, 2))


def hierarchical_ci(values, groups, confidence: float = 0.95, n_resamples: int = 2000,
                    seed: int = 0) -> tuple[float, float, float]:
    """`(mean, low, high)`: the mean of `values` `[S, C]` with a percentile interval from `hierarchical_means`."""
    means = hierarchical_means(values, groups, n_resamples, seed)
    tail = 100 * (1 - confidence) / 2
    return float(np.mean(values)), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def hierarchical_diff_ci(a, b, groups, confidence: float = 0.95, n_resamples: int = 2000,
                         seed: int = 0) -> tuple[float, float, float]:
    """`(mean, low, high)` of mean(a) - mean(b), `a` `[Sa, C]` and `b` `[Sb, C]` on the same units.

    Units are resampled jointly (paired), seeds independently per arm.
    """
    da = hierarchical_means(a, groups, n_resamples, seed, seed_stream=0)
    db = hierarchical_means(b, groups, n_resamples, seed, seed_stream=1)
    tail = 100 * (1 - confidence) / 2
    diff = da - db
    return (float(np.mean(a) - np.mean(b)), float(np.percentile(diff, tail)),
            float(np.percentile(diff, 100 - tail)))
