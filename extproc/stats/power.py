"""Sample-size calculators: how many observations per arm a fixed-horizon test needs.

Why: a canary at 5% of traffic collects candidate data 19 times slower than stable data, so the
duration of a stage is set by the candidate arm. ``ratio`` is ``n_treatment / n_control`` (a 5%
canary has ``ratio = 5 / 95``); divide :attr:`SampleSize.total` by total traffic for a duration.

These are the classical fixed-horizon formulas (the same as statsmodels' ``NormalIndPower`` with
Cohen's h for proportions and ``TTestIndPower`` for means). A sequential (always-valid) test pays
for unlimited looks with more samples at the same power; ``bench/simulate_aa.py`` measures how
many more for the guardrails here.
"""

from __future__ import annotations

import math

from scipy import optimize, stats

from extproc.stats._common import check_alpha, check_alternative, critical_value
from extproc.stats.results import Alternative, SampleSize


def sample_size_proportions(
    baseline: float,
    mde: float,
    *,
    relative: bool = False,
    alpha: float = 0.05,
    power: float = 0.8,
    ratio: float = 1.0,
    alternative: Alternative = "two-sided",
) -> SampleSize:
    """Sample size for a two-proportion z-test on the arcsine scale (Cohen's h).

    ``mde`` is the minimum detectable effect, absolute (0.02: 1% -> 3%) or, with
    ``relative=True``, a fraction of ``baseline`` (2.0: 1% -> 3%). A one-sided alternative must
    point the same way as the effect. The two-sided formula drops the far tail's power, which is
    below 1e-6 for any usable design.
    """
    check_alpha(alpha)
    _check_design(power, ratio, alternative)
    target = baseline * (1.0 + mde) if relative else baseline + mde
    if not (0.0 < baseline < 1.0 and 0.0 < target < 1.0) or target == baseline:
        raise ValueError(f"need distinct proportions in (0, 1), got {baseline} -> {target}")
    h = 2.0 * math.asin(math.sqrt(target)) - 2.0 * math.asin(math.sqrt(baseline))
    _check_direction(h, alternative)
    z_sum = critical_value(alpha, alternative, None) + float(stats.norm.ppf(power))
    n_eff = (z_sum / h) ** 2  # 1 / (1/n_control + 1/n_treatment)
    n_control = n_eff * (1.0 + ratio) / ratio
    return SampleSize(
        method="two-proportion-z (arcsine)",
        n_control=math.ceil(n_control),
        n_treatment=math.ceil(n_control * ratio),
        effect_size=h,
        alpha=alpha,
        power=power,
        alternative=alternative,
    )


def sample_size_means(
    sd: float,
    mde: float,
    *,
    baseline_mean: float | None = None,
    alpha: float = 0.05,
    power: float = 0.8,
    ratio: float = 1.0,
    alternative: Alternative = "two-sided",
) -> SampleSize:
    """Sample size for a two-sample t-test with a common standard deviation ``sd``.

    ``mde`` is absolute in the metric's units, or a fraction of ``baseline_mean`` when that is
    given (``mde=0.1, baseline_mean=1000``: detect +100 ms). Exact power from the noncentral t,
    solved for the control arm's size; for skewed metrics (latency) the t-test itself is only
    approximate at small sizes.
    """
    check_alpha(alpha)
    _check_design(power, ratio, alternative)
    if sd <= 0.0:
        raise ValueError(f"sd must be positive, got {sd}")
    effect = mde * baseline_mean if baseline_mean is not None else mde
    d = effect / sd
    if d == 0.0:
        raise ValueError("mde must be non-zero")
    _check_direction(d, alternative)

    def shortfall(n_control: float) -> float:
        return _t_power(d, n_control, ratio, alpha, alternative) - power

    low = max(2.0, 2.0 / ratio) * 1.000001  # at least two observations in each arm
    if shortfall(low) >= 0.0:
        n_control = low
    else:
        high = low * 2.0
        while shortfall(high) < 0.0:
            high *= 2.0
        n_control = float(optimize.brentq(shortfall, low, high, xtol=1e-6, rtol=1e-12))
    return SampleSize(
        method="two-sample t",
        n_control=math.ceil(n_control),
        n_treatment=math.ceil(n_control * ratio),
        effect_size=d,
        alpha=alpha,
        power=power,
        alternative=alternative,
    )


def sample_size_win_rate(target: float, *, alpha: float = 0.05, power: float = 0.8) -> SampleSize:
    """Decisive pairwise verdicts to tell a win rate of ``target`` from 50% (two-sided).

    One sample on the arcsine scale (Cohen's h against 0.5, as statsmodels' ``NormalIndPower``
    with no second arm): ``n = ((z_{1-alpha/2} + z_power) / h)^2``. Both arms see the same
    verdicts, so ``n_control == n_treatment == n``.
    """
    check_alpha(alpha)
    _check_design(power, 1.0, "two-sided")
    if not 0.0 < target < 1.0 or target == 0.5:
        raise ValueError(f"need a win rate in (0, 1) other than 0.5, got {target}")
    h = 2.0 * math.asin(math.sqrt(target)) - 2.0 * math.asin(math.sqrt(0.5))
    z_sum = critical_value(alpha, "two-sided", None) + float(stats.norm.ppf(power))
    n = math.ceil((z_sum / h) ** 2)
    return SampleSize(
        method="one-sample proportion (arcsine)",
        n_control=n,
        n_treatment=n,
        effect_size=h,
        alpha=alpha,
        power=power,
        alternative="two-sided",
    )


def _t_power(d: float, n_control: float, ratio: float, alpha: float, alt: Alternative) -> float:
    """Power of the pooled two-sample t-test (both tails for two-sided, as statsmodels)."""
    n_treatment = n_control * ratio
    df = n_control + n_treatment - 2.0
    nc = d * math.sqrt(n_control * n_treatment / (n_control + n_treatment))
    tail = alpha / 2.0 if alt == "two-sided" else alpha
    crit = float(stats.t.isf(tail, df))
    result = 0.0
    if alt != "less":
        result += float(stats.nct.sf(crit, df, nc))
    if alt != "greater":
        result += float(stats.nct.cdf(-crit, df, nc))
    return result


def _check_design(power: float, ratio: float, alternative: str) -> None:
    """Power and allocation ratio outside their ranges make every formula meaningless."""
    check_alternative(alternative)
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power}")
    if ratio <= 0.0:
        raise ValueError(f"ratio must be positive, got {ratio}")


def _check_direction(effect: float, alternative: Alternative) -> None:
    """A one-sided test pointing away from the effect never reaches the asked power."""
    if (alternative == "greater" and effect < 0.0) or (alternative == "less" and effect > 0.0):
        raise ValueError(f"a {alternative!r} test cannot detect an effect of sign {effect:+g}")
