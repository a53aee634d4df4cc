"""The exact stage-end tail test, checked against scipy's binomial test, brute-force
enumeration of every outcome, and its size by Monte Carlo."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from extproc.stats.stratified import Stratum, stratified_share_test

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(("k", "n", "share"), [(0, 10, 0.2), (7, 20, 0.1), (30, 60, 0.25)])
def test_one_stratum_is_the_exact_binomial_test(k: int, n: int, share: float) -> None:
    got = stratified_share_test([Stratum(n, k, share)], alpha=0.05)
    want = stats.binomtest(k, n, share, alternative="greater").pvalue
    assert got.p_value == pytest.approx(want, rel=1e-9)
    assert got.expected == pytest.approx(n * share)


def test_several_strata_match_enumeration_of_every_outcome() -> None:
    strata = [Stratum(4, 2, 0.05), Stratum(6, 3, 0.25), Stratum(5, 1, 0.5), Stratum(0, 0, 0.9)]
    observed = sum(s.treatment for s in strata)
    p = 0.0
    for xs in itertools.product(*(range(s.events + 1) for s in strata)):
        if sum(xs) >= observed:
            p += math.prod(
                stats.binom.pmf(x, s.events, s.share) for x, s in zip(xs, strata, strict=True)
            )
    got = stratified_share_test(strata, alpha=0.05)
    assert got.p_value == pytest.approx(p, rel=1e-9)
    assert got.strata == 3  # the stratum without events says nothing


def test_its_size_is_at_most_alpha_under_the_null() -> None:
    """Tail events of a ramp (shares 2, 5, 10, 25%) with equal tail rates: the test rejects at
    most alpha of the time (discreteness makes it conservative)."""
    rng = np.random.default_rng(5)
    shares = [0.02, 0.05, 0.10, 0.25]
    alpha, runs = 0.05, 10_000
    rejected = 0
    for _ in range(runs):
        strata = []
        for s in shares:
            events = int(rng.poisson(30))
            strata.append(Stratum(events, int(rng.binomial(events, s)), s))
        rejected += stratified_share_test(strata, alpha=alpha).harm
    rate = rejected / runs
    assert rate <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / runs)
    assert rate >= alpha / 3  # not vacuous: it does reject near its level


def test_it_has_power_against_a_heavier_candidate_tail() -> None:
    """Candidate tail rate 1.8 times stable's: the pooled test sees what each stage alone
    hardly does."""
    rng = np.random.default_rng(6)
    shares, ratio = [0.02, 0.05, 0.10, 0.25], 1.8
    pooled = alone = 0
    for _ in range(2000):
        strata = []
        for s in shares:
            events = int(rng.poisson(60))
            q = s * ratio / (s * ratio + 1 - s)  # each tail event the candidate's
            strata.append(Stratum(events, int(rng.binomial(events, q)), s))
        pooled += stratified_share_test(strata, alpha=0.01).harm
        alone += stratified_share_test(strata[-1:], alpha=0.01).harm
    assert pooled > 1.5 * alone


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="treatment"):
        Stratum(3, 4, 0.5)
    with pytest.raises(ValueError, match="share"):
        Stratum(3, 1, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        stratified_share_test([Stratum(3, 1, 0.5)], alpha=0.0)
