"""The evaluator's pure decisions, table-tested on synthetic stage windows."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from extproc.config import parse_experiment
from extproc.evaluator import machine
from extproc.evaluator.judge import (
    budget,
    carry_evidence,
    initial_evidence,
    judge,
    stage_weight,
)
from extproc.evaluator.rollout import rollback_weights, stage_weights
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
    }
    assert t.state.evidence == carry_evidence(spec, {}, 0, v)


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


def test_ab_completes_with_a_report() -> None:
    spec = parse_experiment({**BASE, "strategy": "ab"}).spec
    v = judge(spec, window(latency=(800.0, 900.0)), WEIGHTS, stage=0, stage_age_s=60)
    assert v.action == "complete"
    report = " ".join(v.reasons)
    assert "latency mean +" in report
    assert "Welch" in report
    assert "error rate" in report


def test_status_reports_cost_per_request() -> None:
    from extproc.config import Price
    from extproc.status import summarise

    ev = TelemetryEvent(variant="canary", prompt_tokens=1000, completion_tokens=500, duration_ms=1)
    got = summarise(
        [ev, ev], ["canary"], prices={"canary": Price(input_per_mtok=1, output_per_mtok=2)}
    )
    assert got["canary"]["cost_per_request"] == pytest.approx(0.002)
