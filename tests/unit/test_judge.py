"""The evaluator's pure decisions, table-tested on synthetic stage windows."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from extproc.config import parse_experiment
from extproc.evaluator import machine
from extproc.evaluator.guardrails import (
    Verdict,
    budget,
    carry_evidence,
    initial_evidence,
    judge,
    stage_weight,
)
from extproc.evaluator.rollout import RolloutState, rollback_weights, stage_weights
from extproc.evaluator.window import StageWindow
from extproc.telemetry.v1.event_pb2 import Assignment, ErrorClass, TelemetryEvent

BASE: dict[str, Any] = {
    "name": "exp",
    "salt": "s",
    "stable": "stable",
    "variants": {"stable": {"cluster": "a", "weight": 95}, "canary": {"cluster": "b", "weight": 5}},
    "rollout": {"stages": [10, 50, 100], "min_stage_seconds": 10, "min_stage_samples": 50},
    "guardrails": [
        {"metric": "error_rate", "max_increase": 0.5, "min_samples": 50},
        {"metric": "latency_p50", "max_increase": 0.2, "min_samples": 50},
        {"metric": "completion_tokens", "max_increase": 0.5, "action": "warn", "min_samples": 50},
    ],
}
WEIGHTS = {"stable": 90.0, "canary": 10.0}


def window(
    n_stable: int = 2000,
    n_canary: int = 220,
    err: tuple[float, float] = (0.01, 0.01),
    latency: tuple[float, float] = (800.0, 800.0),
    tokens: tuple[float, float] = (100.0, 100.0),
    seed: int = 1,
) -> StageWindow:
    rng = np.random.default_rng(seed)
    w = StageWindow(started_ms=0)
    for i, (variant, n) in enumerate((("stable", n_stable), ("canary", n_canary))):
        for j in range(n):
            failed = rng.random() < err[i]
            outcome = ErrorClass.ERROR_CLASS_UPSTREAM_5XX if failed else ErrorClass.ERROR_CLASS_NONE
            ev = TelemetryEvent(
                variant=variant,
                key_hash=f"{variant}{j}",
                time_unix_ms=1,
                assignment=Assignment.ASSIGNMENT_STICKY,
                error=outcome,
            )
            if not failed:
                ev.duration_ms = float(rng.lognormal(np.log(latency[i]), 0.3))
                ev.completion_tokens = int(rng.poisson(tokens[i]))
            w.add(ev)
    return w


@pytest.mark.parametrize(
    ("case", "kwargs", "age", "action", "reason"),
    [
        ("healthy, stage old enough", {}, 60, "advance", "stage 1/3 healthy"),
        ("healthy, too young", {}, 5, "none", None),
        ("too few candidate requests", {"n_stable": 300, "n_canary": 30}, 60, "none", None),
        ("errors 1% -> 20%", {"err": (0.01, 0.2)}, 60, "rollback", "error rate"),
        ("latency +60%", {"latency": (800.0, 1280.0)}, 5, "rollback", "latency_p50"),
        ("wordier: warn only", {"tokens": (100.0, 200.0)}, 60, "advance", "warning"),
        ("srm: canary gets far too much", {"n_canary": 1500}, 60, "hold", "sample ratio"),
    ],
)
def test_judge_table(
    case: str, kwargs: dict[str, Any], age: float, action: str, reason: str | None
) -> None:
    spec = parse_experiment(BASE).spec
    v = judge(spec, window(**kwargs), WEIGHTS, stage=0, stage_age_s=age)
    assert v.action == action, (case, v.reasons)
    if reason:
        assert any(reason in r for r in v.reasons), (case, v.reasons)


def test_last_stage_completes_and_weights_follow_stages() -> None:
    spec = parse_experiment(BASE).spec
    v = judge(spec, window(), {"stable": 0.0, "canary": 100.0}, stage=2, stage_age_s=60)
    assert v.action == "complete"
    assert stage_weights(spec, 0) == {"canary": 10, "stable": 90}
    assert stage_weights(spec, 2) == {"canary": 99, "stable": 1}  # rollout.holdback
    assert stage_weights(spec, 2, holdback=False) == {"canary": 100, "stable": 0}
    assert rollback_weights(spec) == {"stable": 100.0, "canary": 0.0}


def test_alpha_is_split_over_gating_guardrails_and_per_stage_tests_over_stages() -> None:
    spec = parse_experiment(BASE).spec
    b = budget(spec)  # warn guardrails do not gate
    assert b.rollout == pytest.approx(0.05 / 2)
    assert b.stage == pytest.approx(0.05 / (2 * 3))
    # prior weights of "the regression begins at stage k": 1/2, 1/4, 1/4
    assert [stage_weight(spec, k) for k in range(3)] == pytest.approx(
        [math.log(0.5), math.log(0.25), math.log(0.25)]
    )
    assert initial_evidence(spec, 0) == pytest.approx(math.log(0.5))
    assert initial_evidence(spec, 2) == pytest.approx(0.0)


def test_evidence_carries_across_stages() -> None:
    """Errors 1% -> 5%: too few candidate requests in any one stage, caught with the carried
    evidence of the stages before."""
    spec = parse_experiment(BASE).spec
    args = {"n_stable": 1500, "n_canary": 200, "err": (0.01, 0.05)}
    first = judge(spec, window(**args, seed=3), WEIGHTS, stage=0, stage_age_s=60)
    assert first.action == "advance"
    evidence: dict[str, float] = {}
    for stage in range(3):
        v = judge(spec, window(**args, seed=3 + stage), WEIGHTS, stage, 60, evidence)
        if v.action == "rollback":
            break
        evidence = carry_evidence(spec, evidence, stage, v)
    assert v.action == "rollback", v.reasons
    assert "evidence e=" in " ".join(v.reasons)
    assert stage == 2
    (check,) = [c for c in v.checks if c.metric == "error_rate"]
    assert check.log_e is not None
    assert check.log_e < -math.log(budget(spec).rollout)  # this stage alone: not enough


def test_a_healthy_stage_does_not_bury_a_later_regression() -> None:
    spec = parse_experiment(BASE).spec
    healthy = judge(spec, window(n_canary=2000, n_stable=8000), WEIGHTS, 0, 60)
    evidence = carry_evidence(spec, {}, 0, healthy)
    key = "canary/error_rate"
    assert evidence[key] >= stage_weight(spec, 1)  # a fresh start at stage 2 keeps its weight
    bad = judge(spec, window(err=(0.01, 0.2)), WEIGHTS, 1, 60, evidence)
    assert bad.action == "rollback"


def test_promote_carries_the_last_verdicts_evidence() -> None:
    spec = parse_experiment(BASE).spec
    state = machine.start(spec, 0.0).state
    v = judge(spec, window(err=(0.01, 0.03)), WEIGHTS, 0, 5)
    t = machine.command(spec, state, "promote", "ops", "", 10.0, v)
    assert t.state.stage == 1
    assert set(t.state.evidence) == {
        "canary/error_rate",
        "canary/completion_tokens",
        "canary/latency_p50#reference",  # stable's median this stage: the next stage's reference
        # this stage's tail events, for the stage-end tests of the stages after it
        "canary/latency_p50#stage0.events",
        "canary/latency_p50#stage0.treatment",
        "canary/latency_p50#stage0.share",
    }
    assert t.state.evidence == carry_evidence(spec, {}, 0, v)


def test_a_hold_is_recorded_when_its_cause_changes_not_its_figures() -> None:
    """A shared incident held for many looks leaves one audit record; a new cause leaves one
    more. (The reasons carry counts and an e-value that change at every look.)"""
    spec = parse_experiment(BASE).spec
    state = machine.start(spec, 0.0).state
    actions = []
    held = [
        "canary: error rate 10/50, ceiling 2.00%; evidence e=1.17e+03 holding",
        "canary: error rate 195/973, ceiling 2.00%; evidence e=1.02e+119 holding",
        "canary: error rate 201/1010, ceiling 2.00%; evidence e=3.4e+121 holding",
        "canary: needs 12 more conversations",
        "canary: needs 3 more conversations",
        "canary-2: needs 3 more conversations",
    ]
    for n, reason in enumerate(held):
        t = machine.step(spec, state, Verdict("hold", [reason]), float(n))
        actions.append(t.action)
        state = t.state
    assert actions == ["hold", "", "", "hold", "", "hold"]
    assert state.last_reasons == [held[-1]]


def test_blue_green_flips_after_mirrored_checks() -> None:
    raw = {
        **BASE,
        "strategy": "blue-green",
        "variants": {
            "stable": {"cluster": "a", "weight": 100},
            "canary": {"cluster": "b", "weight": 0},
        },
        "shadow": {"variant": "canary", "share": 100},
    }
    spec = parse_experiment(raw).spec
    state = machine.start(spec, 0.0)
    assert state.weights == {"stable": 100.0, "canary": 0.0}
    w = machine.new_window(spec, 0.0)
    assert w.shadow_as_candidate
    healthy = window()
    w.variants = healthy.variants
    t = machine.evaluate(spec, state.state, w, state.weights, 60.0)
    assert t.action == "complete", t.reasons
    assert t.weights == {"stable": 0.0, "canary": 100.0}
    assert "flip" in t.weights_reason
    back = machine.command(spec, t.state, "rollback", "ops", "", 70.0)
    assert back.weights == {"stable": 100.0, "canary": 0.0}


def test_blue_green_needs_a_mirrored_variant_at_zero() -> None:
    from extproc.config import ConfigError

    raw = {**BASE, "strategy": "blue-green"}
    with pytest.raises(ConfigError) as err:
        parse_experiment(raw)
    text = str(err.value)
    assert "shadow.variant: required by strategy blue-green" in text
    assert "shadow.share: must be > 0" in text
    raw["shadow"] = {"variant": "canary", "share": 50}
    with pytest.raises(ConfigError, match=r"variants\.canary\.weight: must be 0 under blue-green"):
        parse_experiment(raw)


def test_ab_completes_with_a_decision() -> None:
    spec = parse_experiment({**BASE, "strategy": "ab"}).spec
    v = judge(spec, window(latency=(800.0, 900.0)), WEIGHTS, stage=0, stage_age_s=60)
    assert v.action == "complete"
    report = " ".join(v.reasons)
    assert "A/B decision for canary: KEEP STABLE: latency mean worse" in report
    assert "(Welch t): worse" in report
    assert "error rate (secondary, lower is better)" in report


def test_status_reports_cost_per_request() -> None:
    from extproc.config import Price
    from extproc.telemetry import rollup

    ev = TelemetryEvent(variant="canary", prompt_tokens=1000, completion_tokens=500, duration_ms=1)
    got = rollup.tally([ev, ev])[("assigned", "canary")].figures(
        Price(input_per_mtok=1, output_per_mtok=2)
    )
    assert got["cost_per_request"] == pytest.approx(0.002)


def _events(
    variant: str,
    n: int,
    *,
    conversations: int | None = None,
    errors: float = 0.0,
    latency: float = 800.0,
    sigma: float = 0.3,
    refusals: np.ndarray | None = None,
    tools: float = 0.3,
    seed: int = 1,
) -> list[TelemetryEvent]:
    """``n`` finished requests of ``variant``, spread over ``conversations`` sticky keys (one
    per request by default); ``refusals`` gives each conversation its own refusal rate."""
    rng = np.random.default_rng(seed)
    convs = conversations or n
    out = []
    for j in range(n):
        conv = j % convs
        ev = TelemetryEvent(
            variant=variant,
            key_hash=f"{variant}-{conv}",
            time_unix_ms=1,
            assignment=Assignment.ASSIGNMENT_STICKY,
        )
        if rng.random() < errors:
            ev.error = ErrorClass.ERROR_CLASS_UPSTREAM_5XX
        else:
            ev.duration_ms = float(rng.lognormal(np.log(latency), sigma))
            rate = 0.02 if refusals is None else float(refusals[conv])
            ev.refusal = bool(rng.random() < rate)
            ev.tool_calls = bool(rng.random() < tools)
        out.append(ev)
    return out


def _stage(*arms: list[TelemetryEvent]) -> StageWindow:
    w = StageWindow(started_ms=0)
    for evs in arms:
        for ev in evs:
            w.add(ev)
    return w


def _split(w: StageWindow) -> dict[str, float]:
    """The weights the window's conversations follow (no sample-ratio mismatch to hold on)."""
    units = {v: w.of(v).assignment_units for v in ("stable", "canary")}
    share = 100 * units["canary"] / sum(units.values())
    return {"stable": 100 - share, "canary": share}


def _spec(*guardrails: dict[str, Any]) -> Any:
    return parse_experiment({**BASE, "guardrails": list(guardrails)}).spec


CEILING = {"metric": "error_rate", "max_increase": 0.5, "max_absolute": 0.02, "min_samples": 50}


def test_a_ceiling_breached_by_both_variants_holds_instead_of_rolling_back() -> None:
    """An error burst hitting both variants puts the candidate above its 2% ceiling; stable is
    just as bad, so the candidate is not blamed (this rolled back before ceilings compared)."""
    w = _stage(_events("stable", 4000, errors=0.1), _events("canary", 400, errors=0.1, seed=2))
    v = judge(_spec(CEILING), w, _split(w), stage=0, stage_age_s=60)
    assert v.action == "hold", v.reasons
    assert "not worse than stable" in v.reasons[0]
    # shared_incident: rollback blames the candidate all the same
    v = judge(_spec({**CEILING, "shared_incident": "rollback"}), w, _split(w), 0, 60)
    assert v.action == "rollback", v.reasons


def test_a_ceiling_breached_by_the_candidate_alone_rolls_back() -> None:
    w = _stage(_events("stable", 4000, errors=0.01), _events("canary", 400, errors=0.08, seed=2))
    spec = _spec({**CEILING, "max_increase": 10.0})  # only the ceiling can fire
    v = judge(spec, w, _split(w), stage=0, stage_age_s=60)
    assert v.action == "rollback", v.reasons
    assert "above the ceiling and worse than stable" in v.reasons[0]
    (check,) = v.checks
    assert {p for p, _ in check.parts} == {"", "ceiling", "excess"}
    carried = carry_evidence(spec, {}, 0, v)
    assert {"canary/error_rate/ceiling", "canary/error_rate/excess"} <= set(carried)


def test_a_latency_ceiling_in_milliseconds() -> None:
    g = {"metric": "latency_p99", "max_increase": 10.0, "max_absolute": 3000, "min_samples": 50}
    slow = _stage(_events("stable", 4000), _events("canary", 400, latency=2500, seed=2))
    v = judge(_spec(g), slow, _split(slow), stage=0, stage_age_s=60)
    assert v.action == "rollback", v.reasons
    assert "beyond 3000 ms" in v.reasons[0]
    fine = _stage(_events("stable", 4000), _events("canary", 400, seed=2))
    assert judge(_spec(g), fine, _split(fine), stage=0, stage_age_s=60).action == "advance"


def test_tool_call_rate_is_two_sided_by_default() -> None:
    g = {"metric": "tool_call_rate", "max_increase": 0.3, "max_decrease": 0.3, "min_samples": 50}
    spec = _spec(g)
    assert spec.guardrails[0].harm_sides == ("increase", "decrease")
    halved = _stage(_events("stable", 4000), _events("canary", 1000, tools=0.15, seed=2))
    v = judge(spec, halved, _split(halved), stage=0, stage_age_s=60)
    assert v.action == "rollback", v.reasons
    assert "tool-call rate" in v.reasons[0]
    # A shortfall reads as one: the bound on the change is negative, like the limit.
    assert re.search(r"bound -\d+%, limit -30%", v.reasons[0]), v.reasons[0]
    (check,) = v.checks
    assert [p for p, _ in check.parts] == ["increase", "decrease"]
    same = _stage(_events("stable", 4000), _events("canary", 600, seed=2))
    assert judge(spec, same, _split(same), stage=0, stage_age_s=60).action == "advance"


def test_a_verdict_waits_for_enough_conversations() -> None:
    """200 candidate requests from 3 conversations say little about the candidate."""
    w = _stage(_events("stable", 4000), _events("canary", 200, conversations=3, seed=2))
    spec = _spec({"metric": "error_rate", "max_increase": 0.5, "min_samples": 50})
    v = judge(spec, w, _split(w), stage=0, stage_age_s=60)
    (check,) = v.checks
    assert check.status == "waiting"
    assert "needs 17 more conversations" in check.detail
    assert (check.have, check.need, check.counting) == (3, 20, "conversations")
    assert v.action == "none"
    few = _stage(_events("stable", 4000), _events("canary", 30, seed=2))
    (check,) = judge(spec, few, _split(few), stage=0, stage_age_s=60).checks
    assert (check.have, check.need, check.counting) == (30, 50, "candidate requests")


def test_a_check_states_the_evidence_it_fails_at() -> None:
    """The threshold the operator surfaces show ("e = 77 of 60 needed") is the evaluator's own:
    the inverse of the alpha the check spends, as its detail states it."""
    w = _stage(_events("stable", 4000), _events("canary", 400, seed=2))
    (check,) = judge(_spec(CEILING), w, _split(w), stage=0, stage_age_s=60).checks
    assert check.threshold is not None
    assert f"fails at {check.threshold:.3g}" in check.detail
    assert check.to_json()["threshold"] == round(check.threshold, 4)


def test_clustered_refusals_are_weighed_by_conversation() -> None:
    """30 candidate conversations of 20 requests, five of which refuse 60% of the time: 10%
    against stable's 2% when requests are counted as independent (it rolled back), but the
    evidence comes from five conversations, which the design effect sees."""
    habits = np.zeros(30)
    habits[:5] = 0.6
    w = _stage(
        _events("stable", 4000),
        _events("canary", 600, conversations=30, refusals=habits, seed=2),
    )
    spec = _spec({"metric": "refusal_rate", "max_increase": 0.5, "min_samples": 50})
    v = judge(spec, w, _split(w), stage=0, stage_age_s=60)
    (check,) = v.checks
    assert check.status == "pass", check.detail
    assert "conversations weigh" in check.detail


def test_a_tail_regression_is_caught_with_evidence_carried_across_stages() -> None:
    """p99 of the candidate 60% higher. The first stage only measures stable's p99 (and runs
    the stage's own order-statistic test); from the second on, candidate requests beyond that
    reference count, and their evidence carries. Stages end by an operator's promote here
    (``auto_advance: false``), so no stage-end test runs: the carried e-process alone."""
    raw = {
        **BASE,
        "guardrails": [{"metric": "latency_p99", "max_increase": 0.0, "min_samples": 50}],
    }
    raw["rollout"] = {**BASE["rollout"], "auto_advance": False}
    spec = parse_experiment(raw).spec
    evidence: dict[str, float] = {}
    stage_of_rollback = None
    for stage in range(3):
        w = _stage(
            _events("stable", 5000, sigma=0.8, seed=10 + stage),
            _events("canary", 400, sigma=0.8 + math.log(1.6) / 2.326, seed=20 + stage),
        )
        v = judge(spec, w, _split(w), stage, 60, evidence)
        if v.action == "rollback":
            stage_of_rollback = stage
            break
        assert v.action == "none", v.reasons  # waits for the promote
        evidence = carry_evidence(spec, evidence, stage, v)
        assert "canary/latency_p99#reference" in evidence
    assert stage_of_rollback is not None
    assert stage_of_rollback >= 1
    assert "beyond" in v.reasons[0]
    assert "evidence e=" in v.reasons[0]


def test_a_milder_tail_regression_is_caught_by_the_stage_end_test() -> None:
    """p99 +30%: the carried e-process, readable at every look, does not see it in three
    stages; the exact test read once at each stage's end, on the tail events of every stage so
    far (the first included: it needs no reference), does, and only at the look that ends the
    stage."""
    spec = _spec({"metric": "latency_p99", "max_increase": 0.0, "min_samples": 50})
    evidence: dict[str, float] = {}
    for stage in range(3):
        w = _stage(
            _events("stable", 6000, sigma=0.8, seed=110 + stage),
            _events("canary", 600, sigma=0.8 + math.log(1.3) / 2.326, seed=120 + stage),
        )
        early = judge(spec, w, _split(w), stage, 1, evidence)  # before min_stage_seconds
        assert early.action == "none", early.reasons
        v = judge(spec, w, _split(w), stage, 60, evidence)
        if v.action == "rollback":
            break
        evidence = carry_evidence(spec, evidence, stage, v)
    assert stage == 2
    assert v.action == "rollback"
    assert "exact stage-end test" in v.reasons[0]
    assert "over 3 stages" in v.reasons[0]
    for k in range(2):  # each finished stage left its tail events
        key = f"canary/latency_p99#stage{k}"
        assert 0 < evidence[f"{key}.treatment"] <= evidence[f"{key}.events"]
    (check,) = v.checks
    assert check.stratum is not None
    assert 0 < check.stage_end_alpha < budget(spec).rollout


def test_every_metric_in_the_registry_is_judged() -> None:
    """Each guardrail metric gets a check from real events (none is silently skipped)."""
    from extproc.contract.guardrail_metrics import METRICS

    guards = []
    for name, info in METRICS.items():
        g: dict[str, Any] = {"metric": name, "min_samples": 1, "action": "warn"}
        g["max_decrease" if info.harm == "decrease" else "max_increase"] = 0.3
        guards.append(g)
    w = _stage(_events("stable", 500), _events("canary", 200, seed=2))
    v = judge(_spec(*guards), w, _split(w), stage=0, stage_age_s=60)
    assert [c.metric for c in v.checks] == list(METRICS)
    assert all(c.detail for c in v.checks)


def test_a_rate_without_trials_does_not_stall_the_rollout() -> None:
    """No JSON-mode requests at all: the JSON guardrail has nothing to judge, and says so."""
    w = _stage(_events("stable", 4000), _events("canary", 400, seed=2))
    spec = _spec({"metric": "json_invalid_rate", "max_increase": 0.5, "min_samples": 50})
    v = judge(spec, w, _split(w), stage=0, stage_age_s=60)
    (check,) = v.checks
    assert check.status == "pass"
    assert "no JSON answers yet" in check.detail
    assert v.action == "advance"


SCHEDULED: dict[str, Any] = {
    **BASE,
    "rollout": {
        "stages": [
            10,  # the defaults below: 10 s, 50 candidate requests, automatic
            {"share": 50, "min_seconds": 120, "min_samples": 300, "gate": "manual"},
            {"share": 100, "min_seconds": 5},
        ],
        "min_stage_seconds": 10,
        "min_stage_samples": 50,
    },
}


@pytest.mark.parametrize(
    ("case", "stage", "age", "kwargs", "action", "reason", "awaiting"),
    [
        ("plain share: defaults, ready", 0, 60, {}, "advance", "stage 1/3 healthy", False),
        ("plain share: younger than the default", 0, 5, {}, "none", None, False),
        ("manual: younger than its own 120 s", 1, 60, {"n_canary": 400}, "none", None, False),
        ("manual: fewer than its own 300", 1, 200, {}, "none", None, False),
        ("manual: ready", 1, 200, {"n_canary": 400}, "none", "waiting for promote", True),
        (
            "manual: a regression still rolls back",
            1,
            200,
            {"err": (0.01, 0.2)},
            "rollback",
            "error rate",
            False,
        ),
        ("own min_seconds shorter than the default", 2, 6, {}, "complete", "healthy", False),
    ],
)
def test_per_stage_schedule_table(
    case: str,
    stage: int,
    age: float,
    kwargs: dict[str, Any],
    action: str,
    reason: str | None,
    awaiting: bool,
) -> None:
    spec = parse_experiment(SCHEDULED).spec
    w = window(**kwargs)
    v = judge(spec, w, _split(w), stage=stage, stage_age_s=age)
    assert v.action == action, (case, v.reasons)
    assert v.awaiting_promote is awaiting, (case, v.reasons)
    if reason:
        assert any(reason in r for r in v.reasons), (case, v.reasons)


def test_stage_gates_override_auto_advance_both_ways() -> None:
    doc = {**BASE, "rollout": {**BASE["rollout"], "auto_advance": False}}
    doc["rollout"]["stages"] = [10, {"share": 50, "gate": "auto"}, 100]
    spec = parse_experiment(doc).spec
    assert [spec.rollout.schedule(i).gate for i in range(3)] == ["manual", "auto", "manual"]
    w = window()
    assert judge(spec, w, _split(w), stage=0, stage_age_s=60).awaiting_promote
    assert judge(spec, w, _split(w), stage=1, stage_age_s=60).action == "advance"


def test_a_manual_gate_holds_the_machine_until_promote() -> None:
    """The walk through the machine: stage 1 advances by itself, stage 2 waits for promote
    however long it is ready, the promote advances it, and stage 3 completes by itself."""
    spec = parse_experiment(SCHEDULED).spec
    t = machine.start(spec, 0.0)
    assert t.weights == {"canary": 10, "stable": 90}
    t = machine.evaluate(spec, t.state, window(), WEIGHTS, 60.0)
    assert (t.action, t.state.stage) == ("advance", 1)
    assert t.weights == {"canary": 50, "stable": 50}
    state = t.state
    ready = window(n_stable=400, n_canary=400)
    for now in (300.0, 600.0, 3600.0):
        t = machine.evaluate(spec, state, ready, _split(ready), now)
        assert (t.action, t.state.stage) == ("", 1)
        assert t.verdict is not None
        assert t.verdict.awaiting_promote
    t = machine.command(spec, t.state, "promote", "ops", "looks good", 3601.0, t.verdict)
    assert (t.action, t.state.stage, t.state.stage_started) == ("advance", 2, 3601.0)
    assert t.reasons == ["promote by ops: looks good"]
    last = window()
    t = machine.evaluate(spec, t.state, last, _split(last), 3607.0)
    assert (t.action, t.state.status) == ("complete", "completed")


@pytest.mark.parametrize(
    ("status", "restarted"),
    [
        ("running", False),
        ("paused", False),
        ("rolled_back", True),
        ("completed", True),
        ("aborted", True),
    ],
)
def test_restart_table(status: str, restarted: bool) -> None:
    """A restart starts attempt n + 1 at stage 0 with nothing of attempt n (evidence, stage
    clock, reasons), and hands the ended state over for the audit log; it needs an ended one."""
    spec = parse_experiment(BASE).spec
    ended = replace(
        machine.start(spec, 0.0).state,
        status=status,  # type: ignore[arg-type]
        stage=2,
        stage_started=50.0,
        commands_seen="9-0",
        evidence={"canary/error_rate": 1.5},
        attempt=3,
        attempt_started=1.0,
    )
    t = machine.command(spec, ended, "restart", "ops", "new build", 100.0)
    if not restarted:
        assert t.action == "restart"
        assert (t.state.status, t.state.attempt, t.weights, t.archived) == (status, 3, None, None)
        assert t.reasons == [f"ignored 'restart' by ops: rollout is {status}"]
        return
    s = t.state
    assert (t.action, s.status, s.stage, s.attempt) == ("restart", "running", 0, 4)
    assert (s.stage_started, s.attempt_started, s.evidence) == (100.0, 100.0, {})
    assert s.commands_seen == "9-0"  # the command stream is read on, not replayed
    assert t.weights == stage_weights(spec, 0)
    assert t.restart_window
    assert t.archived == ended
    assert t.reasons[0] == "restart by ops: new build"
    assert t.reasons[1].startswith("attempt 4 from stage 1; attempt 3 ")


def test_a_state_written_before_attempts_is_attempt_one() -> None:
    old = '{"status": "completed", "stage": 2, "stage_started": 5.0, "strategy": "canary"}'
    assert (RolloutState.from_json(old).attempt, RolloutState.from_json(old).attempt_started) == (
        1,
        0.0,
    )
    newer = old[:-1] + ', "attempt": 2, "phase": "canary"}'  # a field of a later release
    assert RolloutState.from_json(newer).attempt == 2
