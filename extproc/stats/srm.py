"""Sample-ratio-mismatch (SRM) checks: do the arm counts fit the configured weights?

Why: a broken assignment, a crashing variant that logs fewer requests, or bot traffic pinned to
one arm biases every comparison, silently. The evaluator holds an experiment when the counts are
implausible under the weights (``p < 0.001``).

* :func:`sample_ratio_mismatch` is Pearson's chi-square goodness-of-fit test (SciPy). It is a
  fixed-horizon test: checked every few seconds it raises more false holds than its threshold
  says (``bench/simulate_aa.py`` measures how many); the strict 0.001 threshold keeps that small.
* :func:`sequential_sample_ratio_mismatch` is the always-valid alternative of Lindon and Malek
  (2022, "Anytime-valid inference for multinomial count data"): a Dirichlet-multinomial Bayes
  factor against the configured weights, an exact test martingale, so ``p < threshold`` at any
  look has probability at most ``threshold`` over unlimited looks.

Both assume each counted unit is assigned independently with the configured probabilities; with
sticky conversations, count conversations (not requests) for an exact check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from scipy import special, stats

from extproc.stats.results import SrmResult


def sample_ratio_mismatch(
    counts: Sequence[int], weights: Sequence[float], *, threshold: float = 0.001
) -> SrmResult:
    """Pearson chi-square test of the counts against the weights (need not sum to one).

    A unit counted in an arm of weight zero is a certain mismatch (p = 0). Arms of weight zero
    with no units are left out; with fewer than two arms left (or no units) there is nothing to
    test and p = 1.
    """
    observed, expected = _observed_expected(counts, weights)
    stray = (expected == 0.0) & (observed > 0)
    if stray.any():
        return _result("chi-square", math.inf, 0.0, threshold, observed, expected)
    keep = expected > 0.0
    if keep.sum() < 2 or observed.sum() == 0:
        return _result("chi-square", 0.0, 1.0, threshold, observed, expected)
    result = stats.chisquare(observed[keep], expected[keep])
    return _result(
        "chi-square", float(result.statistic), float(result.pvalue), threshold, observed, expected
    )


def sequential_sample_ratio_mismatch(
    counts: Sequence[int],
    weights: Sequence[float],
    *,
    threshold: float = 0.001,
    prior_strength: float = 1000.0,
) -> SrmResult:
    """Always-valid SRM test: Dirichlet-multinomial mixture against the weights.

    ``statistic`` is the log Bayes factor; ``p_value = min(1, 1 / Bayes factor)``. The prior is
    Dirichlet(``prior_strength`` * weights): its strength sets which mismatches it finds fastest
    (roughly those visible at ``prior_strength`` units; with 1000, a 5% arm that receives 4% is
    found after about 6,000-15,000 units). It is exact, with no minimum sample size.
    """
    if prior_strength <= 0.0:
        raise ValueError(f"prior_strength must be positive, got {prior_strength}")
    observed, expected = _observed_expected(counts, weights)
    method = "dirichlet-multinomial mixture"
    if ((expected == 0.0) & (observed > 0)).any():
        return _result(method, math.inf, 0.0, threshold, observed, expected)
    keep = expected > 0.0
    x = observed[keep].astype(np.float64)
    n = float(x.sum())
    if keep.sum() < 2 or n == 0.0:
        return _result(method, 0.0, 1.0, threshold, observed, expected)
    theta = expected[keep] / n
    a = prior_strength * theta
    log_bf = float(
        special.gammaln(prior_strength)
        - special.gammaln(prior_strength + n)
        + np.sum(special.gammaln(a + x) - special.gammaln(a))
        - np.sum(x * np.log(theta))
    )
    p_value = math.exp(-log_bf) if log_bf > 0.0 else 1.0
    return _result(method, log_bf, p_value, threshold, observed, expected)


def _observed_expected(
    counts: Sequence[int], weights: Sequence[float]
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Validated counts and the expected counts under the normalised weights."""
    observed = np.asarray(counts, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)
    if observed.ndim != 1 or observed.shape != w.shape or observed.size == 0:
        raise ValueError("counts and weights must be non-empty sequences of the same length")
    if (observed < 0).any() or (w < 0.0).any() or w.sum() <= 0.0:
        raise ValueError("counts must be >= 0 and weights >= 0 with a positive sum")
    return observed, observed.sum() * w / w.sum()


def _result(
    method: str,
    statistic: float,
    p_value: float,
    threshold: float,
    observed: NDArray[np.int64],
    expected: NDArray[np.float64],
) -> SrmResult:
    """Pack a result with plain-Python tuples, so it serialises without numpy."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    return SrmResult(
        method=method,
        statistic=statistic,
        p_value=p_value,
        threshold=threshold,
        observed=tuple(int(v) for v in observed),
        expected=tuple(float(v) for v in expected),
    )
