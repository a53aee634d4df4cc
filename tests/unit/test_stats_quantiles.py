"""Quantile intervals: exact binomial coverage, agreement with numpy, Monte Carlo, speed."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from extproc.stats import quantile_ci, quantile_difference
from extproc.stats.quantiles import QuantileMethod, order_statistic_ranks
from extproc.stats.results import Alternative

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("q", [0.5, 0.95, 0.99])
@pytest.mark.parametrize("n", [50, 137, 369, 1000, 20_000])
def test_order_statistic_ranks_have_exact_binomial_coverage(q: float, n: int) -> None:
    """P(X_(l) > xi) = P(Bin <= l - 1) <= alpha, and the bound is the tightest such rank."""
    alpha = 0.025
    lo = order_statistic_ranks(n, q, alpha, "lower")
    hi = order_statistic_ranks(n, q, alpha, "upper")
    if lo >= 1:
        assert stats.binom.cdf(lo - 1, n, q) <= alpha < stats.binom.cdf(lo, n, q)
    if hi <= n:
        assert stats.binom.sf(hi - 1, n, q) <= alpha < stats.binom.sf(hi - 2, n, q)


def test_small_samples_cannot_bound_p99_from_above() -> None:
    x = np.arange(1.0, 101.0)
    ci = quantile_ci(x, 0.99)
    assert ci.high == math.inf
    assert math.isfinite(ci.low)
    assert quantile_ci([], 0.5).width == math.inf


def test_quantile_ci_coverage_monte_carlo() -> None:
    rng = np.random.default_rng(2)
    truth = math.exp(0.8 * stats.norm.ppf(0.95))  # lognormal(0, 0.8) p95
    samples = rng.lognormal(0.0, 0.8, size=(2000, 400))
    hits = sum(quantile_ci(row, 0.95).contains(truth) for row in samples)
    assert hits / 2000 >= 0.95 - 3 * math.sqrt(0.95 * 0.05 / 2000)


@pytest.mark.parametrize("method", ["order-statistic", "bootstrap"])
def test_point_estimates_are_numpy_inverted_cdf(method: QuantileMethod) -> None:
    rng = np.random.default_rng(3)
    c, t = rng.lognormal(6.7, 0.8, 3001), rng.lognormal(6.8, 0.8, 997)
    result = quantile_difference(c, t, q=0.95, method=method)
    assert result.control_quantile == np.quantile(c, 0.95, method="inverted_cdf")
    assert result.treatment_quantile == np.quantile(t, 0.95, method="inverted_cdf")
    assert result.estimate == result.treatment_quantile - result.control_quantile
    assert result.ci.contains(result.estimate)
    assert result.relative_ci is not None
    assert result.relative_ci.contains(result.relative_estimate or 0)


@pytest.mark.parametrize("method", ["order-statistic", "bootstrap"])
def test_difference_interval_coverage_under_a_shift(method: QuantileMethod) -> None:
    """Candidate p90 is 20% higher; the interval for the ratio should cover 0.2 >= 95% of runs."""
    rng = np.random.default_rng(4)
    runs, hits = 300, 0
    for _ in range(runs):
        c = rng.lognormal(0.0, 0.8, 2000)
        t = 1.2 * rng.lognormal(0.0, 0.8, 500)
        result = quantile_difference(c, t, q=0.9, method=method, n_boot=500)
        assert result.relative_ci is not None
        hits += result.relative_ci.contains(0.2)
    assert hits / runs >= 0.95 - 3 * math.sqrt(0.05 * 0.95 / runs)


@pytest.mark.parametrize("alternative", ["greater", "less"])
def test_one_sided_difference_bounds(alternative: Alternative) -> None:
    rng = np.random.default_rng(5)
    c, t = rng.lognormal(0, 0.8, 5000), 1.5 * rng.lognormal(0, 0.8, 1000)
    result = quantile_difference(c, t, q=0.99, alternative=alternative)
    if alternative == "greater":
        assert result.ci.high == math.inf
        assert result.ci.low > 0
    else:
        assert result.ci.low == -math.inf
        assert result.ci.high > result.estimate


def test_bootstrap_is_reproducible_and_seeded() -> None:
    rng = np.random.default_rng(6)
    c, t = rng.lognormal(0, 0.8, 1000), rng.lognormal(0, 0.8, 1000)
    a = quantile_difference(c, t, method="bootstrap", seed=7)
    b = quantile_difference(c, t, method="bootstrap", seed=7)
    other = quantile_difference(c, t, method="bootstrap", seed=8)
    assert a == b
    assert a.ci != other.ci


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="q must"):
        quantile_ci([1.0], 1.0)
    with pytest.raises(ValueError, match="NaN"):
        quantile_ci([1.0, math.nan], 0.5)
    with pytest.raises(ValueError, match="n_boot"):
        quantile_difference([1.0], [2.0], method="bootstrap", n_boot=10)
    with pytest.raises(ValueError, match="method"):
        quantile_difference([1.0], [2.0], method="magic")  # type: ignore[arg-type]
    empty = quantile_difference([], [1.0, 2.0])
    assert math.isnan(empty.control_quantile)
    assert empty.relative_ci is None
