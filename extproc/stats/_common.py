"""Helpers shared by the test modules: argument checks, p-values and intervals from a pivot."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from extproc.stats.results import Alternative, Interval

ALTERNATIVES: tuple[Alternative, ...] = ("two-sided", "greater", "less")


def as_sample(sample: ArrayLike) -> NDArray[np.float64]:
    """A flat float64 array (no copy when already one), rejecting NaN: a NaN latency is a
    telemetry bug, and order statistics would silently sort it last."""
    x = np.asarray(sample, dtype=np.float64).ravel()
    if np.isnan(x).any():
        raise ValueError("sample contains NaN")
    return x


def check_alpha(alpha: float, *, upper: float = 1.0) -> None:
    """Reject levels outside (0, upper): a silent alpha of 5 or 0 is a configuration bug."""
    if not 0.0 < alpha < upper:
        raise ValueError(f"alpha must be in (0, {upper}), got {alpha}")


def check_alternative(alternative: str) -> None:
    """Reject misspelt alternatives instead of silently running a two-sided test."""
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")


def critical_value(alpha: float, alternative: Alternative, df: float | None) -> float:
    """The pivot's critical value: a t quantile when ``df`` is given, else a normal one."""
    tail = alpha / 2 if alternative == "two-sided" else alpha
    return float(stats.t.isf(tail, df) if df is not None else stats.norm.isf(tail))


def pivot_test(
    estimate: float, se: float, alternative: Alternative, alpha: float, df: float | None
) -> tuple[float, float, Interval]:
    """Statistic, p-value and interval of ``estimate / se`` against a t(df) or normal pivot.

    A zero standard error (both samples constant) is the limit of the test as the spread goes to
    zero: the p-value is 0 when the estimate lies on the alternative's side, 1 otherwise, and the
    interval shrinks to the estimate. A NaN input gives NaN outputs.
    """
    if math.isnan(estimate) or math.isnan(se):
        return math.nan, math.nan, Interval(math.nan, math.nan)
    crit = critical_value(alpha, alternative, df)
    if se == 0.0:
        statistic = math.copysign(math.inf, estimate) if estimate != 0.0 else 0.0
        on_side = {
            "two-sided": estimate != 0.0,
            "greater": estimate > 0.0,
            "less": estimate < 0.0,
        }[alternative]
        p_value = 0.0 if on_side else 1.0
    else:
        statistic = estimate / se
        dist = stats.t(df) if df is not None else stats.norm()
        if alternative == "two-sided":
            p_value = float(2.0 * dist.sf(abs(statistic)))
        elif alternative == "greater":
            p_value = float(dist.sf(statistic))
        else:
            p_value = float(dist.cdf(statistic))
    low = estimate - crit * se if alternative != "less" else -math.inf
    high = estimate + crit * se if alternative != "greater" else math.inf
    return statistic, min(p_value, 1.0), Interval(low, high)


def fieller_ratio(
    numerator: float, var_numerator: float, denominator: float, var_denominator: float, crit: float
) -> tuple[float, float]:
    """Fieller's interval for ``numerator / denominator`` of two independent estimates.

    The interval is the set of ratios ``g`` with ``|num - g * den| <= crit * sqrt(var_num + g^2
    var_den)``. Fieller rather than the delta method because it stays honest when the denominator
    is noisy: when the denominator is not clearly away from zero (``den^2 <= crit^2 var_den``) the
    set is unbounded and we say so with infinite ends. Returns (low, high) for a two-sided level;
    a caller wanting one bound passes the one-sided ``crit`` and reads one end.
    """
    a = denominator * denominator - crit * crit * var_denominator
    b = numerator * denominator
    c = numerator * numerator - crit * crit * var_numerator
    disc = b * b - a * c
    if a <= 0.0 or disc < 0.0:
        return -math.inf, math.inf
    root = math.sqrt(disc)
    return (b - root) / a, (b + root) / a
