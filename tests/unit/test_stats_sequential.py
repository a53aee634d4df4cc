"""Sequential harm tests: A/A false alarms over 200 looks, power, bounds, edge cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import special, stats

from extproc.stats import (
    RunningMoments,
    confidence_sequence_rank,
    mean_harm_test,
    proportion_harm_test,
    quantile_confidence_sequence,
    quantile_harm_test,
)
from extproc.stats.sequential import _normal_mixture_log_e, _normal_mixture_threshold

pytestmark = pytest.mark.timeout(60)

ALPHA = 0.05
LOOKS = 200


def _slack(runs: int, rate: float = ALPHA) -> float:
    """Three Monte Carlo standard errors of a rate estimated from ``runs`` runs."""
    return 3 * math.sqrt(rate * (1 - rate) / runs)


def _latency(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    """Lognormal LLM-like latency in ms: median 800, sigma 0.8 (p99 about 5 s)."""
    return scale * 800.0 * np.exp(0.8 * rng.standard_normal(shape))


def _mean_alarm_look(
    rng: np.random.Generator, per_look: tuple[int, int], scale: float, **kwargs: float | bool
) -> int | None:
    """Feed one simulated canary look by look; the look of the first harm, if any."""
    n_c, n_t = per_look
    control = _latency(rng, (LOOKS, n_c))
    treatment = _latency(rng, (LOOKS, n_t), scale)
    mc, mt = RunningMoments(), RunningMoments()
    for look in range(LOOKS):
        mc, mt = mc.update(control[look]), mt.update(treatment[look])
        if mean_harm_test(mc, mt, **kwargs).harm:  # type: ignore[arg-type]
            return look
    return None


def test_mean_harm_aa_false_alarms_within_alpha_over_200_looks() -> None:
    rng = np.random.default_rng(21)
    runs = 300
    alarms = sum(_mean_alarm_look(rng, (95, 5), 1.0) is not None for _ in range(runs))
    assert alarms / runs <= ALPHA + _slack(runs)


def test_mean_harm_aa_relative_margin_balanced_split() -> None:
    """A/A with a 10% tolerance: far from the null boundary, so alarms should be rare."""
    rng = np.random.default_rng(22)
    runs = 150
    alarms = sum(
        _mean_alarm_look(rng, (10, 10), 1.0, margin=0.1, relative=True) is not None
        for _ in range(runs)
    )
    assert alarms / runs <= ALPHA + _slack(runs)


def test_mean_harm_at_the_null_boundary_with_a_margin() -> None:
    """Candidate exactly 10% slower, margin 10%: the hardest null; still <= alpha."""
    rng = np.random.default_rng(23)
    runs = 200
    alarms = sum(
        _mean_alarm_look(rng, (50, 50), 1.1, margin=0.1, relative=True) is not None
        for _ in range(runs)
    )
    assert alarms / runs <= ALPHA + _slack(runs)


def test_mean_harm_detects_a_real_regression() -> None:
    """+25% latency at a 5% canary: found within 200 looks (1000 candidate requests)."""
    rng = np.random.default_rng(24)
    runs = 50
    found = sum(_mean_alarm_look(rng, (95, 5), 1.25) is not None for _ in range(runs))
    assert found / runs >= 0.9


def _events_alarm_look(
    rng: np.random.Generator, rate_c: float, rate_t: float, per_look: tuple[int, int]
) -> int | None:
    n_c, n_t = per_look
    ec = rng.binomial(n_c, rate_c, LOOKS).cumsum()
    et = rng.binomial(n_t, rate_t, LOOKS).cumsum()
    for look in range(LOOKS):
        nc, nt = n_c * (look + 1), n_t * (look + 1)
        share = n_t / (n_c + n_t)
        if proportion_harm_test(int(ec[look]), nc, int(et[look]), nt, treatment_share=share).harm:
            return look
    return None


@pytest.mark.parametrize(("rate", "runs"), [(0.01, 300), (0.2, 80)])
def test_proportion_harm_aa_false_alarms_within_alpha(rate: float, runs: int) -> None:
    """Rare errors (where normal approximations fail) and a common event (refusals)."""
    rng = np.random.default_rng(31)
    alarms = sum(_events_alarm_look(rng, rate, rate, (95, 5)) is not None for _ in range(runs))
    assert alarms / runs <= ALPHA + _slack(runs)


def test_proportion_harm_detects_errors_tripling() -> None:
    rng = np.random.default_rng(32)
    runs = 100
    found = sum(_events_alarm_look(rng, 0.01, 0.03, (95, 5)) is not None for _ in range(runs))
    assert found / runs >= 0.9


def test_proportion_harm_is_exact_for_rare_events() -> None:
    """No burn-in: one candidate error against a clean stable arm is not harm."""
    result = proportion_harm_test(0, 2000, 1, 100)
    assert result.ready
    assert not result.harm
    assert proportion_harm_test(0, 0, 0, 0).ready is False


def test_proportion_bound_agrees_with_the_decision_and_is_monotone() -> None:
    """The e-value falls as the null ratio rises, so the confidence set is a ray and the
    inverted bound exceeds a margin exactly when the test at that margin says harm."""
    share = 0.05
    for k, total in [(5, 40), (12, 60), (30, 220), (1, 3), (40, 40)]:
        args = (total - k, 19_000, k, 1000)
        bound_ratio = proportion_harm_test(*args, treatment_share=share).bound + 1
        margins = np.linspace(0.0, 4.0, 41)
        e_values = [
            proportion_harm_test(*args, treatment_share=share, margin=m).e_value for m in margins
        ]
        assert all(a >= b for a, b in itertools.pairwise(e_values))
        for margin in margins:
            if not math.isclose(bound_ratio, 1 + margin, rel_tol=1e-4):
                decided = proportion_harm_test(*args, treatment_share=share, margin=margin).harm
                assert decided == (bound_ratio > 1 + margin)


@pytest.mark.parametrize("upper", [True, False])
def test_confidence_sequence_rank_crossing_rate_at_every_sample(upper: bool) -> None:
    """Exact check of the quantile CS: a binomial walk that crosses the rank boundary at any n."""
    q, alpha, n_max, walks = 0.9, 0.05, 1500, 4000
    side = "upper" if upper else "lower"
    ranks = np.array(
        [confidence_sequence_rank(n, q, alpha, side) for n in range(1, n_max + 1)]  # type: ignore[arg-type]
    )
    rng = np.random.default_rng(41)
    below = (rng.random((walks, n_max)) < q).cumsum(axis=1)  # #{X_i < xi_q} for continuous X
    # Upper bound fails when k* observations fall below xi; lower when too few are at or below.
    failed = (below >= ranks).any(axis=1) if upper else (below < ranks).any(axis=1)
    assert failed.mean() <= alpha + _slack(walks, alpha)
    assert (np.diff(ranks) >= 0).all()  # more data never loosens the rank


def test_quantile_harm_aa_and_power() -> None:
    rng = np.random.default_rng(42)
    runs, per_look = 150, 10
    alarms = 0
    for _ in range(runs):
        c = _latency(rng, (LOOKS * per_look,))
        t = _latency(rng, (LOOKS * per_look,))
        for look in range(20, LOOKS, 4):
            n = look * per_look
            if quantile_harm_test(c[:n], t[:n], q=0.9).harm:
                alarms += 1
                break
    assert alarms / runs <= ALPHA + _slack(runs)
    c, t = _latency(rng, (4000,)), _latency(rng, (4000,), 1.3)
    result = quantile_harm_test(c, t, q=0.9)
    assert result.harm
    assert result.bound > 0.1
    assert not quantile_harm_test(c, t, q=0.9, margin=0.5).harm


def test_quantile_harm_not_ready_on_small_samples() -> None:
    result = quantile_harm_test([800.0] * 50, [900.0] * 50, q=0.99)
    assert not result.ready
    assert not result.harm
    assert result.bound == -math.inf
    lower_is_worse = quantile_harm_test(
        np.arange(1.0, 3001.0), np.arange(1.0, 3001.0) * 0.5, q=0.5, higher_is_worse=False
    )
    assert lower_is_worse.harm
    assert lower_is_worse.estimate == pytest.approx(0.5, abs=1e-3)


def test_quantile_confidence_sequence_is_wider_than_fixed_and_covers() -> None:
    rng = np.random.default_rng(43)
    x = rng.lognormal(0, 0.8, 5000)
    cs = quantile_confidence_sequence(x, 0.99)
    truth = math.exp(0.8 * stats.norm.ppf(0.99))
    assert cs.contains(truth)
    assert quantile_confidence_sequence(x[:10], 0.99).width == math.inf
    lower = quantile_confidence_sequence(x, 0.99, side="lower")
    assert lower.high == math.inf
    assert lower.low >= cs.low


@pytest.mark.parametrize("r", [1e-4, 0.05, 1.0, 30.0, 1e4])
def test_normal_mixture_threshold_solves_the_boundary(r: float) -> None:
    z = _normal_mixture_threshold(r, ALPHA)
    assert _normal_mixture_log_e(z, r) == pytest.approx(-math.log(ALPHA), abs=1e-9)
    # The closed form of the one-sided mixture against numerical integration over lambda >= 0.
    lam = np.linspace(0, abs(z) + 40, 400_001)
    integrand = np.exp(lam * z - lam**2 / 2 - lam**2 / (2 * r)) * 2 / math.sqrt(2 * math.pi * r)
    numeric = float(np.trapezoid(integrand, lam))
    assert _normal_mixture_log_e(z, r) == pytest.approx(math.log(numeric), rel=1e-4)
    assert special.log_ndtr(0.0) < 0  # sanity: the Phi factor only lowers the e-value


def test_mean_bound_and_decision_agree() -> None:
    rng = np.random.default_rng(51)
    c = RunningMoments.of(_latency(rng, (20_000,)))
    t = RunningMoments.of(_latency(rng, (1500,), 1.15))
    for relative, margin in [(False, 0.0), (False, 50.0), (True, 0.05), (True, 0.2)]:
        result = mean_harm_test(c, t, margin=margin, relative=relative)
        assert result.ready
        assert result.harm == (result.bound > margin)
        assert result.bound < result.estimate


@pytest.mark.parametrize(
    ("control", "treatment", "harm"),
    [
        ([5.0] * 200, [5.0] * 200, False),  # both constant and equal
        ([5.0] * 200, [6.0] * 200, True),  # both constant, candidate worse
        ([5.0] * 200, [4.0] * 200, False),  # both constant, candidate better
    ],
)
def test_mean_harm_zero_variance(control: list[float], treatment: list[float], harm: bool) -> None:
    result = mean_harm_test(RunningMoments.of(control), RunningMoments.of(treatment))
    assert result.ready
    assert result.harm == harm


def test_overwhelming_evidence_does_not_overflow() -> None:
    c = RunningMoments.of(np.linspace(99.0, 101.0, 50_000))
    t = RunningMoments.of(np.linspace(199.0, 201.0, 50_000))
    result = mean_harm_test(c, t)
    assert result.harm
    assert result.e_value == math.inf
    assert result.p_value == 0.0


def test_mean_harm_burn_in_and_direction() -> None:
    small = mean_harm_test(RunningMoments.of([1.0, 2.0]), RunningMoments.of([5.0, 9.0]))
    assert not small.ready
    assert not small.harm
    assert small.p_value == 1.0
    rng = np.random.default_rng(52)
    good = RunningMoments.of(rng.normal(0.7, 0.1, 5000))
    worse = RunningMoments.of(rng.normal(0.6, 0.1, 500))  # thumbs-up rate fell
    assert mean_harm_test(good, worse, higher_is_worse=False).harm
    assert not mean_harm_test(good, worse).harm
    relative = mean_harm_test(good, worse, higher_is_worse=False, relative=True, margin=0.05)
    assert relative.harm
    assert relative.estimate == pytest.approx(1 - 0.6 / 0.7, abs=0.02)


@pytest.mark.parametrize(
    "kwargs",
    [{"margin": -0.1}, {"alpha": 0.5}, {"margin": 1.0, "relative": True, "higher_is_worse": False}],
)
def test_harm_arguments_validated(kwargs: dict[str, float | bool]) -> None:
    m = RunningMoments.of([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"alpha|margin"):
        mean_harm_test(m, m, **kwargs)  # type: ignore[arg-type]


def test_quantile_and_event_inputs_validated() -> None:
    with pytest.raises(ValueError, match="NaN"):
        quantile_harm_test([1.0, math.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match="events"):
        proportion_harm_test(5, 4, 0, 10)
    # Lower is worse (events are good): candidate events against none in stable is no harm.
    better = proportion_harm_test(0, 1000, 3, 100, higher_is_worse=False)
    assert better.estimate == -math.inf
    assert not better.harm
