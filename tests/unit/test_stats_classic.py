"""Fixed-horizon tests cross-checked against SciPy and statsmodels, plus edge-case tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats import meta_analysis  # type: ignore[import-untyped]
from statsmodels.stats.proportion import (  # type: ignore[import-untyped]
    confint_proportions_2indep,
    proportion_confint,
    proportions_ztest,
)

from extproc.stats import (
    RunningMoments,
    cohens_d,
    hedges_g,
    mann_whitney_u,
    two_proportion_z_test,
    welch_t_test,
    wilson_interval,
    win_rate,
)
from extproc.stats.results import Alternative

pytestmark = pytest.mark.timeout(60)

ALTERNATIVES: list[Alternative] = ["two-sided", "greater", "less"]
SM_ALTERNATIVE = {"two-sided": "two-sided", "greater": "larger", "less": "smaller"}


@pytest.mark.parametrize("alternative", ALTERNATIVES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_welch_matches_scipy(alternative: Alternative, seed: int) -> None:
    rng = np.random.default_rng(seed)
    control = rng.lognormal(6.7, 0.8, 60)
    treatment = rng.lognormal(6.8, 1.0, 25)
    ours = welch_t_test(control, treatment, alternative=alternative, alpha=0.1)
    ref = stats.ttest_ind(treatment, control, equal_var=False, alternative=alternative)
    ref_ci = ref.confidence_interval(0.9)
    assert ours.statistic == pytest.approx(ref.statistic, rel=1e-10)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert ours.ci.low == pytest.approx(ref_ci.low, rel=1e-9)
    assert ours.ci.high == pytest.approx(ref_ci.high, rel=1e-9)
    assert ours.estimate == pytest.approx(treatment.mean() - control.mean())
    # Summaries give the same answer as raw samples.
    summary = welch_t_test(
        RunningMoments.of(control), RunningMoments.of(treatment), alternative=alternative, alpha=0.1
    )
    assert summary.p_value == pytest.approx(ours.p_value, rel=1e-9)


def test_welch_relative_interval_contains_ratio_and_matches_fieller() -> None:
    rng = np.random.default_rng(3)
    control = rng.normal(1000, 300, 400)
    treatment = rng.normal(1100, 300, 300)
    result = welch_t_test(control, treatment)
    assert result.relative_estimate == pytest.approx(treatment.mean() / control.mean() - 1)
    assert result.relative_ci is not None
    # At Fieller's limits the t statistic of (t - g c) equals the critical value exactly.
    df = stats.ttest_ind(treatment, control, equal_var=False).df
    crit = stats.t.isf(0.025, df)
    vt, vc = treatment.var(ddof=1) / 300, control.var(ddof=1) / 400
    for end in (result.relative_ci.low, result.relative_ci.high):
        g = end + 1
        z = (treatment.mean() - g * control.mean()) / math.sqrt(vt + g * g * vc)
        assert abs(z) == pytest.approx(crit, rel=1e-9)


@pytest.mark.parametrize(
    ("control", "treatment", "p_value", "estimate"),
    [
        ([5.0, 5.0, 5.0], [5.0, 5.0], 1.0, 0.0),  # both constant and equal
        ([5.0, 5.0, 5.0], [7.0, 7.0], 0.0, 2.0),  # both constant, different
        ([5.0], [6.0, 7.0], math.nan, 1.5),  # n = 1: variance undefined
        ([], [6.0, 7.0], math.nan, math.nan),  # n = 0
    ],
)
def test_welch_edge_cases(
    control: list[float], treatment: list[float], p_value: float, estimate: float
) -> None:
    result = welch_t_test(control, treatment)
    assert result.p_value == pytest.approx(p_value, nan_ok=True)
    assert result.estimate == pytest.approx(estimate, nan_ok=True)
    if p_value == 0.0:
        assert result.ci.low == result.ci.high == estimate


@pytest.mark.parametrize("alternative", ALTERNATIVES)
@pytest.mark.parametrize(
    "counts", [(10, 1000, 25, 1000), (190, 19000, 30, 1000), (3, 40, 0, 15), (50, 50, 40, 50)]
)
def test_two_proportion_matches_statsmodels(
    alternative: Alternative, counts: tuple[int, int, int, int]
) -> None:
    xc, nc, xt, nt = counts
    ours = two_proportion_z_test(xc, nc, xt, nt, alternative=alternative)
    z, p = proportions_ztest([xt, xc], [nt, nc], alternative=SM_ALTERNATIVE[alternative])
    assert ours.statistic == pytest.approx(z, rel=1e-10)
    assert ours.p_value == pytest.approx(p, rel=1e-9)
    if alternative == "two-sided":
        low, high = confint_proportions_2indep(xt, nt, xc, nc, method="newcomb")
        assert (ours.ci.low, ours.ci.high) == pytest.approx((low, high), rel=1e-9)
        if xt > 0 and xc > 0:
            low, high = confint_proportions_2indep(xt, nt, xc, nc, method="log", compare="ratio")
            assert ours.relative_ci is not None
            assert ours.relative_ci.low == pytest.approx(low - 1, rel=1e-9)
            assert ours.relative_ci.high == pytest.approx(high - 1, rel=1e-9)
    elif alternative == "greater":
        low, _ = confint_proportions_2indep(xt, nt, xc, nc, method="newcomb", alpha=0.1)
        assert ours.ci.low == pytest.approx(low, rel=1e-9)
        assert ours.ci.high == 1.0


@pytest.mark.parametrize(
    ("counts", "p_value", "has_relative"),
    [
        ((100, 100, 50, 50), 1.0, True),  # all successes: zero pooled variance, no difference
        ((0, 100, 0, 50), 1.0, False),  # no successes anywhere
        ((0, 100, 3, 50), None, False),  # control has no events: no relative lift
    ],
)
def test_two_proportion_edge_cases(
    counts: tuple[int, int, int, int], p_value: float | None, has_relative: bool
) -> None:
    result = two_proportion_z_test(*counts)
    if p_value is not None:
        assert result.p_value == p_value
    assert (result.relative_estimate is not None) == has_relative
    assert -1.0 <= result.ci.low <= result.estimate <= result.ci.high <= 1.0


def test_two_proportion_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="successes"):
        two_proportion_z_test(5, 4, 1, 10)
    assert math.isnan(two_proportion_z_test(0, 0, 1, 10).p_value)


@pytest.mark.parametrize("alternative", ALTERNATIVES)
def test_mann_whitney_matches_scipy_and_brunner_munzel(alternative: Alternative) -> None:
    rng = np.random.default_rng(5)
    control = rng.lognormal(6.7, 0.8, 80).round(-1)  # rounded: ties
    treatment = rng.lognormal(6.9, 0.8, 60).round(-1)
    ours = mann_whitney_u(control, treatment, alternative=alternative)
    ref = stats.mannwhitneyu(treatment, control, alternative=alternative)
    assert ours.statistic == ref.statistic
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    # Common-language effect size by brute force over all pairs.
    diff = treatment[:, None] - control[None, :]
    cles = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    assert ours.estimate == pytest.approx(cles)
    assert ours.effect_size == pytest.approx(2 * cles - 1)
    if alternative == "two-sided":
        # Our interval's standard error is Brunner-Munzel's.
        bm = stats.brunnermunzel(control, treatment)
        se = (ours.ci.high - ours.ci.low) / (2 * stats.norm.isf(0.025))
        assert (cles - 0.5) / se == pytest.approx(bm.statistic, rel=1e-9)


def test_mann_whitney_edge_cases() -> None:
    assert math.isnan(mann_whitney_u([], [1.0, 2.0]).estimate)
    constant = mann_whitney_u([3.0, 3.0, 3.0], [3.0, 3.0])
    assert constant.estimate == 0.5
    assert math.isnan(constant.ci.low)  # every observation tied: no spread to build a CI on
    separated = mann_whitney_u([1.0, 2.0, 3.0], [10.0, 11.0, 12.0])
    assert separated.estimate == 1.0
    assert separated.effect_size == 1.0


def test_cohens_d_and_hedges_g() -> None:
    rng = np.random.default_rng(7)
    control, treatment = rng.normal(0, 1, 12), rng.normal(0.8, 1.2, 9)
    pooled = math.sqrt((11 * control.var(ddof=1) + 8 * treatment.var(ddof=1)) / (12 + 9 - 2))
    d = (treatment.mean() - control.mean()) / pooled
    assert cohens_d(control, treatment) == pytest.approx(d)
    # statsmodels uses the approximate correction 1 - 3 / (4 N - 9); ours is the exact J.
    g_ref, _ = meta_analysis.effectsize_smd(
        treatment.mean(), treatment.std(ddof=1), 9, control.mean(), control.std(ddof=1), 12
    )
    assert hedges_g(control, treatment) == pytest.approx(g_ref, rel=1e-3)
    assert abs(hedges_g(control, treatment)) < abs(d)


@pytest.mark.parametrize(
    ("control", "treatment"), [([1.0, 1.0], [1.0, 1.0]), ([1.0], [2.0]), ([], [1.0, 2.0])]
)
def test_effect_sizes_undefined(control: list[float], treatment: list[float]) -> None:
    assert math.isnan(cohens_d(control, treatment))
    assert math.isnan(hedges_g(control, treatment))


@pytest.mark.parametrize(("successes", "n"), [(0, 20), (1, 20), (10, 20), (20, 20), (3, 1000)])
def test_wilson_matches_statsmodels(successes: int, n: int) -> None:
    low, high = proportion_confint(successes, n, alpha=0.05, method="wilson")
    ours = wilson_interval(successes, n)
    assert (ours.low, ours.high) == pytest.approx((low, high), abs=1e-12)
    one_sided = wilson_interval(successes, n, alternative="greater")
    assert one_sided.low == pytest.approx(
        proportion_confint(successes, n, alpha=0.1, method="wilson")[0], abs=1e-12
    )
    assert one_sided.high == 1.0
    assert wilson_interval(0, 0) == wilson_interval(0, 0, alpha=0.01)


def test_win_rate_counts_ties_half_and_agrees_with_its_interval() -> None:
    result = win_rate(60, 30, 10)
    assert result.estimate == pytest.approx(0.65)
    assert result.n == 100
    assert (result.p_value < 0.05) == (not result.ci.contains(0.5))
    even = win_rate(40, 40, 20)
    assert even.estimate == 0.5
    assert even.p_value == pytest.approx(1.0)
    assert math.isnan(win_rate(0, 0).estimate)
    with pytest.raises(ValueError, match="non-negative"):
        win_rate(-1, 3)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1])
def test_alpha_is_validated(bad: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        welch_t_test([1.0, 2.0], [1.0, 3.0], alpha=bad)
    with pytest.raises(ValueError, match="alternative"):
        welch_t_test([1.0, 2.0], [1.0, 3.0], alternative="bigger")  # type: ignore[arg-type]
