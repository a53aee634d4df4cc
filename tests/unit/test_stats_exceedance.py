"""Exceedance e-processes, ceilings and design effects, each checked against an independent
computation: numerical integration (scipy), exact enumeration, statsmodels, or Monte Carlo."""

from __future__ import annotations

import math

import numpy as np
import pytest
import statsmodels.api as sm
from scipy import integrate, stats

from extproc.stats import RunningMoments, proportion_harm_test, quantile_harm_test
from extproc.stats.clustered import column_design_effect, design_effect
from extproc.stats.exceedance import (
    beyond,
    deflated_share_test,
    exceedance_log_e,
    mean_ceiling_test,
    quantile_exceedance_test,
    rate_ceiling_test,
)
from extproc.stats.sequential import _mixture_tuning

pytestmark = pytest.mark.timeout(120)


def test_exceedance_e_value_is_the_beta_mixture_likelihood_ratio() -> None:
    """The e-value against ``p <= p0`` equals the likelihood ratio integrated over the
    Beta(p0 s, (1 - p0) s) prior restricted to p > p0, computed here with scipy's quad."""
    k, n, p0, alpha, events = 9, 400, 0.01, 0.01, 20
    s = events / (p0 * _mixture_tuning(alpha))
    prior = stats.beta(p0 * s, (1 - p0) * s)

    def lr(p: float) -> float:
        return float(np.exp(stats.binom.logpmf(k, n, p) - stats.binom.logpmf(k, n, p0)))

    num, _ = integrate.quad(lambda p: lr(p) * prior.pdf(p), p0, 1, points=[0.02, 0.05], limit=400)
    expected = num / prior.sf(p0)
    got = exceedance_log_e(k, n, p0, alpha=alpha, tightest_at_events=events)
    assert math.exp(got) == pytest.approx(expected, rel=1e-6)
    below = exceedance_log_e(0, n, p0, alpha=alpha, tightest_at_events=events, below=True)
    num_b, _ = integrate.quad(
        lambda p: float(np.exp(n * (math.log1p(-p) - math.log1p(-p0)))) * prior.pdf(p), 0, p0
    )
    assert math.exp(below) == pytest.approx(num_b / prior.cdf(p0), rel=1e-6)


@pytest.mark.parametrize("p0", [0.01, 0.05, 0.3])
def test_rate_ceiling_is_anytime_valid_by_exact_enumeration(p0: float) -> None:
    """P(the e-value ever reaches 1/alpha within 600 trials) at the boundary rate, computed
    exactly by dynamic programming over the count (no Monte Carlo error): at most alpha."""
    alpha, horizon = 0.05, 600
    dist = np.zeros(horizon + 2)
    dist[0] = 1.0  # probability of each count among paths that have not crossed yet
    crossed = 0.0
    for n in range(1, horizon + 1):
        new = dist * (1 - p0)
        new[1:] += dist[:-1] * p0
        for k in range(n + 1):
            if new[k] and rate_ceiling_test(k, n, p0, alpha=alpha).harm:
                crossed += new[k]
                new[k] = 0.0
        dist = new
    assert 0.0 < crossed <= alpha


def test_rate_ceiling_detects_and_mirrors() -> None:
    assert rate_ceiling_test(40, 400, 0.02, alpha=0.01).harm  # 10% against a 2% ceiling
    assert not rate_ceiling_test(9, 400, 0.02, alpha=0.01).harm
    assert rate_ceiling_test(2, 2000, 0.02, alpha=0.01, below=True).harm  # provably below
    assert not rate_ceiling_test(0, 0, 0.02).ready


def test_mean_ceiling_e_value_is_the_half_normal_mixture() -> None:
    """Against the one-sided normal mixture integrated numerically over the drift."""
    m = RunningMoments.of(np.random.default_rng(3).normal(105.0, 20.0, 400))
    alpha, tightest, ceiling = 0.05, 1000, 100.0
    se2 = m.variance / m.count
    tau2 = _mixture_tuning(alpha) * m.variance / tightest
    diff = m.mean - ceiling

    def integrand(d: float) -> float:
        return (
            2
            * stats.norm.pdf(d, scale=math.sqrt(tau2))
            * math.exp(d * diff / se2 - d * d / (2 * se2))
        )

    expected, _ = integrate.quad(integrand, 0, 50 * math.sqrt(tau2))
    got = mean_ceiling_test(m, ceiling, alpha=alpha, tightest_at=tightest)
    assert got.e_value == pytest.approx(expected, rel=1e-6)
    deff = mean_ceiling_test(m, ceiling, alpha=alpha, tightest_at=tightest, design_effect=4.0)
    assert deff.e_value < got.e_value  # clustering: less evidence from the same data
    assert not mean_ceiling_test(RunningMoments.of([1.0] * 10), 0.5).ready


def test_tail_test_is_the_event_share_test_on_the_exceedance_counts() -> None:
    rng = np.random.default_rng(5)
    c, t = rng.lognormal(0, 0.8, 5000), rng.lognormal(0.1, 0.8, 300)
    ref = float(np.quantile(c, 0.99))
    got = quantile_exceedance_test(c, t, ref, margin=0.2, alpha=0.01)
    k_t = int(np.sum(t > 1.2 * ref))
    k_c = int(np.sum(c > ref))
    assert beyond(t, 1.2 * ref) == k_t
    same = proportion_harm_test(k_c, c.size, k_t, t.size, alpha=0.01)
    assert got.e_value == same.e_value
    assert got.margin == 0.2
    with pytest.raises(ValueError, match="reference"):
        quantile_exceedance_test(c, t, 0.0)


def _tail_alarm_rate(
    rng: np.random.Generator,
    runs: int,
    stages: list[tuple[int, int]],
    candidate_scale: float,
    *,
    sigma: float = 0.8,
    drift: float = 0.0,
    q: float = 0.99,
    margin: float = 0.0,
    alpha: float = 0.05,
) -> float:
    """Share of simulated ramps where the carried tail test fires; the reference of stage k is
    stable's q-quantile of stage k - 1 (stage 0 only measures it). ``drift`` multiplies both
    arms' latency by exp(drift) more at every stage and linearly within it."""
    alarms = 0
    for _ in range(runs):
        carried, ref = 0.0, None  # one stage-prior weight, as a product martingale
        for k, (n_c, n_t) in enumerate(stages):
            ramp_c = np.exp(drift * (k + np.linspace(0, 1, n_c)))
            ramp_t = np.exp(drift * (k + np.linspace(0, 1, n_t)))
            c = ramp_c * np.exp(sigma * rng.standard_normal(n_c))
            t = candidate_scale * ramp_t * np.exp(sigma * rng.standard_normal(n_t))
            if ref is not None:
                log_e = 0.0
                for look in range(1, 11):
                    r = quantile_exceedance_test(
                        c[: n_c * look // 10],
                        t[: n_t * look // 10],
                        ref,
                        margin=margin,
                        alpha=alpha,
                    )
                    log_e = math.log(r.e_value) if r.e_value > 0 else -math.inf
                    if carried + log_e >= -math.log(alpha):
                        alarms += 1
                        break
                else:
                    carried += log_e
                    continue
                break
            ref = float(np.quantile(c, q))
    return alarms / runs


def test_tail_test_carried_over_stages_holds_alpha_with_heavy_tails_and_drift() -> None:
    """A/A over a ramp (the candidate's share growing), stage references from the stage
    before, latency doubling over the ramp, heavy tails: false alarms at most alpha."""
    rng = np.random.default_rng(11)
    stages = [(4000, 100), (3000, 300), (3000, 1000), (2000, 2000)]
    for sigma, drift in ((0.8, 0.0), (1.6, math.log(2) / 4)):
        rate = _tail_alarm_rate(rng, 300, stages, 1.0, sigma=sigma, drift=drift)
        assert rate <= 0.05, (sigma, drift, rate)


def test_tail_test_catches_a_heavier_tail_across_stages() -> None:
    rng = np.random.default_rng(12)
    stages = [(4000, 100), (3000, 300), (3000, 1000), (2000, 2000)]
    # the candidate's whole distribution 1.6x slower: its p99 is 60% above stable's
    assert _tail_alarm_rate(rng, 40, stages, 1.6, margin=0.2) >= 0.95


def test_design_effect_matches_statsmodels_cluster_robust_variance() -> None:
    """deff = the intercept's squared standard error with cov_type="cluster" (CR1) over the
    one with independent errors, in statsmodels' OLS of the values on a constant."""
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(30), rng.integers(1, 60, 30))
    x = rng.normal(size=30)[groups] + rng.normal(size=groups.size)
    ones = np.ones((x.size, 1))
    robust = sm.OLS(x, ones).fit(cov_type="cluster", cov_kwds={"groups": groups})
    plain = sm.OLS(x, ones).fit()
    expected = float(robust.bse[0] ** 2 / plain.bse[0] ** 2)
    assert expected > 2  # strongly clustered
    assert column_design_effect(x, groups) == pytest.approx(expected, rel=1e-9)
    # 0/1 events from per-cluster totals, as the evaluator keeps them
    hits = (x > 1).astype(float)
    sums, sizes = np.bincount(groups, weights=hits), np.bincount(groups)
    robust = sm.OLS(hits, ones).fit(cov_type="cluster", cov_kwds={"groups": groups})
    plain = sm.OLS(hits, ones).fit()
    assert design_effect(sums, sizes, sums) == pytest.approx(
        float(robust.bse[0] ** 2 / plain.bse[0] ** 2), rel=1e-9
    )


def test_design_effect_is_one_without_clusters_or_spread() -> None:
    assert design_effect([3.0], [10], [3.0]) == 1.0
    assert design_effect([0, 0, 0], [5, 5, 5], [0, 0, 0]) == 1.0
    singletons = np.random.default_rng(1).normal(size=500)
    assert column_design_effect(singletons, np.arange(500)) == pytest.approx(1.0, abs=0.01)
    with pytest.raises(ValueError, match="cluster ids"):
        column_design_effect([1.0, 2.0], [0])


def _sessions(rng: np.random.Generator, n: int, size: int, base: float) -> np.ndarray:
    """0/1 events of ``n`` sessions of ``size`` requests, each with its own rate (Beta)."""
    rates = rng.beta(0.2, 0.2 / base - 0.2, n)
    return (rng.random((n, size)) < rates[:, None]).astype(float)


def test_deflated_share_test_holds_alpha_for_clustered_events() -> None:
    """A/A with sessions of 40 requests whose refusal habits differ wildly: counting requests
    as independent fires far above alpha; deflating by the measured design effect does not."""
    rng = np.random.default_rng(4)
    runs, naive, deflated = 300, 0, 0
    for _ in range(runs):
        c, t = _sessions(rng, 400, 40, 0.05), _sessions(rng, 25, 40, 0.05)
        deffs = [
            design_effect(x.sum(axis=1), np.full(x.shape[0], x.shape[1]), x.sum(axis=1))
            for x in (c, t)
        ]
        args = (int(c.sum()), c.size, int(t.sum()), t.size)
        naive += proportion_harm_test(*args, alpha=0.05).harm
        deflated += deflated_share_test(*args, max(deffs), 0.05, 100).harm
    assert naive / runs > 0.15
    assert deflated / runs <= 0.05


def test_quantile_bounds_widen_with_the_design_effect() -> None:
    rng = np.random.default_rng(6)
    c, t = rng.lognormal(0, 0.8, 20000), rng.lognormal(0.5, 0.8, 2000)
    plain = quantile_harm_test(c, t, q=0.95, alpha=0.01)
    wide = quantile_harm_test(c, t, q=0.95, alpha=0.01, treatment_design_effect=5.0)
    assert wide.bound < plain.bound
    assert wide.estimate == plain.estimate
    with pytest.raises(ValueError, match="design effects"):
        quantile_harm_test(c, t, treatment_design_effect=0.5)
