"""The exact stage-end test of a tail: the candidate's share of tail events, pooled over stages.

Why a second tail test beside the carried e-process (:mod:`extproc.stats.exceedance`): an
e-process may be read at every look, and pays for that freedom in power. A test read once per
stage, at the look that ends it, on every stage's tail events so far, spends its alpha as a
one-look test does: on the simulated traffic of docs/EVALUATOR.md it raised the share of
rollouts that caught a p99 +30% before the 50% stage from 17 to 20 of the same 40. The
evaluator runs both (docs/STATISTICS.md, "The tail at each stage's end").

The data: per stage ``k``, ``K_k`` tail events of which ``x_k`` were the candidate's, and the
candidate's share of requests ``s_k`` (the evaluator takes the requests of both arms beyond
their pooled quantile, the candidate's latencies divided by ``1 + margin`` first). Under the
null (in every stage the candidate's labels are exchangeable with stable's, or its tail is
lighter), given ``K_k`` the candidate's count is hypergeometric, or smaller, independently
across stages; far out in its upper tail, where the test rejects, the hypergeometric lies below
Binomial(``K_k``, ``s_k``) (drawing without replacement spreads less), so the convolution of
those binomials gives a p-value for ``T = sum x_k`` that is exact for independent draws and
slightly conservative here (no normal approximation). ``T`` is the score statistic of a common
log ratio of tail rates, the locally most powerful test against a candidate worse in every
stage. One such test per stage end, each at its share of the alpha (Bonferroni), keeps the
chance of any false rejection over the rollout at or below the sum of the shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from extproc.stats._common import check_alpha


@dataclass(frozen=True, slots=True)
class Stratum:
    """One stage's tail events: ``events`` in all, ``treatment`` of them the candidate's, who
    served ``share`` of the stage's requests."""

    events: int
    treatment: int
    share: float

    def __post_init__(self) -> None:
        if not 0 <= self.treatment <= self.events:
            raise ValueError(f"need 0 <= treatment <= events, got {self.treatment}/{self.events}")
        if not 0.0 < self.share < 1.0:
            raise ValueError(f"share must be in (0, 1), got {self.share}")


@dataclass(frozen=True, slots=True)
class StratifiedShareTest:
    """The stage-end verdict: ``harm`` when ``p_value <= alpha``. ``observed`` is the candidate's
    tail events over the strata, ``expected`` their number under the null's boundary."""

    method: str
    harm: bool
    p_value: float
    observed: int
    expected: float
    alpha: float
    strata: int


def stratified_share_test(strata: Sequence[Stratum], *, alpha: float = 0.05) -> StratifiedShareTest:
    """Exact one-sided test of "the candidate's share of tail events is above what its share
    of requests allows" over independent strata (stages), read once."""
    check_alpha(alpha, upper=0.5)
    pmf = np.ones(1)
    observed, expected = 0, 0.0
    for s in strata:
        if s.events == 0:
            continue
        pmf = np.convolve(pmf, stats.binom.pmf(np.arange(s.events + 1), s.events, s.share))
        observed += s.treatment
        expected += s.events * s.share
    p = float(min(1.0, pmf[observed:].sum()))
    return StratifiedShareTest(
        method="exact stratified test of the candidate's share of tail events",
        harm=p <= alpha,
        p_value=p,
        observed=observed,
        expected=expected,
        alpha=alpha,
        strata=sum(1 for s in strata if s.events),
    )
