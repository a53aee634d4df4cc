"""Exceedance e-processes: quantile harm and absolute ceilings whose evidence carries across stages.

Why: the order-statistic test (:func:`extproc.stats.sequential.quantile_harm_test`) has no
e-value, so a ramp that changes the split at every stage had to restart it per stage and split
alpha over the stages, and a tail regression close to its margin reached 100% undetected. These
tests turn a quantile question into a count of *exceedances*, a binomial question with an exact
e-value, which the evaluator multiplies across stages like the event-rate tests'
(``extproc.evaluator.guardrails.carry_evidence``).

* :func:`quantile_exceedance_test`: "is the candidate's tail beyond ``(1 + margin)`` times a
  reference heavier than stable's tail beyond the reference?" The reference is fixed before the
  data (the evaluator takes stable's q-quantile of the previous stage), so the requests beyond it
  are events with a fixed definition, and the event-share test
  (:func:`~extproc.stats.sequential.proportion_harm_test`) on them is exact: each such event is
  the candidate's with probability at most its share of requests under the null, whatever the
  base rate and however both arms drift. With the reference at stable's q-quantile the null is
  implied by "the candidate's q-quantile is at most ``(1 + margin)`` times stable's", and it holds
  in every A/A comparison. (A threshold taken from the same stage's stable data would make
  stable's count nearly deterministic, and the test only asymptotic; an upper confidence bound
  of stable's quantile instead keeps it exact but wastes most of the power, as the bound sits
  near stable's p99.5 for a p99.)
* :func:`rate_ceiling_test`: "is the candidate's event rate above a fixed ceiling?" The
  beta-binomial mixture against ``p <= ceiling`` (``below=True``: the mirror, "provably below").
  A quantile ceiling (p99 above 5,000 ms) is the same test on the count of requests above the
  ceiling against ``1 - q``.
* :func:`mean_ceiling_test`: "is the candidate's mean above a fixed ceiling?" A one-sample
  one-sided normal mixture (asymptotic, like :func:`~extproc.stats.sequential.mean_harm_test`).

Every count may be deflated by a design effect (:mod:`extproc.stats.clustered`) when requests
cluster by conversation; the tests then hold asymptotically in the number of conversations.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from numpy.typing import ArrayLike

from extproc.stats._common import as_sample, check_alpha
from extproc.stats.moments import RunningMoments
from extproc.stats.results import HarmTest
from extproc.stats.sequential import (
    _beta_mixture_log_e,
    _check_harm_args,
    _from_log_e,
    _mixture_tuning,
    _normal_mixture_log_e,
    _not_ready,
    proportion_harm_test,
)


def exceedance_log_e(
    k: float, n: float, p0: float, *, alpha: float, tightest_at_events: float, below: bool = False
) -> float:
    """Log e-value of ``k`` exceedances in ``n`` trials against ``p <= p0`` (``below``: ``p >=
    p0``). Counts may be fractional (deflated by a design effect); the beta function extends them.

    The mixture's prior Beta(p0 s, (1 - p0) s) has its strength ``s`` set so that it is tightest
    near ``tightest_at_events`` expected events, whatever ``p0``.
    """
    if not 0.0 < p0 < 1.0:
        raise ValueError(f"p0 must be in (0, 1), got {p0}")
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0
    strength = max(tightest_at_events / (p0 * _mixture_tuning(alpha)), 1.0)
    return _beta_mixture_log_e(k, n, p0, strength, upper=not below)


def quantile_exceedance_test(
    control: ArrayLike,
    treatment: ArrayLike,
    reference: float,
    *,
    margin: float = 0.0,
    relative: bool = True,
    higher_is_worse: bool = True,
    alpha: float = 0.05,
    tightest_at_events: int = 100,
    design_effect: float = 1.0,
) -> HarmTest:
    """Exact always-valid test of "the candidate's tail beyond ``(1 + margin) reference`` is
    heavier than stable's beyond ``reference``".

    ``reference`` must be fixed before the data tested (the evaluator takes stable's q-quantile
    of the previous stage). Counts ``k_t`` candidate values above ``(1 + margin) reference``
    (``reference + margin`` when not ``relative``; mirrored below when lower is worse) and ``k_c``
    stable values above ``reference``, and runs the event-share test
    (:func:`~extproc.stats.sequential.proportion_harm_test`, margin 0) on them: each such event
    belongs to the candidate with probability at most the candidate's share when the null holds,
    whatever the base rate and however it drifts. With ``reference`` at stable's q-quantile the
    null is implied by "candidate's q-quantile at most ``(1 + margin)`` times stable's". The
    e-value is the evidence to carry across stages. ``estimate`` is the observed ratio of the
    tail rates minus one, ``bound`` its time-uniform lower bound. ``design_effect`` (>= 1)
    deflates the counts when requests cluster by conversation (:func:`deflated_share_test`).
    """
    _check_harm_args(margin, relative, higher_is_worse, alpha)
    if not math.isfinite(reference) or (relative and reference <= 0.0):
        raise ValueError(f"reference must be finite (and > 0 when relative), got {reference}")
    if design_effect < 1.0:
        raise ValueError(f"design_effect must be >= 1, got {design_effect}")
    c, t = as_sample(control), as_sample(treatment)
    if relative:
        shifted = reference * (1.0 + margin if higher_is_worse else 1.0 - margin)
    else:
        shifted = reference + (margin if higher_is_worse else -margin)
    k_t = beyond(t, shifted, higher=higher_is_worse)
    k_c = beyond(c, reference, higher=higher_is_worse)
    return replace(
        deflated_share_test(k_c, c.size, k_t, t.size, design_effect, alpha, tightest_at_events),
        method="tail event share beyond a fixed reference",
        margin=margin,
    )


def deflated_share_test(
    control_events: int,
    control_n: int,
    treatment_events: int,
    treatment_n: int,
    design_effect: float,
    alpha: float,
    tightest_at_events: int,
    *,
    margin: float = 0.0,
    higher_is_worse: bool = True,
) -> HarmTest:
    """The event-share test with both arms' event counts divided by ``design_effect``.

    The null share of events comes from the requests (the assignment split), which clustering
    does not change; what clustering changes is the variance of the candidate's event count,
    ``design_effect`` times the binomial one, and dividing the counts by it restores the
    binomial's variance (Kish's effective sample size). Asymptotic in the number of clusters.
    """
    if control_n == 0 or treatment_n == 0 or design_effect <= 1.0:
        return proportion_harm_test(
            control_events,
            control_n,
            treatment_events,
            treatment_n,
            margin=margin,
            higher_is_worse=higher_is_worse,
            alpha=alpha,
            tightest_at_events=tightest_at_events,
        )
    k_c, k_t = round(control_events / design_effect), round(treatment_events / design_effect)
    return proportion_harm_test(
        k_c,
        max(control_n, k_c),
        k_t,
        max(treatment_n, k_t),
        margin=margin,
        higher_is_worse=higher_is_worse,
        alpha=alpha,
        treatment_share=treatment_n / (treatment_n + control_n),
        tightest_at_events=tightest_at_events,
    )


def rate_ceiling_test(
    events: float,
    trials: float,
    ceiling: float,
    *,
    alpha: float = 0.05,
    below: bool = False,
    tightest_at_events: float = 20.0,
) -> HarmTest:
    """Always-valid test of "the event rate is above ``ceiling``" (``below``: "is below it").

    ``estimate`` is the observed rate minus the ceiling (signed so that positive is the
    alternative); ``bound`` is NaN. For a quantile ceiling pass the count of requests beyond it
    and ``ceiling = 1 - q``.
    """
    check_alpha(alpha, upper=0.5)
    method = "beta-binomial mixture against a fixed rate"
    if trials <= 0:
        return _not_ready(method, 0.0, False, alpha, 0, 0)
    log_e = exceedance_log_e(
        events, trials, ceiling, alpha=alpha, tightest_at_events=tightest_at_events, below=below
    )
    s = -1.0 if below else 1.0
    return _from_log_e(
        method,
        log_e=log_e,
        estimate=s * (events / trials - ceiling),
        bound=math.nan,
        margin=0.0,
        relative=False,
        alpha=alpha,
        n_control=0,
        n_treatment=int(trials),
    )


def mean_ceiling_test(
    sample: RunningMoments,
    ceiling: float,
    *,
    alpha: float = 0.05,
    below: bool = False,
    tightest_at: int = 1000,
    min_samples: int = 100,
    design_effect: float = 1.0,
) -> HarmTest:
    """Always-valid test of "the mean is above ``ceiling``" (``below``: "is below it").

    One-sample, one-sided normal mixture on ``z = (mean - ceiling) / se`` with ``se`` the plug-in
    standard error inflated by ``design_effect``: asymptotic, so it waits for ``min_samples``.
    """
    check_alpha(alpha, upper=0.5)
    method = "one-sample normal mixture against a fixed mean"
    n = sample.count
    if n < min_samples:
        return _not_ready(method, 0.0, False, alpha, 0, n)
    s = -1.0 if below else 1.0
    diff = s * (sample.mean - ceiling)
    var = sample.variance
    if var <= 0.0:
        log_e = math.inf if diff > 0.0 else -math.inf
    else:
        se2 = design_effect * var / n
        r = _mixture_tuning(alpha) * var / tightest_at / se2
        log_e = _normal_mixture_log_e(diff / math.sqrt(se2), r)
    return _from_log_e(
        method,
        log_e=log_e,
        estimate=diff,
        bound=math.nan,
        margin=0.0,
        relative=False,
        alpha=alpha,
        n_control=0,
        n_treatment=n,
    )


def beyond(sample: ArrayLike, value: float, *, higher: bool = True) -> int:
    """How many observations lie strictly beyond ``value`` (above, or below when not ``higher``)."""
    x = as_sample(sample)
    return int(np.count_nonzero(x > value if higher else x < value))
