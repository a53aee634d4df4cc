"""Sample sizes against statsmodels' power solvers; SRM checks against SciPy and by simulation."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.power import NormalIndPower, TTestIndPower  # type: ignore[import-untyped]
from statsmodels.stats.proportion import proportion_effectsize  # type: ignore[import-untyped]

from extproc.stats import (
    sample_ratio_mismatch,
    sample_size_means,
    sample_size_proportions,
    sequential_sample_ratio_mismatch,
)
from extproc.stats.results import Alternative, SrmResult

pytestmark = pytest.mark.timeout(60)

SM_ALTERNATIVE = {"two-sided": "two-sided", "greater": "larger", "less": "smaller"}


def _is_ceiling(n: int, reference: float) -> bool:
    """n is the reference size rounded up (within the solvers' tolerance)."""
    return n - 1 < reference * (1 - 1e-6) and reference * (1 - 1e-6) <= n


@pytest.mark.parametrize(
    ("baseline", "target", "ratio", "alternative"),
    [
        (0.01, 0.03, 5 / 95, "greater"),
        (0.10, 0.12, 1.0, "two-sided"),
        (0.50, 0.45, 0.25, "less"),
        (0.02, 0.025, 1.0, "two-sided"),
    ],
)
def test_sample_size_proportions_matches_statsmodels(
    baseline: float, target: float, ratio: float, alternative: Alternative
) -> None:
    ours = sample_size_proportions(
        baseline, target - baseline, ratio=ratio, alternative=alternative, power=0.9
    )
    h = proportion_effectsize(target, baseline)
    ref = NormalIndPower().solve_power(
        effect_size=h, alpha=0.05, power=0.9, ratio=ratio, alternative=SM_ALTERNATIVE[alternative]
    )
    assert ours.effect_size == pytest.approx(h)
    assert _is_ceiling(ours.n_control, ref)
    assert _is_ceiling(ours.n_treatment, ref * ratio)
    relative = sample_size_proportions(
        baseline,
        target / baseline - 1,
        relative=True,
        ratio=ratio,
        alternative=alternative,
        power=0.9,
    )
    assert relative.n_control == pytest.approx(ours.n_control, rel=1e-6, abs=1)


@pytest.mark.parametrize(
    ("d", "ratio", "alternative"),
    [
        (0.2, 1.0, "two-sided"),
        (0.1375, 5 / 95, "two-sided"),
        (0.5, 2.0, "greater"),
        (1.2, 1.0, "less"),
    ],
)
def test_sample_size_means_matches_statsmodels(
    d: float, ratio: float, alternative: Alternative
) -> None:
    mde = -d * 800 if alternative == "less" else d * 800
    ours = sample_size_means(800, mde, ratio=ratio, alternative=alternative)
    ref = TTestIndPower().solve_power(
        effect_size=mde / 800,
        alpha=0.05,
        power=0.8,
        ratio=ratio,
        alternative=SM_ALTERNATIVE[alternative],
    )
    assert _is_ceiling(ours.n_control, ref)
    rel = sample_size_means(
        800, mde / 1100, baseline_mean=1100, ratio=ratio, alternative=alternative
    )
    assert rel.n_control == ours.n_control
    assert ours.total == ours.n_control + ours.n_treatment


@pytest.mark.parametrize(
    "kwargs",
    [
        {"baseline": 0.0, "mde": 0.01},
        {"baseline": 0.99, "mde": 0.02},
        {"baseline": 0.1, "mde": 0.0},
        {"baseline": 0.1, "mde": 0.02, "power": 1.0},
        {"baseline": 0.1, "mde": 0.02, "ratio": 0.0},
        {"baseline": 0.1, "mde": -0.02, "alternative": "greater"},
    ],
)
def test_sample_size_rejects_bad_designs(kwargs: dict[str, float | str]) -> None:
    with pytest.raises(ValueError, match=r"must|need|cannot"):
        sample_size_proportions(**kwargs)  # type: ignore[arg-type]


def test_sample_size_means_rejects_bad_designs() -> None:
    with pytest.raises(ValueError, match="sd"):
        sample_size_means(0.0, 1.0)
    with pytest.raises(ValueError, match="non-zero"):
        sample_size_means(1.0, 0.0)


@pytest.mark.parametrize(
    ("counts", "weights"),
    [([9500, 480], [95, 5]), ([9500, 420], [0.95, 0.05]), ([100, 120, 80], [1, 1, 1])],
)
def test_srm_chi_square_matches_scipy(counts: list[int], weights: list[float]) -> None:
    ours = sample_ratio_mismatch(counts, weights)
    expected = np.asarray(weights) / sum(weights) * sum(counts)
    ref = stats.chisquare(counts, expected)
    assert ours.statistic == pytest.approx(ref.statistic)
    assert ours.p_value == pytest.approx(ref.pvalue)
    assert ours.mismatch == (ref.pvalue < 0.001)


@pytest.mark.parametrize("check", [sample_ratio_mismatch, sequential_sample_ratio_mismatch])
@pytest.mark.parametrize(
    ("counts", "weights", "p_value"),
    [
        ([0, 0], [0.95, 0.05], 1.0),  # no traffic yet
        ([100, 0, 0], [1.0, 0.0, 0.0], 1.0),  # only one live arm
        ([100, 3], [1.0, 0.0], 0.0),  # traffic on a rolled-back arm
    ],
)
def test_srm_edge_cases(
    check: Callable[[list[int], list[float]], SrmResult],
    counts: list[int],
    weights: list[float],
    p_value: float,
) -> None:
    assert check(counts, weights).p_value == p_value


def test_srm_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same length"):
        sample_ratio_mismatch([1, 2], [1.0])
    with pytest.raises(ValueError, match="weights"):
        sample_ratio_mismatch([1, 2], [0.0, 0.0])


def test_sequential_srm_detects_a_real_mismatch() -> None:
    assert sequential_sample_ratio_mismatch([95_600, 4_400], [0.95, 0.05]).mismatch
    assert not sequential_sample_ratio_mismatch([95_000, 5_000], [0.95, 0.05]).mismatch


def test_sequential_srm_false_alarms_stay_below_threshold_over_200_looks() -> None:
    """A/A with a loose threshold so the Monte Carlo can see the rate: <= 0.05 over 200 looks."""
    rng = np.random.default_rng(11)
    runs, looks, threshold = 400, 200, 0.05
    per_look = rng.binomial(100, 0.05, size=(runs, looks))
    canary = per_look.cumsum(axis=1)
    seen = np.arange(1, looks + 1) * 100
    memo: dict[tuple[int, int], bool] = {}  # the same counts recur across runs

    def mismatch(total: int, canary_count: int) -> bool:
        key = (total, canary_count)
        if key not in memo:
            counts = [total - canary_count, canary_count]
            memo[key] = sequential_sample_ratio_mismatch(
                counts, [0.95, 0.05], threshold=threshold
            ).mismatch
        return memo[key]

    alarms = sum(
        any(mismatch(int(seen[look]), int(canary[run, look])) for look in range(looks))
        for run in range(runs)
    )
    slack = 3 * math.sqrt(threshold * (1 - threshold) / runs)
    assert alarms / runs <= threshold + slack
