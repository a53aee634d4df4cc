"""The evaluator on the real stack: automatic rollback of a degrading candidate, and a healthy
candidate walked through every stage to 100%."""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from extproc.dev import stack
from tests.conftest import LiveStack, start_stack, wait_for, write_experiment

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def rollout_stack(tmp: Path, dataplane: str = "ext_proc", **rollout: Any) -> LiveStack:
    exp = write_experiment(
        tmp,
        dataplane=dataplane,
        rollout={"cadence_s": 0.2, "min_stage_seconds": 600, "min_stage_samples": 15, **rollout},
        guardrails=[
            {"metric": "error_rate", "max_increase": 0.5, "min_samples": 20},
            {
                "metric": "completion_tokens",
                "max_increase": 0.5,
                "action": "warn",
                "min_samples": 20,
            },
        ],
    )
    return start_stack(tmp / "stack", exp)


@pytest.fixture(params=["ext_proc", "native"])
def degrading(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LiveStack]:
    """On either data plane: the rollback reaches Envoy through the sidecar's ext_proc answers
    or through the runtime layer it pushes."""
    s = rollout_stack(tmp_path, request.param, stages=[30, 60, 100])
    yield s
    stack.down(s.state_dir)


@pytest.fixture
def healthy(tmp_path: Path) -> Iterator[LiveStack]:
    s = rollout_stack(tmp_path, stages=[10, 50, 100], min_stage_seconds=0.3)
    yield s
    stack.down(s.state_dir)


def audit(s: LiveStack) -> list[dict[str, Any]]:
    return s.audit(decisions=True)


def test_degrading_candidate_is_rolled_back_automatically(
    degrading: LiveStack, http: httpx.Client
) -> None:
    s = degrading
    assert s.status()["routing"]["weights"] == {"stable": 70.0, "canary": 30.0}
    served: list[tuple[float, str]] = []

    def send(n: int) -> None:
        for _ in range(n):
            r = s.chat(http, {"x-conversation-id": str(uuid.uuid4())})
            served.append((time.time(), r.headers["x-llm-variant"]))

    send(60)
    canary = s.state["endpoints"]["models"]["canary"]
    http.post(f"{canary}/admin/behaviour", json={"error_rate": 0.5}).raise_for_status()

    def rolled_back() -> bool:
        send(10)
        return bool(s.status()["rollout"]["status"] == "rolled_back")

    wait_for(rolled_back, "the evaluator to roll the candidate back", timeout_s=60)
    st = s.status()
    assert st["routing"]["weights"] == {"stable": 100.0, "canary": 0.0}
    assert "error rate" in " ".join(st["rollout"]["last_reasons"])
    rollback = [rec for rec in audit(s) if rec["action"] == "rollback"]
    assert len(rollback) == 1
    assert rollback[0]["snapshot"]["canary"]["errors"] > 0
    assert any(c["metric"] == "error_rate" and c["status"] == "fail" for c in rollback[0]["checks"])
    decided = rollback[0]["time"]
    last_canary = max(t for t, v in served if v == "canary")
    print(f"rollback decision -> last candidate request: {last_canary - decided:+.3f} s")
    s.wait_routing_applied(st["routing"]["version"])
    send(30)
    assert {v for t, v in served[-30:]} == {"stable"}


def test_healthy_candidate_is_walked_through_every_stage(
    healthy: LiveStack, http: httpx.Client
) -> None:
    s = healthy

    def completed() -> bool:
        for _ in range(20):
            s.chat(http, {"x-conversation-id": str(uuid.uuid4())})
        return bool(s.status()["rollout"]["status"] == "completed")

    wait_for(completed, "the rollout to complete", timeout_s=90)
    actions = [(rec["action"], rec["stage"]) for rec in audit(s)]
    assert actions == [("start", 0), ("advance", 1), ("advance", 2), ("complete", 2)]
    assert s.status()["routing"]["weights"] == {"stable": 0.0, "canary": 100.0}
    s.wait_routing_applied()
    r = s.chat(http, {"x-conversation-id": "after"})
    assert r.headers["x-llm-variant"] == "canary"


def test_blue_green_flips_after_mirrored_checks_and_flips_back(
    tmp_path: Path, http: httpx.Client
) -> None:
    exp = write_experiment(
        tmp_path,
        strategy="blue-green",
        variants={
            "stable": {"cluster": "model_stable", "address": "127.0.0.1:8001", "weight": 100},
            "canary": {"cluster": "model_canary", "address": "127.0.0.1:8002", "weight": 0},
        },
        shadow={"variant": "canary", "share": 100},
        rollout={"cadence_s": 0.2, "min_stage_seconds": 0.3, "min_stage_samples": 15},
        guardrails=[{"metric": "error_rate", "max_increase": 0.5, "min_samples": 20}],
    )
    s = start_stack(tmp_path / "stack", exp)
    try:
        served: list[str] = []

        def flipped() -> bool:
            for _ in range(10):
                served.append(
                    s.chat(http, {"x-conversation-id": str(uuid.uuid4())}).headers["x-llm-variant"]
                )
            return bool(s.status()["rollout"]["status"] == "completed")

        wait_for(flipped, "the blue-green flip", timeout_s=60)
        assert served[0] == "stable"  # users saw stable while green was checked on mirrors
        assert [(rec["action"], rec["stage"]) for rec in audit(s)] == [
            ("start", 0),
            ("complete", 0),
        ]
        assert s.status()["routing"]["weights"] == {"stable": 0.0, "canary": 100.0}
        s.wait_routing_applied()
        assert s.chat(http, {"x-conversation-id": "after"}).headers["x-llm-variant"] == "canary"
        out = s.cli("experiment", "rollback", "chat-upgrade", "--reason", "flip back")
        assert out.returncode == 0, out.stderr
        wait_for(
            lambda: s.status()["routing"]["weights"] == {"stable": 100.0, "canary": 0.0},
            "the flip back",
        )
    finally:
        stack.down(s.state_dir)


def test_operator_pause_and_rollback_go_through_the_evaluator(
    healthy: LiveStack, http: httpx.Client
) -> None:
    s = healthy
    assert s.cli("experiment", "pause", "chat-upgrade", "--reason", "lunch").returncode == 0
    wait_for(lambda: s.status()["rollout"]["status"] == "paused", "pause to apply")
    for _ in range(40):
        s.chat(http, {"x-conversation-id": str(uuid.uuid4())})
    assert s.status()["rollout"]["stage"] == 0  # paused: no advance however healthy
    assert s.cli("experiment", "rollback", "chat-upgrade").returncode == 0
    wait_for(lambda: s.status()["rollout"]["status"] == "rolled_back", "rollback to apply")
    actions = [rec["action"] for rec in audit(s)]
    assert actions == ["start", "pause", "rollback"]
    bad = s.cli("experiment", "pause", "no-such-experiment")
    assert bad.returncode == 2
    assert "no such experiment" in bad.stderr


def test_standby_evaluator_takes_over_without_repeating_decisions(
    healthy: LiveStack, http: httpx.Client
) -> None:
    s = healthy
    standby = stack.Stack(s.state_dir / "standby")
    standby.spawn(
        "evaluator",
        [
            sys.executable,
            "-m",
            "extproc",
            "evaluate",
            "--experiment",
            str(s.experiment_path),
            "--redis-url",
            s.redis_url,
            "--instance",
            "standby",
        ],
    )
    try:
        r = s.redis()

        def lease() -> str:
            held = r.get("extproc:{chat-upgrade}:lease")
            return held.decode() if held else ""

        wait_for(lambda: r.exists("extproc:evaluator:standby"), "the standby to report health")
        assert lease() not in ("", "standby")
        os.kill(s.pid("evaluator"), signal.SIGKILL)  # the active one dies without handing over
        wait_for(lambda: lease() == "standby", "the standby to take the lease", timeout_s=30)
        assert s.cli("experiment", "rollback", "chat-upgrade").returncode == 0
        wait_for(lambda: s.status()["rollout"]["status"] == "rolled_back", "the new leader to act")
        actions = [rec["action"] for rec in audit(s)]
        assert actions.count("start") == 1
        assert actions.count("rollback") == 1
        wait_for(
            lambda: r.hget("extproc:evaluator:standby", "active") == b"1",
            "the standby to report itself active",
        )
    finally:
        standby.stop_all()


def test_evaluator_metrics_show_stage_and_decisions(
    degrading: LiveStack, http: httpx.Client
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    s = degrading
    url = s.state["endpoints"]["evaluator_metrics"]
    assert s.cli("experiment", "rollback", "chat-upgrade").returncode == 0

    def samples() -> dict[str, float]:
        out = {}
        for fam in text_string_to_metric_families(http.get(url).text):
            for smp in fam.samples:
                key = smp.name + "".join(f",{v}" for _k, v in sorted(smp.labels.items()))
                out[key] = smp.value
        return out

    got = wait_for(
        lambda: (
            (m := samples()).get("extproc_evaluator_decisions_total,rollback,chat-upgrade") and m
        ),
        "the rollback decision in /metrics",
    )
    assert got["extproc_evaluator_active,chat-upgrade"] == 1
    assert got["extproc_evaluator_stage,chat-upgrade"] == 1
