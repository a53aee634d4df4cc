"""Phases: a chain of strategies (shadow comparison, then a canary) walked by the one state
machine. Each phase runs as the experiment with its own strategy, stages and guardrails; the
next one starts only when the one before passed; a rollback anywhere ends the rollout; a restart
begins again at the first phase. Validation names every problem with its phase's path."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.config import ConfigError, parse_experiment
from extproc.evaluator import machine
from extproc.evaluator.guardrails import Verdict
from extproc.evaluator.rollout import RolloutState
from tests.unit.test_judge import BASE, window

pytestmark = pytest.mark.timeout(60)

CHAIN: dict[str, Any] = {
    **{k: v for k, v in BASE.items() if k != "rollout"},
    "variants": {
        "stable": {"cluster": "a", "weight": 100},
        "canary": {"cluster": "b", "weight": 0},
    },
    "shadow": {"variant": "canary", "share": 100},
    "rollout": {"stages": [10, 50, 100], "min_stage_seconds": 10, "min_stage_samples": 50},
    "phases": [
        {
            "name": "compare",
            "strategy": "shadow",
            "guardrails": [{"metric": "latency_p50", "max_increase": 0.2, "min_samples": 50}],
        },
        {"name": "ramp", "strategy": "canary"},
    ],
}


def test_the_canary_starts_only_after_the_shadow_phase_passed() -> None:
    spec = parse_experiment(CHAIN).spec
    t = machine.start(spec, 0.0)
    assert (t.state.phase, t.state.strategy, t.weights) == (
        0,
        "shadow",
        {"stable": 100.0, "canary": 0.0},
    )
    assert "phase 1 (compare)" in t.reasons[0]
    # The shadow phase judges mirrored copies, with its own guardrails only.
    w = machine.new_window(machine.running(spec, t.state), 0.0)
    assert w.shadow_as_candidate
    healthy = window()
    w.variants = healthy.variants
    t = machine.evaluate(spec, t.state, w, t.weights or {}, 60.0)
    assert t.action == "advance", t.reasons
    assert (t.state.phase, t.state.stage, t.state.strategy, t.state.status) == (
        1,
        0,
        "canary",
        "running",
    )
    assert t.weights == {"stable": 90.0, "canary": 10.0}  # the ramp's first stage
    assert t.restart_window
    assert t.state.evidence == {}
    assert "phase 1 (compare, shadow) passed; phase 2 (ramp, canary) starts" in t.reasons[-1]
    # The canary phase judges live traffic, with the experiment's guardrails.
    w = machine.new_window(machine.running(spec, t.state), 60.0)
    assert not w.shadow_as_candidate
    assert [g.metric for g in machine.running(spec, t.state).guardrails] == [
        "error_rate",
        "latency_p50",
        "completion_tokens",
    ]
    state = t.state
    for stage, now in ((1, 120.0), (2, 180.0)):
        t = machine.step(spec, state, Verdict("advance", [f"stage {stage} healthy"]), now)
        assert (t.action, t.state.stage) == ("advance", stage)
        state = t.state
    t = machine.step(spec, state, Verdict("complete", ["stage 3 healthy"]), 240.0)
    assert (t.action, t.state.status, t.weights) == (
        "complete",
        "completed",
        {"stable": 0.0, "canary": 100.0},
    )


def test_a_failing_shadow_phase_rolls_back_and_a_restart_begins_at_the_first_phase() -> None:
    spec = parse_experiment(CHAIN).spec
    state = machine.start(spec, 0.0).state
    w = machine.new_window(machine.running(spec, state), 0.0)
    w.variants = window(latency=(800.0, 1600.0)).variants
    t = machine.evaluate(spec, state, w, {"stable": 100.0, "canary": 0.0}, 60.0)
    assert (t.action, t.state.status, t.state.phase) == ("rollback", "rolled_back", 0)
    again = machine.command(spec, t.state, "restart", "ops", "", 100.0)
    assert (again.state.phase, again.state.stage, again.state.strategy) == (0, 0, "shadow")
    assert again.weights == {"stable": 100.0, "canary": 0.0}
    # A rollback in the second phase ends the rollout too.
    second = RolloutState(status="running", stage=1, stage_started=0, strategy="canary", phase=1)
    back = machine.step(spec, second, Verdict("rollback", ["errors"]), 10.0)
    assert (back.state.status, back.weights) == ("rolled_back", {"stable": 100.0, "canary": 0.0})


def test_a_promote_moves_a_phase_on_too() -> None:
    spec = parse_experiment(CHAIN).spec
    state = machine.start(spec, 0.0).state
    t = machine.command(spec, state, "promote", "ops", "shadow looked fine", 5.0)
    assert (t.action, t.state.phase, t.state.strategy) == ("advance", 1, "canary")


def test_without_phases_nothing_changes() -> None:
    spec = parse_experiment(BASE).spec
    state = machine.start(spec, 0.0).state
    assert machine.running(spec, state) is spec
    assert state.phase == 0


FLIP_FIRST = [{"name": "flip", "strategy": "blue-green"}, {"name": "ramp", "strategy": "canary"}]
TWICE_A = [{"name": "a", "strategy": "shadow"}, {"name": "a", "strategy": "canary"}]
OWN_PARTS = [
    {"name": "s", "strategy": "shadow", "rollout": {"stages": [{"share": 5, "gate": "manual"}]}},
    {"name": "c", "strategy": "canary", "guardrails": [{"metric": "nope", "max_increase": 1}]},
]


@pytest.mark.parametrize(
    ("change", "problems"),
    [
        ({"strategy": "canary"}, ["strategy: leave it out with phases"]),
        (
            {"phases": FLIP_FIRST},
            ["phases.0.strategy: blue-green flips every request and ends the rollout"],
        ),
        (
            {"shadow": None, "phases": TWICE_A},
            [
                "phases.0 (shadow): shadow.variant: required by strategy shadow",
                "phases.1.name: 'a' names an earlier phase too",
            ],
        ),
        (
            {"phases": OWN_PARTS},
            [
                "phases.0.rollout.stages.0: a stage with its own schedule needs strategy canary",
                "phases.1.guardrails.0.metric",
            ],
        ),
        ({"phases": [{"name": "x", "strategy": "sideways"}]}, ["phases.0.strategy"]),
    ],
)  # fmt: skip
def test_every_phase_problem_is_reported_with_its_path(
    change: dict[str, Any], problems: list[str]
) -> None:
    raw = {k: v for k, v in ({**CHAIN, **change}).items() if v is not None}
    with pytest.raises(ConfigError) as err:
        parse_experiment(raw)
    text = str(err.value)
    for p in problems:
        assert p in text, (p, text)


@pytest.mark.parametrize(("outcome", "phase"), [("ship", 1), ("keep", 0), ("inconclusive", 0)])
def test_an_ab_phase_leads_on_only_when_it_ships(outcome: str, phase: int) -> None:
    from extproc.evaluator.decision import AbDecision

    doc = {k: v for k, v in CHAIN.items() if k != "shadow"}
    doc["variants"] = BASE["variants"]
    doc["phases"] = [{"name": "test", "strategy": "ab"}, {"name": "ramp", "strategy": "canary"}]
    spec = parse_experiment(doc).spec
    state = machine.start(spec, 0.0).state
    decision = AbDecision("canary", outcome, "latency", 0.05, "why", ())  # type: ignore[arg-type]
    t = machine.step(spec, state, Verdict("complete", ["done"], decisions=(decision,)), 60.0)
    assert (t.state.phase, t.state.status) == (phase, "running" if phase else "completed")
    if phase == 0:
        assert f"decided {outcome}: the phases after it do not start" in t.reasons[-1]
        # An operator may still move on.
        on = machine.command(spec, state, "promote", "ops", "", 61.0, t.verdict)
        assert on.state.phase == 1
