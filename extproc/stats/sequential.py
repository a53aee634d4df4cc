"""Sequential one-sided tests for harm, valid under continuous monitoring.

Why: the evaluator checks guardrails every few seconds and rolls back on the first alarm. A
fixed-horizon test checked at 200 looks raises a false alarm far more often than its alpha (at
0.05, a one-sided Welch test did so in 15% of simulated A/A canaries and a z-test on error rates
in 28%; ``bench/simulate_aa.py``).
Each test here is built on a test (super)martingale ``M`` with ``M_0 = 1``: by Ville's inequality
``P(M_t >= 1/alpha for some t) <= alpha``, so the false-alarm rate stays below ``alpha`` however
often the evaluator looks and whenever it stops.

Every test answers one question: *is the candidate worse than stable by more than a margin?*
``higher_is_worse`` orients the metric (latency, errors: True; a thumbs-up rate: False).

* :func:`mean_harm_test` (latency, tokens): a one-sided normal-mixture SPRT on the difference of
  means (Johari et al., "Always valid inference", the mSPRT that Eppo and Statsig use; Robbins'
  normal mixture with a half-normal mixing distribution as in Howard et al. 2021), on the
  statistic ``D = mean_t - (1 + margin) mean_c`` (relative) or ``mean_t - mean_c - margin``.
  Exact for Gaussian data with known variances under *any* allocation (with a flat prior on the
  common mean the mixture is a martingale in the invariant filtration). Here the variances are
  estimated, so it is asymptotic, as the asymptotic confidence sequences of Waudby-Smith et al.
  (2021, "Time-uniform central limit theory") are: it needs a burn-in (``min_samples`` per arm,
  default 100) before the plug-in variance can be trusted, more for heavier tails.
* :func:`proportion_harm_test` (errors, refusals): exact and non-asymptotic, with no burn-in, and
  sound for rare events where normal approximations fail. Under random assignment with candidate
  share ``pi``, each *event* (an error) comes from the candidate with probability
  ``theta = pi g / (pi g + 1 - pi)``, where ``g = p_t / p_c``; so "``g <= 1 + margin``" is a
  binomial null on the events alone, whatever the base rate (even one drifting over time). A
  one-sided beta-binomial mixture tests it. Margins are relative (a rate ratio); for an absolute
  margin on a proportion, pass 0/1 outcomes to :func:`mean_harm_test` (asymptotic).
* :func:`quantile_harm_test` (p95/p99 latency): exact and distribution-free. For one arm,
  ``#{X_i < xi_q}`` is a binomial count, so a beta-binomial mixture gives a confidence sequence
  for the q-quantile made of two order statistics (Howard and Ramdas 2022, "Sequential estimation
  of quantiles"). The candidate's lower bound and stable's upper bound, each at part of
  ``alpha`` (union bound), give a time-uniform bound on the ratio (or difference) of quantiles.

The shared assumptions, which no statistics can check for you: observations are independent
within and across arms (sticky conversations make requests of one conversation correlated: use
per-conversation aggregates when that matters), and each arm's distribution is stationary over
the test. Pool data across ramp stages only if the metric is stationary over time and the test
allows it (means: yes; proportions: no, the candidate share must be constant): otherwise run one
test per stage and split ``alpha`` over the stages.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, special

from extproc.stats._common import as_sample, check_alpha, fieller_ratio
from extproc.stats.moments import RunningMoments
from extproc.stats.quantiles import order_statistics
from extproc.stats.results import HarmTest, Interval

_NEWTON_STEPS = 50


def mean_harm_test(
    control: RunningMoments,
    treatment: RunningMoments,
    *,
    margin: float = 0.0,
    relative: bool = False,
    higher_is_worse: bool = True,
    alpha: float = 0.05,
    tightest_at: int = 1000,
    min_samples: int = 100,
) -> HarmTest:
    """Always-valid test of "candidate mean worse than stable mean by more than ``margin``".

    ``margin`` is in the metric's units, or a fraction of stable's mean when ``relative``
    (``0.1``: harm is more than 10% slower; relative needs a positive metric). ``tightest_at``
    is the candidate sample size at which the test is most sensitive when stable has far more data
    (a canary); it sets the mixing distribution's scale from stable's standard deviation.
    ``bound`` is a lower confidence bound on the harm (``s (mean_t - mean_c)``, or ``s (ratio -
    1)`` by Fieller's method), with ``s = +1`` when higher is worse.
    """
    _check_harm_args(margin, relative, higher_is_worse, alpha)
    if tightest_at < 1 or min_samples < 2:
        raise ValueError("tightest_at must be >= 1 and min_samples >= 2")
    s = 1.0 if higher_is_worse else -1.0
    c, t = control, treatment
    method = "normal-mixture SPRT, difference of means"
    if min(c.count, t.count) < min_samples:
        return _not_ready(method, margin, relative, alpha, c.count, t.count)
    g = 1.0 + s * margin if relative else 1.0
    var_c, var_t = c.variance / c.count, t.variance / t.count
    harm_stat = s * (t.mean - g * c.mean) - (0.0 if relative else margin)
    se = math.sqrt(var_t + g * g * var_c)
    if relative:
        estimate = s * (t.mean / c.mean - 1.0) if c.mean != 0.0 else math.nan
    else:
        estimate = s * (t.mean - c.mean)
    if se == 0.0:  # both arms constant: the data show the difference exactly
        exceeded = harm_stat > 0.0
        return _from_log_e(
            method,
            log_e=math.inf if exceeded else -math.inf,
            estimate=estimate,
            bound=estimate,
            margin=margin,
            relative=relative,
            alpha=alpha,
            n_control=c.count,
            n_treatment=t.count,
        )
    # The mixing scale follows stable's spread (the big, settled arm), falling back to the
    # candidate's when stable is constant, so it is effectively fixed after the burn-in.
    scale_var = c.variance if c.variance > 0.0 else t.variance
    tau2 = _mixture_tuning(alpha) * scale_var / tightest_at
    r = tau2 / (se * se)
    z = harm_stat / se
    log_e = _normal_mixture_log_e(z, r)
    z_crit = _normal_mixture_threshold(r, alpha)
    if relative:
        low, high = fieller_ratio(t.mean, var_t, c.mean, var_c, z_crit)
        bound = low - 1.0 if s > 0 else 1.0 - high
    else:
        bound = s * (t.mean - c.mean) - z_crit * se
    return _from_log_e(
        method,
        log_e=log_e,
        estimate=estimate,
        bound=bound,
        margin=margin,
        relative=relative,
        alpha=alpha,
        n_control=c.count,
        n_treatment=t.count,
    )


def proportion_harm_test(
    control_events: int,
    control_n: int,
    treatment_events: int,
    treatment_n: int,
    *,
    margin: float = 0.0,
    higher_is_worse: bool = True,
    alpha: float = 0.05,
    treatment_share: float | None = None,
    tightest_at_events: int = 100,
) -> HarmTest:
    """Exact always-valid test of "candidate event rate worse than stable's by more than margin".

    Harm (``higher_is_worse``) is ``p_t / p_c > 1 + margin``; otherwise ``p_t / p_c < 1 -
    margin``. ``treatment_share`` is the probability that a request goes to the candidate; by
    default the observed share ``treatment_n / (control_n + treatment_n)``, which is right when the
    share was constant over the data tested (one ramp stage). ``tightest_at_events`` is the number
    of events (both arms) at which the mixture is most sensitive. ``estimate`` and ``bound`` are on
    the relative scale ``s (p_t / p_c - 1)``; the bound is the inverted test (a root search).
    """
    _check_harm_args(margin, True, higher_is_worse, alpha)
    for events, n in ((control_events, control_n), (treatment_events, treatment_n)):
        if n < 0 or not 0 <= events <= n:
            raise ValueError(f"need 0 <= events <= n, got events={events}, n={n}")
    method = "beta-binomial mixture on the candidate's share of events"
    if control_n == 0 or treatment_n == 0:
        return _not_ready(method, margin, True, alpha, control_n, treatment_n)
    share = treatment_n / (control_n + treatment_n) if treatment_share is None else treatment_share
    if not 0.0 < share < 1.0:
        raise ValueError(f"treatment_share must be in (0, 1), got {share}")
    s = 1.0 if higher_is_worse else -1.0
    upper = higher_is_worse
    k, total = treatment_events, treatment_events + control_events
    strength = max(tightest_at_events / _mixture_tuning(alpha), 1.0)

    log_e = _event_share_log_e(k, total, share, 1.0 + s * margin, strength, upper)
    p_c, p_t = control_events / control_n, treatment_events / treatment_n
    estimate = s * (p_t / p_c - 1.0) if p_c > 0.0 else (s * math.inf if p_t > 0.0 else math.nan)
    ratio_bound = _ratio_bound(k, total, share, strength, alpha, upper)
    return _from_log_e(
        method,
        log_e=log_e,
        estimate=estimate,
        bound=s * (ratio_bound - 1.0),
        margin=margin,
        relative=True,
        alpha=alpha,
        n_control=control_n,
        n_treatment=treatment_n,
    )


def win_rate_harm_test(
    wins: int,
    decisive: int,
    *,
    floor: float = 0.5,
    margin: float = 0.0,
    alpha: float = 0.05,
    tightest_at: int = 100,
) -> HarmTest:
    """Exact always-valid test of "the candidate wins less often than ``floor - margin``".

    For pairwise verdicts (a judge comparing the candidate's answer with stable's on the same
    prompt): ``wins`` of ``decisive`` verdicts (ties left out) went to the candidate. Under the
    null the win probability is at least ``floor - margin``; the test is the beta-binomial mixture
    likelihood ratio on the alternative side, a test supermartingale, so checking it after every
    verdict keeps the false-alarm rate at or below ``alpha``. ``estimate`` and ``bound`` are on
    the scale of the shortfall ``floor - p``; ``bound`` is NaN (not computed).
    """
    check_alpha(alpha, upper=0.5)
    p0 = floor - margin
    if not 0.0 < p0 < 1.0:
        raise ValueError(f"floor - margin must be in (0, 1), got {p0}")
    if not 0 <= wins <= decisive:
        raise ValueError(f"need 0 <= wins <= decisive, got {wins}, {decisive}")
    method = "beta-binomial mixture on the candidate's share of decisive verdicts"
    if decisive == 0:
        return _not_ready(method, margin, False, alpha, 0, 0)
    strength = max(tightest_at / _mixture_tuning(alpha), 1.0)
    log_e = _beta_mixture_log_e(wins, decisive, p0, strength, upper=False)
    return _from_log_e(
        method,
        log_e=log_e,
        estimate=floor - wins / decisive,
        bound=math.nan,
        margin=margin,
        relative=False,
        alpha=alpha,
        n_control=0,
        n_treatment=decisive,
    )


def quantile_harm_test(
    control: ArrayLike,
    treatment: ArrayLike,
    *,
    q: float = 0.99,
    margin: float = 0.0,
    relative: bool = True,
    higher_is_worse: bool = True,
    alpha: float = 0.05,
    tightest_at: int = 1000,
    control_alpha_share: float = 0.5,
    control_design_effect: float = 1.0,
    treatment_design_effect: float = 1.0,
) -> HarmTest:
    """Exact always-valid test of "candidate q-quantile worse than stable's by more than margin".

    Harm is ``L_t / U_c - 1 > margin`` (relative; positive metrics) or ``L_t - U_c > margin``,
    where ``L_t`` is a time-uniform lower bound on the candidate's quantile at level ``alpha (1 -
    control_alpha_share)`` and ``U_c`` an upper bound on stable's at ``alpha *
    control_alpha_share`` (mirrored when lower is worse). It has no e-value (``e_value`` and
    ``p_value`` are NaN); ``ready`` is False until both bounds are finite (for p99 at alpha 0.05
    with the default split: 527 stable observations, 5 candidate ones).

    Design effects (>= 1, :mod:`extproc.stats.clustered`) widen each arm's bounds for requests
    clustered by conversation: the ranks are those of ``n / design_effect`` observations, scaled
    back to the same fraction of the arm's ``n`` (asymptotic in the number of clusters).
    """
    _check_harm_args(margin, relative, higher_is_worse, alpha)
    if control_design_effect < 1.0 or treatment_design_effect < 1.0:
        raise ValueError("design effects must be >= 1")
    if not 0.0 < control_alpha_share < 1.0:
        raise ValueError(f"control_alpha_share must be in (0, 1), got {control_alpha_share}")
    c, t = as_sample(control), as_sample(treatment)
    method = f"order-statistic confidence sequences, q={q:g}"
    alpha_c = alpha * control_alpha_share
    alpha_t = alpha - alpha_c
    d_t, d_c = treatment_design_effect, control_design_effect
    if higher_is_worse:
        t_point, t_bound = _point_and_bound(t, q, alpha_t, "lower", tightest_at, d_t)
        c_point, c_bound = _point_and_bound(c, q, alpha_c, "upper", tightest_at, d_c)
    else:
        t_point, t_bound = _point_and_bound(t, q, alpha_t, "upper", tightest_at, d_t)
        c_point, c_bound = _point_and_bound(c, q, alpha_c, "lower", tightest_at, d_c)
    s = 1.0 if higher_is_worse else -1.0
    ready = math.isfinite(t_bound) and math.isfinite(c_bound)
    if relative:
        estimate = s * (t_point / c_point - 1.0) if c_point > 0.0 else math.nan
        ready = ready and c_bound > 0.0
        bound = s * (t_bound / c_bound - 1.0) if ready else -math.inf
    else:
        estimate = s * (t_point - c_point)
        bound = s * (t_bound - c_bound) if ready else -math.inf
    return HarmTest(
        method=method,
        harm=ready and bound > margin,
        ready=ready,
        estimate=estimate,
        bound=bound,
        e_value=math.nan,
        p_value=math.nan,
        margin=margin,
        relative=relative,
        alpha=alpha,
        n_control=int(c.size),
        n_treatment=int(t.size),
    )


def quantile_confidence_sequence(
    sample: ArrayLike,
    q: float,
    *,
    alpha: float = 0.05,
    side: Literal["two-sided", "lower", "upper"] = "two-sided",
    tightest_at: int = 1000,
) -> Interval:
    """Time-uniform confidence interval for the q-quantile of one arm's stream.

    With probability at least ``1 - alpha`` the interval contains the true quantile at *every*
    sample size simultaneously, so it can be recomputed as data arrive. Exact for any
    distribution (ties included) given i.i.d. draws; ends that cannot be bounded yet are infinite.
    """
    check_alpha(alpha, upper=0.5)
    x = as_sample(sample)
    tail = alpha / 2.0 if side == "two-sided" else alpha
    low = _point_and_bound(x, q, tail, "lower", tightest_at)[1] if side != "upper" else -math.inf
    high = _point_and_bound(x, q, tail, "upper", tightest_at)[1] if side != "lower" else math.inf
    return Interval(low, high)


def confidence_sequence_rank(
    n: int, q: float, alpha: float, side: Literal["lower", "upper"], tightest_at: int = 1000
) -> int:
    """1-based rank of the order statistic that bounds the q-quantile time-uniformly.

    ``upper``: the smallest k whose beta-binomial e-value against ``P(X < xi_q) <= q`` reaches
    ``1/alpha``; ``X_(k)`` is then an upper bound; ``n + 1`` means none yet. ``lower``: ``X_(k)``
    with k one above the largest count rejected by the mirrored test; 0 means none yet. Depends
    only on (n, q, alpha, tightest_at), so it is cached, and usable with any store that can return
    an order statistic (a sorted array, or conservatively the bucket edges of a histogram).
    """
    check_alpha(alpha, upper=0.5)
    if not 0.0 < q < 1.0 or n < 0 or tightest_at < 1:
        raise ValueError("need q in (0, 1), n >= 0, tightest_at >= 1")
    strength = max(tightest_at / _mixture_tuning(alpha), 1.0)
    return _cs_rank(n, q, alpha, strength, side == "upper")


@lru_cache(maxsize=65536)
def _cs_rank(n: int, q: float, alpha: float, strength: float, upper: bool) -> int:
    """Binary search over counts k; the e-value is monotone in k (increasing when ``upper``)."""
    threshold = -math.log(alpha)

    def rejects(k: int) -> bool:
        return _beta_mixture_log_e(k, n, q, strength, upper) >= threshold

    if upper:
        if n == 0 or not rejects(n):
            return n + 1
        lo, hi = 0, n  # invariant: rejects(hi)
        while lo < hi:
            mid = (lo + hi) // 2
            if rejects(mid):
                hi = mid
            else:
                lo = mid + 1
        return hi
    if n == 0 or not rejects(0):
        return 0
    lo, hi = 0, n  # invariant: rejects(lo); find the largest rejected count
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if rejects(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo + 1


def _point_and_bound(
    x: np.ndarray[tuple[int], np.dtype[np.float64]],
    q: float,
    alpha: float,
    side: Literal["lower", "upper"],
    tightest_at: int,
    design_effect: float = 1.0,
) -> tuple[float, float]:
    """The arm's inverted-cdf q-quantile and its one-sided time-uniform bound, one partition.

    With a design effect the bound's rank is that of the effective sample size ``n / deff``,
    scaled back to the same fraction of ``n`` (rounded outwards)."""
    n = int(x.size)
    if n == 0:
        return math.nan, -math.inf if side == "lower" else math.inf
    n_eff = max(int(n / design_effect), 1)
    rank = confidence_sequence_rank(n_eff, q, alpha, side, tightest_at)
    if n_eff != n and 1 <= rank <= n_eff:
        scaled = rank * n / n_eff
        rank = min(math.ceil(scaled), n) if side == "upper" else max(math.floor(scaled), 1)
    elif n_eff != n:
        rank = n + 1 if side == "upper" else 0
    point_rank = min(max(math.ceil(n * q), 1), n)
    point, bound = order_statistics(x, [point_rank, rank])
    return point, bound


def _beta_mixture_log_e(k: float, n: float, p0: float, strength: float, upper: bool) -> float:
    """Log e-value of k successes in n Bernoulli trials against ``p <= p0`` (``upper``) or
    ``p >= p0``: the likelihood ratio mixed over Beta(p0 s, (1 - p0) s) restricted to the
    alternative side. A supermartingale under the null (each factor has mean <= 1).
    """
    a, b = p0 * strength, (1.0 - p0) * strength
    tail = special.betaincc if upper else special.betainc
    post = float(tail(a + k, b + n - k, p0))
    if post <= 0.0:
        return -math.inf
    log_lik0 = (k * math.log(p0) if k else 0.0) + ((n - k) * math.log1p(-p0) if n - k else 0.0)
    return (
        float(special.betaln(a + k, b + n - k))
        + math.log(post)
        - _log_prior_mass(p0, strength, upper)
        - log_lik0
    )


@lru_cache(maxsize=4096)
def _log_prior_mass(p0: float, strength: float, upper: bool) -> float:
    """log B(a, b) + log of the prior's mass on the alternative side (the mixture's normaliser)."""
    a, b = p0 * strength, (1.0 - p0) * strength
    tail = special.betaincc if upper else special.betainc
    return float(special.betaln(a, b)) + math.log(float(tail(a, b, p0)))


def _event_share_log_e(
    k: int, total: int, share: float, ratio: float, strength: float, upper: bool
) -> float:
    """Log e-value of k candidate events among ``total`` against the rate ratio ``ratio``."""
    theta0 = share * ratio / (share * ratio + 1.0 - share)
    return _beta_mixture_log_e(k, total, theta0, strength, upper)


@lru_cache(maxsize=65536)
def _ratio_bound(
    k: int, total: int, share: float, strength: float, alpha: float, upper: bool
) -> float:
    """The rate ratio where the e-value crosses ``1/alpha``: the confidence sequence's end.

    Lower end (``upper``) when harm is a high ratio, upper end otherwise. Brent's method on the
    log ratio, bracketed by the maximum-likelihood ratio (where the e-value is at most 1).
    Cached: with a fixed ``share`` the same counts recur across looks and simulations.
    """
    if upper and k == 0:
        return 0.0
    if not upper and k == total:
        return math.inf
    if 0 < k < total:
        mle = math.log(k / (total - k) * (1.0 - share) / share)
    else:
        mle = math.log(1e12) if upper else math.log(1e-12)
    far = mle - 25.0 if upper else mle + 25.0
    threshold = -math.log(alpha)

    def excess(log_ratio: float) -> float:
        return _event_share_log_e(k, total, share, math.exp(log_ratio), strength, upper) - threshold

    if excess(mle) >= 0.0:
        return math.exp(mle)
    if excess(far) < 0.0:
        return math.exp(far)
    return math.exp(float(optimize.brentq(excess, far, mle, xtol=1e-5)))


def _normal_mixture_log_e(z: float, r: float) -> float:
    """Log of the one-sided (half-normal) normal mixture martingale at standardised z.

    With S = I * D and V = I (I: information, 1/se^2) and mixing variance tau^2, r = tau^2 I:
    M = 2 / sqrt(1 + r) * exp(r z^2 / (2 (1 + r))) * Phi(z sqrt(r / (1 + r))).
    """
    a = r / (1.0 + r)
    return float(
        math.log(2.0) - 0.5 * math.log1p(r) + 0.5 * a * z * z + special.log_ndtr(z * math.sqrt(a))
    )


def _normal_mixture_threshold(r: float, alpha: float) -> float:
    """The z at which the mixture reaches 1/alpha, by Newton's method.

    ``log M`` is increasing and convex in z (the second derivative of log Phi lies in (-1, 0)),
    so Newton's iterates are monotone after the first step; the start ignores the Phi factor.
    """
    a = r / (1.0 + r)
    k = math.sqrt(a)
    target = -math.log(alpha)
    z = math.sqrt((2.0 * math.log(1.0 / (2.0 * alpha)) + math.log1p(r)) / a)
    for _ in range(_NEWTON_STEPS):
        f = _normal_mixture_log_e(z, r) - target
        mills = math.exp(
            -0.5 * (k * z) ** 2 - 0.5 * math.log(2.0 * math.pi) - special.log_ndtr(k * z)
        )
        step = f / (a * z + k * mills)
        z -= step
        if abs(step) < 1e-10:
            break
    return z


def _mixture_tuning(alpha: float) -> float:
    """``tau^2 * I`` that makes a one-sided normal mixture tightest at information I.

    Minimising the boundary ``sqrt((1 + x) / x * (L + log(1 + x)))`` over ``x = tau^2 I``, with
    ``L = 2 log(1 / (2 alpha))``, gives ``x = L + log(1 + x)``; ``L + log(1 + L)`` is within a few
    percent and the boundary is flat there.
    """
    big_l = 2.0 * math.log(1.0 / (2.0 * alpha))
    return big_l + math.log1p(big_l)


def _not_ready(
    method: str, margin: float, relative: bool, alpha: float, n_control: int, n_treatment: int
) -> HarmTest:
    """A look before the test has the data it needs: no harm, no evidence."""
    return HarmTest(
        method=method,
        harm=False,
        ready=False,
        estimate=math.nan,
        bound=-math.inf,
        e_value=1.0,
        p_value=1.0,
        margin=margin,
        relative=relative,
        alpha=alpha,
        n_control=n_control,
        n_treatment=n_treatment,
    )


def _from_log_e(
    method: str,
    *,
    log_e: float,
    estimate: float,
    bound: float,
    margin: float,
    relative: bool,
    alpha: float,
    n_control: int,
    n_treatment: int,
) -> HarmTest:
    """A ready look of an e-value test: harm when the e-value reaches 1/alpha (Ville)."""
    return HarmTest(
        method=method,
        harm=log_e >= -math.log(alpha),
        ready=True,
        estimate=estimate,
        bound=bound,
        e_value=math.exp(log_e) if log_e < 700.0 else math.inf,
        p_value=min(1.0, math.exp(-log_e)) if log_e > -700.0 else 1.0,
        margin=margin,
        relative=relative,
        alpha=alpha,
        n_control=n_control,
        n_treatment=n_treatment,
    )


def _check_harm_args(margin: float, relative: bool, higher_is_worse: bool, alpha: float) -> None:
    """Margins are tolerances (>= 0); a relative 100% margin when lower is worse means 'never'."""
    check_alpha(alpha, upper=0.5)
    if margin < 0.0 or not math.isfinite(margin):
        raise ValueError(f"margin must be finite and >= 0, got {margin}")
    if relative and not higher_is_worse and margin >= 1.0:
        raise ValueError("a relative margin must be < 1 when lower is worse")
