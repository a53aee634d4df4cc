"""The one-look tests an A/B decision needs beyond :mod:`extproc.stats.classic`.

An A/B test asks "is the candidate better?" once, when its sample is complete, so these are
fixed-horizon tests (valid for one look, like :mod:`~extproc.stats.classic`), and the decision
that reads several of them corrects for their number (:func:`holm`).

* :func:`binomial_win_rate`: the exact binomial test of a 50% win rate over decisive pairwise
  verdicts (wins against losses; ties are counted and stated, not tested), with the Wilson
  interval. Assumes independent verdicts.
* :func:`cohens_d_interval`: Cohen's d with its large-sample normal interval (Hedges and Olkin's
  variance ``(n_c + n_t) / (n_c n_t) + d^2 / (2 (n_c + n_t))``); assumes roughly normal scores.
* :func:`median_test`: Mood's median test (SciPy) for a difference of medians, the p-value
  beside the order-statistic interval of :func:`~extproc.stats.quantiles.quantile_difference`.
* :func:`holm`: Holm's step-down adjustment; controls the family-wise error rate under any
  dependence between the tests. Written here because SciPy has only false-discovery-rate
  adjustments and statsmodels is not a runtime dependency.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from extproc.stats._common import as_sample, check_alpha, critical_value
from extproc.stats.classic import cohens_d
from extproc.stats.results import UNDEFINED, Interval


def binomial_win_rate(
    wins: int, losses: int, *, alpha: float = 0.05
) -> tuple[float, Interval, float]:
    """``(win rate, Wilson interval, two-sided exact p-value against 50%)`` over decisive
    verdicts; NaN and an undefined interval without any."""
    check_alpha(alpha)
    if min(wins, losses) < 0:
        raise ValueError(f"need wins, losses >= 0, got {wins}, {losses}")
    n = wins + losses
    if n == 0:
        return math.nan, UNDEFINED, math.nan
    result = stats.binomtest(wins, n, 0.5)
    ci = result.proportion_ci(confidence_level=1.0 - alpha, method="wilson")
    return wins / n, Interval(float(ci.low), float(ci.high)), float(result.pvalue)


def cohens_d_interval(
    control: ArrayLike, treatment: ArrayLike, *, alpha: float = 0.05
) -> tuple[float, Interval]:
    """Cohen's d of ``treatment - control`` and its two-sided normal interval; NaN below two
    observations in an arm or without spread."""
    check_alpha(alpha)
    c, t = as_sample(control), as_sample(treatment)
    d = cohens_d(c, t)
    if math.isnan(d) or c.size < 2 or t.size < 2:
        return d, UNDEFINED
    n = c.size + t.size
    se = math.sqrt(n / (c.size * t.size) + d * d / (2.0 * n))
    z = critical_value(alpha, "two-sided", None)
    return d, Interval(d - z * se, d + z * se)


def median_test(control: ArrayLike, treatment: ArrayLike) -> float:
    """Mood's median test p-value (two-sided); NaN when an arm is empty, 1 when every value lies
    on one side of the grand median (all tied: the arms cannot differ)."""
    c, t = as_sample(control), as_sample(treatment)
    if c.size == 0 or t.size == 0:
        return math.nan
    pooled = np.concatenate([c, t])
    if np.all(pooled <= np.median(pooled)) or np.all(pooled > np.median(pooled)):
        return 1.0
    return float(stats.median_test(c, t, ties="below").pvalue)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the given order: reject where the adjusted value is below
    alpha. NaN entries (tests that could not run) stay NaN and do not count in the family."""
    finite = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    out = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - rank) * p))
        out[i] = running
    return out
