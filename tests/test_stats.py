import itertools
import math

import numpy as np
import pytest

from interplab import stats


def enumerate_splits(a, b):
    """Every split of the pooled values into groups of len(a) and len(b): mean differences, by itertools."""
    pooled = np.array(list(a) + list(b), dtype=float)
    out = []
    for chosen in itertools.combinations(range(len(pooled)), len(a)):
        rest = [i for i in range(len(pooled)) if i not in chosen]
        out.append(pooled[list(chosen)].mean() - pooled[rest].mean())
    return np.array(out)


@pytest.mark.parametrize("a, b", [([3.1, 2.0, 5.5], [1.0, 0.2, 2.2, 0.9, 4.0, 1.1]),
                                  ([0.5, -1.0], [0.1, 0.4, -0.3, 0.0, 0.2]),
                                  ([1.0, 2.0, 3.0, 4.0], [2.5, 3.5, 0.5, 1.5])])
def test_exact_permutation_test_equals_itertools_enumeration(a, b):
    diffs = enumerate_splits(a, b)
    observed = np.mean(a) - np.mean(b)
    tol = 1e-9
    greater, less = (diffs >= observed - tol).mean(), (diffs <= observed + tol).mean()
    for alternative, expect in (("greater", greater), ("less", less), ("two-sided", min(1.0, 2 * min(greater, less)))):
        test = stats.permutation_test(a, b, seed=0, alternative=alternative)
        assert test.exact and test.arrangements == len(diffs) == math.comb(len(a) + len(b), len(a))
        assert test.p == pytest.approx(expect, abs=1e-12)
        assert test.observed == pytest.approx(observed)
        assert test.min_p == (2 if alternative == "two-sided" else 1) / len(diffs)
        assert test.p >= test.min_p


def test_smallest_attainable_p_is_reached_by_the_most_extreme_split():
    # 2 runs above all 20 draws: the 2-vs-20 figure, 2 / C(22, 2) = 0.0087
    test = stats.permutation_test([10.0, 11.0], list(np.linspace(0, 1, 20)), seed=0)
    assert test.p == pytest.approx(2 / 231) == test.min_p
    assert round(test.min_p, 4) == 0.0087
    one_sided = stats.permutation_test([10.0, 11.0], list(np.linspace(0, 1, 20)), seed=0, alternative="greater")
    assert one_sided.p == pytest.approx(1 / 231)
    text = test.describe()
    assert "two-sided" in text and "mean(a) - mean(b)" in text and "2 vs 20" in text and "0.0087" in text


def test_sampled_permutation_test_states_its_resamples():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1, 10), rng.normal(0.0, 1, 30)
    sampled = stats.permutation_test(a, b, seed=0, max_exact=1000, resamples=4999)
    assert not sampled.exact and sampled.resamples == 4999 and sampled.min_p == pytest.approx(2 / 5000)
    exact_gap = stats.permutation_test(a, b, seed=1, max_exact=1000, resamples=4999)
    assert abs(sampled.p - exact_gap.p) < 0.02  # two independent samplings agree to Monte Carlo error
    assert "smallest attainable 4.0e-04" in sampled.describe()  # below 0.001 a p keeps its digits, not 0.0000
    with pytest.raises(ValueError, match="alternative"):
        stats.permutation_test(a, b, seed=0, alternative="bigger")
    with pytest.raises(ValueError, match="non-empty"):
        stats.permutation_test([], b, seed=0)
    with pytest.raises(ValueError, match="finite"):
        stats.permutation_test([1.0, float("nan")], b, seed=0)
