"""Design effects: how much clustering by conversation inflates the variance of a mean or rate.

Why: assignment is per conversation (the sticky key), and the requests of one conversation or
agent session are alike (one slow session makes many slow requests, one session that trips a
refusal pattern trips it again). Tests that count requests as independent then see far more
evidence than there is: at a 2% share the candidate's first 200 requests may come from three
sessions. The design effect ``deff = Var_cluster / Var_iid`` of the arm's mean (or rate) measures
it; dividing the counts by it (Kish's effective sample size) restores the variance the
independent-request tests assume. ``Var_cluster`` is the cluster-robust (CR1, Liang-Zeger)
variance of the ratio estimator ``sum(y) / sum(m)`` over clusters, the one statsmodels computes
for an intercept-only regression with ``cov_type="cluster"``; it is consistent as the number of
clusters grows, so the evaluator also waits for a minimum number of distinct conversations.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def design_effect(sums: ArrayLike, sizes: ArrayLike, sums_of_squares: ArrayLike) -> float:
    """``Var_cluster / Var_iid`` of the mean ``sum(sums) / sum(sizes)``, at least 1.

    Per cluster: ``sums`` of the values, ``sizes`` (observations), ``sums_of_squares`` (for 0/1
    events, the sums again). One cluster or no spread: 1 (nothing to estimate it from).
    """
    y = np.asarray(sums, dtype=np.float64)
    m = np.asarray(sizes, dtype=np.float64)
    sq = np.asarray(sums_of_squares, dtype=np.float64)
    keep = m > 0
    y, m, sq = y[keep], m[keep], sq[keep]
    g, n = y.size, float(m.sum())
    if g < 2 or n < 2:
        return 1.0
    mean = float(y.sum()) / n
    var_iid = (float(sq.sum()) - n * mean * mean) / (n - 1) / n
    if var_iid <= 0.0:
        return 1.0
    resid = y - mean * m
    var_cluster = g / (g - 1) * float(np.square(resid).sum()) / (n * n)
    return max(1.0, var_cluster / var_iid)


def column_design_effect(values: ArrayLike, clusters: ArrayLike) -> float:
    """The design effect of the mean of ``values``, observation ``i`` in cluster ``clusters[i]``
    (small non-negative integers: per-cluster sums by ``np.bincount``)."""
    x = np.asarray(values, dtype=np.float64)
    ids = np.asarray(clusters, dtype=np.int64)
    if x.size != ids.size:
        raise ValueError(f"{x.size} values but {ids.size} cluster ids")
    if x.size == 0:
        return 1.0
    return design_effect(
        np.bincount(ids, weights=x),
        np.bincount(ids),
        np.bincount(ids, weights=x * x),
    )
