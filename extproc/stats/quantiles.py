"""Confidence intervals for a quantile (p95, p99) and for its difference between two samples.

Why: "p99 went from 2.1 s to 2.4 s" says nothing by itself: with 300 candidate requests the p99
is the third-largest value and moves by seconds between samples. A decision needs an interval for
the difference, not a threshold on two point estimates.

Quantiles here are the ``inverted_cdf`` definition (the ``ceil(n q)``-th smallest value), the one
order-statistic theory speaks about. Two methods:

* ``"order-statistic"`` (default): for each arm, the distribution-free interval
  ``[X_(l), X_(u)]`` whose ranks come from Binomial(n, q): coverage is at least the nominal level
  for any distribution (continuous or not), at any n, with no resampling. The two arms' intervals
  are combined conservatively (Bonferroni: each arm at ``alpha / 2``; the difference's bounds are
  ``L_t - U_c`` and ``U_t - L_c``), so the difference interval covers with probability at least
  ``1 - alpha``, usually more. Below the smallest n that can bound the quantile (for p99 at 95%,
  two-sided, about 300-370 per arm) a bound is infinite, honestly.
* ``"bootstrap"``: percentile bootstrap of the difference, seeded. It resamples order statistics
  exactly without resampling data: the k-th smallest of a resample of n is ``X_(ceil(n U))`` with
  ``U ~ Beta(k, n - k + 1)``, so B resamples cost B beta draws plus one sort per arm
  (hand-written because no library does this). Narrower than the order-statistic interval, but
  only asymptotically valid, and poor for extreme quantiles at small n.

Both are fixed-horizon: they are valid at one look. The sequential guardrail for quantiles is
:func:`extproc.stats.sequential.quantile_harm_test`.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from extproc.stats._common import as_sample, check_alpha, check_alternative
from extproc.stats.results import UNBOUNDED, Alternative, Interval, QuantileComparison

QuantileMethod = Literal["order-statistic", "bootstrap"]

_MIRROR: dict[Alternative, Alternative] = {
    "two-sided": "two-sided",
    "greater": "less",
    "less": "greater",
}


def quantile_ci(
    sample: ArrayLike, q: float, *, alpha: float = 0.05, alternative: Alternative = "two-sided"
) -> Interval:
    """Distribution-free order-statistic interval for the q-quantile of one sample.

    ``alternative="greater"`` gives a lower bound only, ``"less"`` an upper bound only. An end the
    sample is too small to bound is infinite.
    """
    check_alpha(alpha)
    check_alternative(alternative)
    _check_q(q)
    x = as_sample(sample)
    return _order_statistic_interval(x, q, alpha, alternative)


def quantile_difference(
    control: ArrayLike,
    treatment: ArrayLike,
    *,
    q: float = 0.99,
    alpha: float = 0.05,
    alternative: Alternative = "two-sided",
    method: QuantileMethod = "order-statistic",
    n_boot: int = 2000,
    seed: int = 0,
) -> QuantileComparison:
    """Interval for ``quantile(treatment) - quantile(control)`` and for their ratio minus one.

    ``alternative="greater"`` gives a lower bound (is the candidate's quantile higher?),
    ``"less"`` an upper bound. ``n_boot`` and ``seed`` apply to the bootstrap only; the same seed
    gives the same interval. 100k observations per arm take a few milliseconds.
    """
    check_alpha(alpha)
    check_alternative(alternative)
    _check_q(q)
    c, t = as_sample(control), as_sample(treatment)
    qc, qt = _point_quantile(c, q), _point_quantile(t, q)
    if method == "order-statistic":
        ci, relative_ci = _order_statistic_difference(c, t, q, alpha, alternative)
    elif method == "bootstrap":
        if n_boot < 100:
            raise ValueError(f"n_boot must be at least 100, got {n_boot}")
        ci, relative_ci = _bootstrap_difference(c, t, q, alpha, alternative, n_boot, seed)
    else:
        raise ValueError(f"unknown method {method!r}")
    relative_estimate = qt / qc - 1.0 if qc > 0.0 else None
    return QuantileComparison(
        method=method,
        q=q,
        alternative=alternative,
        alpha=alpha,
        control_quantile=qc,
        treatment_quantile=qt,
        estimate=qt - qc,
        ci=ci,
        relative_estimate=relative_estimate,
        relative_ci=relative_ci if relative_estimate is not None else None,
        n_control=int(c.size),
        n_treatment=int(t.size),
    )


def order_statistic_ranks(n: int, q: float, alpha: float, side: Literal["lower", "upper"]) -> int:
    """1-based rank of the order statistic bounding the q-quantile at one-sided level ``alpha``.

    ``lower``: the largest l with P(Bin(n, q) <= l - 1) <= alpha, so P(X_(l) > quantile) <= alpha;
    0 means no lower bound. ``upper``: the smallest u with P(Bin(n, q) >= u) <= alpha; ``n + 1``
    means no upper bound.
    """
    if side == "lower":
        j = int(stats.binom.ppf(alpha, n, q))  # smallest j with cdf(j) >= alpha
        return j + 1 if stats.binom.cdf(j, n, q) <= alpha else j
    return int(stats.binom.ppf(1.0 - alpha, n, q)) + 1


def order_statistics(x: NDArray[np.float64], ranks: list[int]) -> list[float]:
    """Values of the given 1-based ranks (0: -inf, n + 1: +inf) with one O(n) partition."""
    n = x.size
    inside = sorted({r - 1 for r in ranks if 1 <= r <= n})
    part = np.partition(x, inside) if inside else x
    return [-math.inf if r < 1 else math.inf if r > n else float(part[r - 1]) for r in ranks]


def _order_statistic_interval(
    x: NDArray[np.float64], q: float, alpha: float, alternative: Alternative
) -> Interval:
    """One arm's interval; ``alpha`` is split over the two ends when two-sided."""
    n = x.size
    if n == 0:
        return UNBOUNDED
    tail = alpha / 2.0 if alternative == "two-sided" else alpha
    lo_rank = order_statistic_ranks(n, q, tail, "lower") if alternative != "less" else 0
    hi_rank = order_statistic_ranks(n, q, tail, "upper") if alternative != "greater" else n + 1
    low, high = order_statistics(x, [lo_rank, hi_rank])
    return Interval(low, high)


def _order_statistic_difference(
    c: NDArray[np.float64], t: NDArray[np.float64], q: float, alpha: float, alt: Alternative
) -> tuple[Interval, Interval | None]:
    """Bonferroni combination of the arms' order-statistic intervals (each at ``alpha / 2``)."""
    lo_side = alt
    hi_side = _MIRROR[alt]
    # For a lower bound on t - c we need t's lower and c's upper end, and so on.
    ti = _order_statistic_interval(t, q, alpha / 2.0, lo_side)
    ci = _order_statistic_interval(c, q, alpha / 2.0, hi_side)
    diff = Interval(
        ti.low - ci.high if alt != "less" else -math.inf,
        ti.high - ci.low if alt != "greater" else math.inf,
    )
    relative = None
    if ci.low > 0.0 or (alt == "greater" and ci.high > 0.0):
        relative = Interval(
            ti.low / ci.high - 1.0 if alt != "less" else -1.0,
            ti.high / ci.low - 1.0 if alt != "greater" else math.inf,
        )
    return _nan_to_unbounded(diff), relative


def _bootstrap_difference(
    c: NDArray[np.float64],
    t: NDArray[np.float64],
    q: float,
    alpha: float,
    alt: Alternative,
    n_boot: int,
    seed: int,
) -> tuple[Interval, Interval | None]:
    """Percentile bootstrap of the difference and ratio via exact order-statistic resampling."""
    if c.size == 0 or t.size == 0:
        return UNBOUNDED, None
    rng = np.random.default_rng(seed)
    boot_c = _bootstrap_quantiles(c, q, n_boot, rng)
    boot_t = _bootstrap_quantiles(t, q, n_boot, rng)
    probs = {
        "two-sided": (alpha / 2, 1 - alpha / 2),
        "greater": (alpha, 1.0),
        "less": (0.0, 1 - alpha),
    }
    lo_p, hi_p = probs[alt]
    diff = boot_t - boot_c

    def interval(values: NDArray[np.float64], floor: float) -> Interval:
        low = float(np.quantile(values, lo_p)) if alt != "less" else floor
        high = float(np.quantile(values, hi_p)) if alt != "greater" else math.inf
        return Interval(low, high)

    relative = None
    if (boot_c > 0.0).all():
        relative = interval(boot_t / boot_c - 1.0, -1.0)
    return interval(diff, -math.inf), relative


def _bootstrap_quantiles(
    x: NDArray[np.float64], q: float, n_boot: int, rng: np.random.Generator
) -> NDArray[np.float64]:
    """``n_boot`` draws of the bootstrap q-quantile: X_(ceil(n U)), U ~ Beta(k, n - k + 1)."""
    n = x.size
    k = _rank(n, q)
    u = rng.beta(k, n - k + 1, size=n_boot)
    idx = np.clip(np.ceil(n * u).astype(np.int64), 1, n) - 1
    return np.sort(x)[idx]


def _point_quantile(x: NDArray[np.float64], q: float) -> float:
    """The ``ceil(n q)``-th smallest value (numpy's ``inverted_cdf``); NaN for no data."""
    if x.size == 0:
        return math.nan
    return order_statistics(x, [_rank(x.size, q)])[0]


def _rank(n: int, q: float) -> int:
    """1-based rank of the inverted-cdf q-quantile of n values."""
    return min(max(math.ceil(n * q), 1), n)


def _nan_to_unbounded(interval: Interval) -> Interval:
    """inf - inf is NaN in IEEE; for a bound it means 'unbounded'."""
    low = -math.inf if math.isnan(interval.low) else interval.low
    high = math.inf if math.isnan(interval.high) else interval.high
    return Interval(low, high)


def _check_q(q: float) -> None:
    """The quantile level must be strictly inside (0, 1)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
