"""The A/B decision: its tests, its rule (ship, keep stable, inconclusive), its sample sizes,
its configuration and its place at the end of an ``ab`` run."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from extproc.config import ConfigError, parse_experiment
from extproc.evaluator import decision
from extproc.evaluator.guardrails import judge
from extproc.evaluator.window import StageWindow, VariantWindow
from extproc.stats.abtest import binomial_win_rate, cohens_d_interval, holm, median_test
from extproc.stats.classic import wilson_interval
from extproc.stats.power import sample_size_proportions, sample_size_win_rate

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import simulate_ab_decision as sim

pytestmark = pytest.mark.timeout(60)

BASE: dict[str, Any] = {
    **sim.EXPERIMENT,
    "rollout": {"min_stage_seconds": 0, "min_stage_samples": 10},
    "ab": {},
}


def spec_with(**ab: Any) -> Any:
    return parse_experiment({**BASE, "ab": ab}).spec


def arm(
    seed: int,
    n: int = 2000,
    *,
    latency: float = 800.0,
    errors: int = 20,
    wins: int = 0,
    losses: int = 0,
    ties: int = 0,
    score: float = 7.0,
    feedback: dict[str, int] | None = None,
) -> VariantWindow:
    """One arm's window: ``n`` requests, lognormal latency around ``latency``, rubric scores
    around ``score`` for a tenth of them, and the given counts."""
    rng = np.random.default_rng(seed)
    w = VariantWindow(requests=n, errors=errors, answered=n - errors)
    w.latency_ms.extend(rng.lognormal(np.log(latency), 0.5, n - errors))
    w.completion_tokens.extend(rng.poisson(120, n - errors).astype(float))
    w.judge_scores.extend(np.clip(rng.normal(score, 1.2, n // 10), 1, 10))
    w.judge_wins, w.judge_losses, w.judge_ties = wins, losses, ties
    w.feedback = dict(feedback or {})
    w.keys.update(f"{seed}-{i}" for i in range(n))  # a conversation each
    return w


def metric(d: decision.AbDecision, name: str) -> decision.MetricResult:
    return next(m for m in d.metrics if m.metric == name)


# --- the tests ----------------------------------------------------------------------------------


def test_win_rate_is_scipys_exact_binomial_test_with_a_wilson_interval() -> None:
    rate, ci, p = binomial_win_rate(60, 40, alpha=0.05)
    assert rate == 0.6
    assert p == pytest.approx(stats.binomtest(60, 100, 0.5).pvalue)
    w = wilson_interval(60, 100, alpha=0.05)
    assert (ci.low, ci.high) == pytest.approx((w.low, w.high))
    assert all(math.isnan(x) for x in (binomial_win_rate(0, 0)[0], binomial_win_rate(0, 0)[2]))


def test_holm_steps_down_and_leaves_untested_out() -> None:
    got = holm([0.01, 0.04, 0.03, math.nan])
    assert got[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(got[3])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_cohens_d_interval_covers_the_true_effect_at_its_level() -> None:
    rng = np.random.default_rng(3)
    covered = 0
    runs = 400
    for _ in range(runs):
        _, ci = cohens_d_interval(rng.normal(0, 1, 100), rng.normal(0.3, 1, 100), alpha=0.05)
        covered += ci.contains(0.3)
    assert 0.92 <= covered / runs <= 0.98


def test_median_test_is_moods_and_says_one_when_all_tie() -> None:
    x, y = np.arange(50.0), np.arange(50.0) + 20
    assert median_test(x, y) == pytest.approx(stats.median_test(x, y, ties="below").pvalue)
    assert median_test(np.ones(5), np.ones(7)) == 1.0
    assert math.isnan(median_test([], [1.0]))


def test_win_rate_sample_size_gives_its_power() -> None:
    size = sample_size_win_rate(0.6, alpha=0.05, power=0.8)
    assert size.n_treatment == size.n_control == 194  # ((1.96 + 0.8416) / h)^2, h = 0.2014
    rng = np.random.default_rng(5)
    wins = rng.binomial(size.n_treatment, 0.6, 2000)
    power = np.mean([stats.binomtest(int(k), size.n_treatment).pvalue < 0.05 for k in wins])
    assert 0.76 <= power <= 0.86
    with pytest.raises(ValueError, match=r"other than 0\.5"):
        sample_size_win_rate(0.5)


# --- the rule -----------------------------------------------------------------------------------


def test_a_better_primary_with_no_secondary_worse_ships() -> None:
    spec = spec_with()
    d = decision.decide(spec, "canary", arm(1), arm(2, wins=300, losses=200, ties=40))
    assert d.outcome == "ship"
    win = metric(d, "judge_win_rate")
    assert (win.finding, win.better, win.candidate) == ("better", "higher", 0.6)
    assert win.ci is not None
    assert win.ci[0] > 0
    assert win.note == "300 wins, 200 losses, 40 ties"
    assert metric(d, "latency").adjusted_p is not None  # secondary: Holm-adjusted
    assert metric(d, "cost").finding == "no data"  # no prices
    assert d.needed is None


def test_a_secondary_harm_keeps_stable_even_when_the_primary_is_better() -> None:
    d = decision.decide(spec_with(), "canary", arm(1), arm(2, errors=90, wins=300, losses=200))
    assert d.outcome == "keep"
    assert metric(d, "error_rate").finding == "worse"
    assert "error rate" in d.why


def test_a_worse_primary_keeps_stable() -> None:
    d = decision.decide(spec_with(primary="latency"), "canary", arm(1), arm(2, latency=900))
    assert d.outcome == "keep"
    lat = metric(d, "latency")
    assert lat.finding == "worse"
    assert lat.adjusted_p == lat.p_value  # the primary is not adjusted


def test_no_difference_is_inconclusive_with_the_sample_still_needed() -> None:
    spec = spec_with(mde=0.1)
    d = decision.decide(spec, "canary", arm(1), arm(2, wins=52, losses=48))
    assert d.outcome == "inconclusive"
    assert d.needed == (194, 194)
    doc = d.to_json()
    assert doc["more_needed"] == [94, 94]
    assert doc["decision"] == "inconclusive"
    lines = decision.render(doc)
    assert lines[0].startswith("A/B decision for canary: INCONCLUSIVE")
    assert "per arm needed for mde 0.1: stable 194, candidate 194 (94 and 94 more)" in lines[1]


def test_without_a_configured_mde_the_observed_effect_sizes_the_rest() -> None:
    d = decision.decide(spec_with(), "canary", arm(1), arm(2, wins=53, losses=47))
    assert d.outcome == "inconclusive"
    assert d.sized_for == "the observed effect +0.03"
    assert d.needed is not None
    assert d.needed[0] == sample_size_win_rate(0.53).n_control


def test_a_primary_without_data_is_inconclusive_and_says_so() -> None:
    d = decision.decide(spec_with(), "canary", arm(1), arm(2))
    assert (d.outcome, d.why, d.needed) == ("inconclusive", "judge win rate: no data", None)


def test_latency_p50_is_compared_by_its_medians() -> None:
    spec = spec_with(primary="latency", latency="p50")
    d = decision.decide(spec, "canary", arm(1), arm(2, latency=700))
    lat = metric(d, "latency")
    assert lat.label == "latency p50"
    assert lat.test.startswith("Mood's median test")
    assert lat.difference is not None
    assert lat.difference < 0
    assert d.outcome == "ship"


def test_rubric_scores_and_feedback_are_compared_when_present() -> None:
    spec = spec_with(primary="rubric")
    s = arm(1, feedback={"up": 100, "down": 60})
    c = arm(2, score=7.6, feedback={"up": 100, "down": 20, "retry": 5})
    d = decision.decide(spec, "canary", s, c)
    rub = metric(d, "rubric")
    assert rub.scale == "Cohen's d"
    assert rub.difference is not None
    assert rub.difference > 0.3
    fb = metric(d, "negative_feedback_rate")
    assert (fb.stable, fb.candidate) == (60 / 2000, 25 / 2000)
    assert fb.finding == "better"
    assert d.outcome == "ship"
    assert metric(
        decision.decide(spec, "canary", arm(1), arm(2)), "negative_feedback_rate"
    ).finding == ("no data")


# --- when the run ends --------------------------------------------------------------------------


def test_min_samples_counts_the_primary_metrics_unit() -> None:
    spec = spec_with(min_samples=150)
    ok, why = decision.ready(spec, arm(1), arm(2, wins=60, losses=40, ties=30))
    assert not ok
    assert why == "A/B: judge_win_rate samples stable 100/150, candidate 100/150 (ab.min_samples)"
    assert decision.ready(spec, arm(1), arm(2, wins=90, losses=60))[0]


def test_min_samples_auto_sizes_for_the_mde_from_stables_own_figures() -> None:
    spec = spec_with(primary="error_rate", min_samples="auto", mde=1.0)
    small = decision.ready(spec, arm(1, n=20, errors=1), arm(2, n=20, errors=1))
    assert small == (
        False,
        "A/B: measuring stable's error_rate to size the run (ab.min_samples auto)",
    )
    ok, why = decision.ready(spec, arm(1, n=1000, errors=10), arm(2, n=1000, errors=10))
    # 1% -> 2% at an even split, two-sided 5%, power 80% (`extproc sample-size error_rate
    # --baseline 0.01 --mde 1 --relative`, one-sided there): the arcsine formula's 2,254 per arm
    assert sample_size_proportions(0.01, 1.0, relative=True).n_control == 2254
    assert not ok
    assert "stable 1000/2254, candidate 1000/2254" in why
    assert decision.ready(spec, arm(1, n=2400, errors=24), arm(2, n=2400, errors=24))[0]


def window_of(stable: VariantWindow, canary: VariantWindow) -> StageWindow:
    w = StageWindow(started_ms=0, stable="stable")
    w.variants.update(stable=stable, canary=canary)
    return w


def test_an_ab_run_completes_with_its_decision_once_the_sample_is_there() -> None:
    spec = spec_with(min_samples=400)
    weights = {"stable": 50.0, "canary": 50.0}
    early = judge(spec, window_of(arm(1), arm(2, wins=150, losses=100)), weights, 0, 60)
    assert early.action == "none"
    assert not early.decisions
    assert any("judge_win_rate samples stable 250/400" in r for r in early.reasons)
    done = judge(spec, window_of(arm(1), arm(2, wins=260, losses=160)), weights, 0, 60)
    assert done.action == "complete"
    assert [d.outcome for d in done.decisions] == ["ship"]
    assert "A/B decision for canary: SHIP THE CANDIDATE" in " ".join(done.reasons)


# --- configuration ------------------------------------------------------------------------------


def test_every_ab_problem_is_reported_with_its_path() -> None:
    raw = {
        **BASE,
        "strategy": "canary",
        "judge": None,
        "ab": {
            "min_samples": "auto",
            "primary": "cost",
            "metrics": ["latency", "rubric", "bogus", "latency"],
            "power": 1.5,
            "alpha": 0.7,
        },
    }
    del raw["judge"]
    with pytest.raises(ConfigError) as err:
        parse_experiment(raw)
    text = str(err.value)
    for problem in (
        "ab.metrics.2: Input should be",
        "ab.power: Input should be less than 1",
        "ab.alpha: Input should be less than 0.5",
        "ab: used by strategy ab only, not canary",
        "ab.primary: cost is not in ab.metrics",
        "ab.metrics.3: latency is listed twice",
        "ab.primary: cost needs a price on every variant",
        "ab.mde: required when ab.min_samples is auto",
    ):
        assert problem in text


def test_a_primary_of_the_judge_needs_a_judge_and_a_dumped_spec_parses_again() -> None:
    no_judge = {k: v for k, v in BASE.items() if k != "judge"}
    with pytest.raises(ConfigError, match=r"ab\.primary: rubric needs a judge: section"):
        parse_experiment({**no_judge, "ab": {"primary": "rubric"}})
    # The definition in Redis is the dumped spec: with or without an ab section it must load.
    for doc in (no_judge, {**no_judge, "strategy": "canary", "ab": None}, BASE):
        spec = parse_experiment(doc).spec
        assert parse_experiment(spec.model_dump(mode="json")).spec == spec


def test_the_default_primary_must_be_among_the_metrics_and_a_win_rate_mde_below_half() -> None:
    with pytest.raises(ConfigError) as err:
        parse_experiment({**BASE, "ab": {"metrics": ["latency"], "mde": 0.5}})
    text = str(err.value)
    assert "ab.primary: judge_win_rate (the default primary metric) is not in ab.metrics" in text
    assert "ab.mde: points above a 50% win rate, must be < 0.5, got 0.5" in text
    no_judge = {k: v for k, v in BASE.items() if k != "judge"}
    assert decision.primary_metric(parse_experiment(no_judge).spec) == "latency"
    assert decision.primary_metric(parse_experiment(BASE).spec) == "judge_win_rate"
