"""Fixed-horizon two-sample tests: one look at a finished (or frozen) sample.

These answer "what does this sample say?" for reports and dashboards. They are **not** valid for
deciding on data that are re-checked every few seconds: repeated looks at a fixed-horizon test
inflate false alarms well past ``alpha`` (see ``bench/simulate_aa.py``). Guardrail decisions use
:mod:`extproc.stats.sequential` instead.

What each function assumes:

* :func:`welch_t_test`: independent observations; the mean difference is close to normal (CLT), so
  very skewed metrics (LLM latency) need tens of observations per arm at least. No equal-variance
  assumption. The relative interval is Fieller's.
* :func:`two_proportion_z_test`: independent Bernoulli trials. The p-value is the pooled z-test
  (as ``statsmodels.stats.proportion.proportions_ztest``); the interval for the difference is
  Newcombe's hybrid score interval, which keeps its coverage for rare events (1% errors) where the
  Wald interval does not; the relative interval is the log (Katz) interval. The test and the
  interval can therefore disagree at the margin.
* :func:`mann_whitney_u`: SciPy's Mann-Whitney U for the p-value (it tests stochastic equality and
  is exact for small untied samples); the effect size is the common-language effect size
  ``P(T > C) + P(T = C) / 2`` with a Brunner-Munzel (placement) normal interval, which does not
  assume equal shapes.
* :func:`win_rate`: ties count as half a win; the Wilson interval treats the score as binomial,
  which is conservative when there are ties.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike
from scipy import special, stats

from extproc.stats._common import (
    check_alpha,
    check_alternative,
    critical_value,
    fieller_ratio,
    pivot_test,
)
from extproc.stats.moments import RunningMoments, as_moments
from extproc.stats.results import UNDEFINED, Alternative, Comparison, Interval, WinRate


def welch_t_test(
    control: ArrayLike | RunningMoments,
    treatment: ArrayLike | RunningMoments,
    *,
    alternative: Alternative = "two-sided",
    alpha: float = 0.05,
) -> Comparison:
    """Welch's t-test of ``mean(treatment) - mean(control)``, with Hedges' g and a relative CI.

    Takes raw samples or :class:`RunningMoments`, so the evaluator can test kept summaries. Below
    two observations in an arm the variance is undefined and so are the p-value and intervals.
    """
    check_alpha(alpha)
    check_alternative(alternative)
    c, t = as_moments(control), as_moments(treatment)
    estimate = t.mean - c.mean if c.count and t.count else math.nan
    if c.count < 2 or t.count < 2:
        return Comparison(
            method="welch-t",
            alternative=alternative,
            alpha=alpha,
            estimate=estimate,
            ci=UNDEFINED,
            p_value=math.nan,
            statistic=math.nan,
            effect_size=math.nan,
            effect_size_name="hedges_g",
            n_control=c.count,
            n_treatment=t.count,
        )
    var_c, var_t = c.variance / c.count, t.variance / t.count
    se = math.sqrt(var_c + var_t)
    df = (
        (var_c + var_t) ** 2 / (var_c**2 / (c.count - 1) + var_t**2 / (t.count - 1))
        if se > 0.0
        else float(c.count + t.count - 2)
    )
    statistic, p_value, ci = pivot_test(estimate, se, alternative, alpha, df)
    relative_estimate = t.mean / c.mean - 1.0 if c.mean != 0.0 else None
    relative_ci = None
    if relative_estimate is not None:
        low, high = fieller_ratio(
            t.mean, var_t, c.mean, var_c, critical_value(alpha, alternative, df)
        )
        relative_ci = Interval(
            low - 1.0 if alternative != "less" else -math.inf,
            high - 1.0 if alternative != "greater" else math.inf,
        )
    return Comparison(
        method="welch-t",
        alternative=alternative,
        alpha=alpha,
        estimate=estimate,
        ci=ci,
        p_value=p_value,
        statistic=statistic,
        effect_size=hedges_g(c, t),
        effect_size_name="hedges_g",
        n_control=c.count,
        n_treatment=t.count,
        relative_estimate=relative_estimate,
        relative_ci=relative_ci,
    )


def wilson_interval(
    successes: float, n: float, *, alpha: float = 0.05, alternative: Alternative = "two-sided"
) -> Interval:
    """Wilson score interval for a binomial proportion.

    Chosen over the Wald interval because it stays inside [0, 1] and keeps its coverage near 0
    and 1 (error rates, all-success samples). No trials means no information: [0, 1].
    ``successes`` may be fractional (ties counted as half).
    """
    check_alpha(alpha)
    check_alternative(alternative)
    if n <= 0:
        return Interval(0.0, 1.0)
    z = critical_value(alpha, alternative, None)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denom
    return Interval(
        max(centre - half, 0.0) if alternative != "less" else 0.0,
        min(centre + half, 1.0) if alternative != "greater" else 1.0,
    )


def two_proportion_z_test(
    control_successes: int,
    control_n: int,
    treatment_successes: int,
    treatment_n: int,
    *,
    alternative: Alternative = "two-sided",
    alpha: float = 0.05,
) -> Comparison:
    """Pooled two-proportion z-test of ``p_treatment - p_control``, Newcombe CI, relative lift.

    The effect size is Cohen's h. With all successes (or all failures) in both arms the pooled
    variance is zero and the difference is exactly zero: p = 1. The relative lift is defined when
    the control has successes; its interval when both arms do.
    """
    check_alpha(alpha)
    check_alternative(alternative)
    _check_counts(control_successes, control_n)
    _check_counts(treatment_successes, treatment_n)
    if control_n == 0 or treatment_n == 0:
        return Comparison(
            method="two-proportion-z",
            alternative=alternative,
            alpha=alpha,
            estimate=math.nan,
            ci=UNDEFINED,
            p_value=math.nan,
            statistic=math.nan,
            effect_size=math.nan,
            effect_size_name="cohens_h",
            n_control=control_n,
            n_treatment=treatment_n,
        )
    p_c, p_t = control_successes / control_n, treatment_successes / treatment_n
    estimate = p_t - p_c
    pooled = (control_successes + treatment_successes) / (control_n + treatment_n)
    se0 = math.sqrt(pooled * (1.0 - pooled) * (1.0 / control_n + 1.0 / treatment_n))
    statistic, p_value, _ = pivot_test(estimate, se0, alternative, alpha, None)
    # Newcombe (1998) method 10: combine each arm's Wilson limits at the same level.
    # A one-sided bound at alpha uses the two-sided limits at 2 alpha.
    level = alpha if alternative == "two-sided" else 2.0 * alpha
    wc = wilson_interval(control_successes, control_n, alpha=level)
    wt = wilson_interval(treatment_successes, treatment_n, alpha=level)
    low = estimate - math.hypot(p_t - wt.low, wc.high - p_c)
    high = estimate + math.hypot(wt.high - p_t, p_c - wc.low)
    ci = Interval(low if alternative != "less" else -1.0, high if alternative != "greater" else 1.0)
    relative_estimate = p_t / p_c - 1.0 if control_successes > 0 else None
    relative_ci = None
    if control_successes > 0 and treatment_successes > 0:
        se_log = math.sqrt(
            1.0 / treatment_successes
            - 1.0 / treatment_n
            + 1.0 / control_successes
            - 1.0 / control_n
        )
        z = critical_value(alpha, alternative, None)
        log_ratio = math.log(p_t / p_c)
        relative_ci = Interval(
            math.expm1(log_ratio - z * se_log) if alternative != "less" else -1.0,
            math.expm1(log_ratio + z * se_log) if alternative != "greater" else math.inf,
        )
    cohens_h = 2.0 * math.asin(math.sqrt(p_t)) - 2.0 * math.asin(math.sqrt(p_c))
    return Comparison(
        method="two-proportion-z",
        alternative=alternative,
        alpha=alpha,
        estimate=estimate,
        ci=ci,
        p_value=p_value,
        statistic=statistic,
        effect_size=cohens_h,
        effect_size_name="cohens_h",
        n_control=control_n,
        n_treatment=treatment_n,
        relative_estimate=relative_estimate,
        relative_ci=relative_ci,
    )


def mann_whitney_u(
    control: ArrayLike,
    treatment: ArrayLike,
    *,
    alternative: Alternative = "two-sided",
    alpha: float = 0.05,
) -> Comparison:
    """Mann-Whitney U test with the common-language effect size and rank-biserial correlation.

    ``estimate`` is ``P(T > C) + P(T = C) / 2`` (0.5: no shift; 0.6: a random candidate
    observation beats a random stable one 60% of the time); ``effect_size`` is the rank-biserial
    correlation ``2 * estimate - 1``; ``statistic`` is the treatment's U. The interval uses the
    Brunner-Munzel placement variance (clipped to [0, 1]) and is NaN below two observations per
    arm, or when every observation is tied.
    """
    check_alpha(alpha)
    check_alternative(alternative)
    c = np.asarray(control, dtype=np.float64).ravel()
    t = np.asarray(treatment, dtype=np.float64).ravel()
    n_c, n_t = c.size, t.size
    if n_c == 0 or n_t == 0:
        return Comparison(
            method="mann-whitney-u",
            alternative=alternative,
            alpha=alpha,
            estimate=math.nan,
            ci=UNDEFINED,
            p_value=math.nan,
            statistic=math.nan,
            effect_size=math.nan,
            effect_size_name="rank_biserial",
            n_control=n_c,
            n_treatment=n_t,
        )
    result = stats.mannwhitneyu(t, c, alternative=alternative)
    u_t = float(result.statistic)
    cles = u_t / (n_c * n_t)
    ci = UNDEFINED
    if n_c >= 2 and n_t >= 2:
        ranks = stats.rankdata(np.concatenate([t, c]))
        # Placement of each observation: the share of the other arm below it (ties count half).
        place_t = (ranks[:n_t] - stats.rankdata(t)) / n_c
        place_c = (ranks[n_t:] - stats.rankdata(c)) / n_t
        se = math.sqrt(float(place_t.var(ddof=1)) / n_t + float(place_c.var(ddof=1)) / n_c)
        if se > 0.0:
            _, _, raw = pivot_test(cles, se, alternative, alpha, None)
            ci = Interval(max(raw.low, 0.0), min(raw.high, 1.0))
    return Comparison(
        method="mann-whitney-u",
        alternative=alternative,
        alpha=alpha,
        estimate=cles,
        ci=ci,
        p_value=float(result.pvalue),
        statistic=u_t,
        effect_size=2.0 * cles - 1.0,
        effect_size_name="rank_biserial",
        n_control=n_c,
        n_treatment=n_t,
    )


def cohens_d(control: ArrayLike | RunningMoments, treatment: ArrayLike | RunningMoments) -> float:
    """Mean difference over the pooled standard deviation; NaN if that spread is 0 or undefined."""
    c, t = as_moments(control), as_moments(treatment)
    df = c.count + t.count - 2
    if c.count == 0 or t.count == 0 or df <= 0:
        return math.nan
    pooled_sd = math.sqrt((c.m2 + t.m2) / df)
    return (t.mean - c.mean) / pooled_sd if pooled_sd > 0.0 else math.nan


def hedges_g(control: ArrayLike | RunningMoments, treatment: ArrayLike | RunningMoments) -> float:
    """Cohen's d times the exact small-sample correction J(df) = G(df/2) / (sqrt(df/2) G((df-1)/2)).

    Unbiased for the standardised difference under normality; it matters below ~20 per arm.
    """
    c, t = as_moments(control), as_moments(treatment)
    d = cohens_d(c, t)
    df = c.count + t.count - 2
    if math.isnan(d) or df < 2:
        return math.nan
    log_j = special.gammaln(df / 2) - 0.5 * math.log(df / 2) - special.gammaln((df - 1) / 2)
    return d * math.exp(log_j)


def win_rate(wins: int, losses: int, ties: int = 0, *, alpha: float = 0.05) -> WinRate:
    """Candidate win rate over pairwise judgements (LLM judge, user preference), Wilson interval."""
    check_alpha(alpha)
    if min(wins, losses, ties) < 0:
        raise ValueError("wins, losses and ties must be non-negative")
    n = wins + losses + ties
    if n == 0:
        return WinRate(
            estimate=math.nan,
            ci=Interval(0.0, 1.0),
            p_value=math.nan,
            alpha=alpha,
            wins=wins,
            losses=losses,
            ties=ties,
        )
    score = wins + 0.5 * ties
    estimate = score / n
    z = (estimate - 0.5) / math.sqrt(0.25 / n)
    p_value = float(2.0 * stats.norm.sf(abs(z)))
    return WinRate(
        estimate=estimate,
        ci=wilson_interval(score, n, alpha=alpha),
        p_value=p_value,
        alpha=alpha,
        wins=wins,
        losses=losses,
        ties=ties,
    )


def _check_counts(successes: int, n: int) -> None:
    """Counts must be 0 <= successes <= n: anything else is a telemetry bug, not data."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
