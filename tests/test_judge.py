"""The evaluator's pure decisions, table-tested on synthetic stage windows."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from extproc.config import parse_experiment
from extproc.evaluator.judge import judge, per_check_alpha
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
    assert stage_weights(spec, 2) == {"canary": 100, "stable": 0}
    assert rollback_weights(spec) == {"stable": 100.0, "canary": 0.0}


def test_alpha_is_split_over_stages_and_gating_guardrails() -> None:
    spec = parse_experiment(BASE).spec
    assert per_check_alpha(spec) == pytest.approx(0.05 / (3 * 2))  # warn guardrails do not gate


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
