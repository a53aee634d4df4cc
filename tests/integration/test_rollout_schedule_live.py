"""Rollouts as operators run them, on the real stack: a per-stage schedule whose second stage
waits behind a manual gate for `extproc experiment promote`; a second attempt after a rollback;
lifecycle hooks to a serving layer; a shadow comparison chained before a canary (phases)."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from extproc.config import EXAMPLE_EXPERIMENT
from extproc.contract import keys
from extproc.dev import stack
from extproc.telemetry.events import decode_event
from tests.conftest import LiveStack, start_stack, wait_for, write_experiment

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

GUARDRAILS = [{"metric": "error_rate", "max_increase": 0.5, "min_samples": 20}]


def scheduled_stack(tmp: Path, stages: list[Any], stage_seconds: float = 0.3) -> LiveStack:
    exp = write_experiment(
        tmp,
        rollout={
            "cadence_s": 0.2,
            "min_stage_seconds": stage_seconds,
            "min_stage_samples": 15,
            "stages": stages,
        },
        guardrails=GUARDRAILS,
    )
    return start_stack(tmp / "stack", exp)


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[LiveStack]:
    """Stage 1 automatic (the defaults), stage 2 behind a manual gate, stage 3 automatic."""
    s = scheduled_stack(tmp_path, [10, {"share": 50, "gate": "manual"}, 100])
    yield s
    stack.down(s.state_dir)


def audit(s: LiveStack) -> list[dict[str, Any]]:
    return s.audit(decisions=True)


def send(s: LiveStack, http: httpx.Client, n: int) -> None:
    for _ in range(n):
        s.chat(http, {"x-conversation-id": str(uuid.uuid4())})


def test_a_manual_stage_waits_for_promote(gated: LiveStack, http: httpx.Client) -> None:
    s = gated

    def waiting_at_the_gate() -> bool:
        send(s, http, 20)
        doc = s.status()
        reasons = (doc.get("evaluation") or {}).get("reasons") or []
        return doc["rollout"]["stage"] == 1 and any("waiting for promote" in r for r in reasons)

    wait_for(waiting_at_the_gate, "stage 2 to be ready at its manual gate", timeout_s=60)
    send(s, http, 60)  # ready for many looks: still no advance without an operator
    assert (s.status()["rollout"]["stage"], s.status()["rollout"]["status"]) == (1, "running")
    assert [(r["action"], r["stage"]) for r in audit(s)] == [("start", 0), ("advance", 1)]
    out = s.cli("experiment", "promote", "chat-upgrade", "--reason", "dashboards look fine")
    assert out.returncode == 0, out.stderr

    def completed() -> bool:
        send(s, http, 20)
        return bool(s.status()["rollout"]["status"] == "completed")

    wait_for(completed, "stage 3 to complete by itself after the promote", timeout_s=60)
    records = audit(s)
    assert [(r["action"], r["stage"]) for r in records] == [
        ("start", 0),
        ("advance", 1),
        ("advance", 2),
        ("complete", 2),
    ]
    assert records[2]["reasons"][0].startswith("promote by ")
    assert records[2]["reasons"][0].endswith("dashboards look fine")


@pytest.fixture
def slow_stages(tmp_path: Path) -> Iterator[LiveStack]:
    """Stages long enough that a healthy candidate stays at stage 1 for the whole test."""
    s = scheduled_stack(tmp_path, [30, 60, 100], stage_seconds=600)
    yield s
    stack.down(s.state_dir)


def test_restart_after_a_rollback_is_attempt_two_from_stage_one_with_fresh_evidence(
    slow_stages: LiveStack, http: httpx.Client
) -> None:
    s = slow_stages
    canary = s.state["endpoints"]["models"]["canary"]
    http.post(f"{canary}/admin/behaviour", json={"error_rate": 0.5}).raise_for_status()

    def rolled_back() -> bool:
        send(s, http, 10)
        return bool(s.status()["rollout"]["status"] == "rolled_back")

    wait_for(rolled_back, "the evaluator to roll the failing candidate back", timeout_s=60)
    ended = s.status()
    assert ended["rollout"]["attempt"] == 1
    assert ended["evaluation"]["variants"]["canary"]["errors"] > 0
    http.post(f"{canary}/admin/behaviour", json={"error_rate": 0.0}).raise_for_status()
    out = s.cli("experiment", "restart", "chat-upgrade", "--reason", "fixed the build")
    assert out.returncode == 0, out.stderr

    def attempt_two_judged() -> bool:
        send(s, http, 10)
        doc = s.status()
        look = doc.get("evaluation") or {}
        canary_seen = (look.get("variants") or {}).get("canary") or {}
        return look.get("attempt") == 2 and canary_seen.get("requests", 0) >= 20

    wait_for(attempt_two_judged, "attempt 2 to judge requests of its own", timeout_s=60)
    doc = s.status()
    rollout, look = doc["rollout"], doc["evaluation"]
    assert (rollout["attempt"], rollout["status"], rollout["stage"]) == (2, "running", 0)
    assert doc["routing"]["weights"] == {"stable": 70.0, "canary": 30.0}
    # fresh evidence: none of attempt 1's failures is in attempt 2's window or its evidence
    assert look["variants"]["canary"]["errors"] == 0
    assert not any(c["status"] == "fail" for c in look["checks"])
    records = audit(s)
    assert [(r["action"], r["attempt"], r["stage"]) for r in records] == [
        ("start", 1, 0),
        ("rollback", 1, 0),
        ("restart", 2, 0),
    ]
    archived = records[-1]["archived"]
    # it read the restart, and the canary drained meanwhile
    moved = {k: archived[k] for k in ("updated", "commands_seen", "drain")}
    assert archived == {**ended["rollout"], **moved}
    assert records[-1]["reasons"][1] == "attempt 2 from stage 1; attempt 1 rolled back at stage 1"
    refused = s.cli("experiment", "restart", "chat-upgrade")
    assert refused.returncode == 2
    assert "rollout is running" in refused.stderr


class HookReceiver(BaseHTTPRequestHandler):
    """A serving layer's hook endpoint: ``/ok`` answers 204, ``/fail`` 500; both record."""

    received: list[tuple[str, dict[str, Any]]]

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        self.received.append((self.path, json.loads(self.rfile.read(length))))
        self.send_response(500 if self.path == "/fail" else 204)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        """Quiet: the test reads what it received."""


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[str, dict[str, Any]]]]]:
    received: list[tuple[str, dict[str, Any]]] = []
    handler = type("Handler", (HookReceiver,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # a free port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_lifecycle_hooks_reach_the_serving_layer_and_a_failing_one_never_blocks_a_rollback(
    tmp_path: Path,
    http: httpx.Client,
    receiver: tuple[str, list[tuple[str, dict[str, Any]]]],
) -> None:
    url, received = receiver
    exp = write_experiment(
        tmp_path,
        rollout={
            "cadence_s": 0.2,
            "min_stage_seconds": 0.3,
            "min_stage_samples": 15,
            "stages": [10, 50, 100],
        },
        guardrails=GUARDRAILS,
        hooks={
            "on_start": f"{url}/ok",
            "on_advance": f"{url}/ok",
            "on_complete": f"{url}/ok",
            "on_rollback": f"{url}/fail",
            "retries": 2,
            "backoff_s": 0.05,
            "timeout_s": 2,
        },
    )
    s = start_stack(tmp_path / "stack", exp)
    try:

        def completed() -> bool:
            send(s, http, 20)
            return bool(s.status()["rollout"]["status"] == "completed")

        wait_for(completed, "the rollout to complete", timeout_s=60)
        wait_for(lambda: len(received) >= 4, "the hooks of start, two advances and completion")
        assert [(path, b["hook"], b["stage"]) for path, b in received] == [
            ("/ok", "on_start", 0),
            ("/ok", "on_advance", 1),
            ("/ok", "on_advance", 2),
            ("/ok", "on_complete", 2),
        ]
        assert received[0][1]["variants"]["canary"]["cluster"] == "model_canary"
        assert received[-1][1]["weights"] == {"stable": 0.0, "canary": 100.0}
        out = s.cli("experiment", "rollback", "chat-upgrade", "--reason", "late finding")
        assert out.returncode == 0, out.stderr
        # the rollback takes effect whatever the hook does; the hook is tried 1 + 2 times
        wait_for(
            lambda: s.status()["routing"]["weights"] == {"stable": 100.0, "canary": 0.0},
            "the rollback",
        )
        wait_for(
            lambda: any(r["action"] == "hook_failed" for r in audit(s)),
            "the failed hook in the audit log",
        )
        failed = next(r for r in audit(s) if r["action"] == "hook_failed")
        assert failed["hook"]["name"] == "on_rollback"
        assert (failed["hook"]["tries"], failed["hook"]["error"]) == (3, "HTTP 500")
        assert [p for p, b in received if b["hook"] == "on_rollback"] == ["/fail"] * 3
    finally:
        stack.down(s.state_dir)


@pytest.fixture
def chained(tmp_path: Path) -> Iterator[LiveStack]:
    """A shadow comparison (every request mirrored to the canary, which serves nothing) that
    must pass before a two-stage canary ramps; the shadow phase needs 40 mirrored answers."""
    doc = yaml.safe_load(EXAMPLE_EXPERIMENT.read_text())
    variants = doc["variants"]
    variants["stable"]["weight"], variants["canary"]["weight"] = 100, 0
    exp = write_experiment(
        tmp_path,
        strategy=None,
        variants=variants,
        shadow={"variant": "canary", "share": 100},
        rollout={
            "cadence_s": 0.2,
            "min_stage_seconds": 0.3,
            "min_stage_samples": 15,
            "stages": [30, 100],
        },
        guardrails=GUARDRAILS,
        phases=[
            {
                "name": "compare",
                "strategy": "shadow",
                "rollout": {"cadence_s": 0.2, "min_stage_seconds": 0.3, "min_stage_samples": 40},
            },
            {"name": "ramp", "strategy": "canary"},
        ],
    )
    s = start_stack(tmp_path / "stack", exp)
    yield s
    stack.down(s.state_dir)


def test_a_canary_phase_starts_only_after_the_shadow_phase_passed(
    chained: LiveStack, http: httpx.Client
) -> None:
    s = chained
    first = s.status()
    assert (first["rollout"]["phase"], first["rollout"]["strategy"]) == (0, "shadow")
    assert first["routing"]["weights"] == {"stable": 100.0, "canary": 0.0}

    # Variants that served requests sent while the shadow phase still ran (the status read
    # after them said so): the canary serves none of them, it only answers mirrored copies.
    confirmed: list[str] = []

    def ramping() -> bool:
        served = [
            s.chat(http, {"x-conversation-id": str(uuid.uuid4())}).headers["x-llm-variant"]
            for _ in range(10)
        ]
        if s.status()["rollout"]["phase"] == 0:
            confirmed.extend(served)
            return False
        return True

    wait_for(ramping, "the shadow phase to pass and the canary phase to start", timeout_s=60)
    assert confirmed
    assert set(confirmed) == {"stable"}
    records = audit(s)
    start, passed = records[0], records[1]
    assert (start["action"], passed["action"]) == ("start", "advance")
    assert "phase 1 (compare, shadow) passed; phase 2 (ramp, canary) starts" in passed["reasons"]
    # The shadow phase judged the canary on mirrored answers.
    assert passed["snapshot"]["canary"]["requests"] >= 40
    assert passed["weights"] == {"stable": 70.0, "canary": 30.0}
    events = [decode_event(f) for _, f in s.redis().xrange(keys.events("chat-upgrade"))]
    assert any(ev and ev.shadow and ev.variant == "canary" for ev in events)

    def completed() -> bool:
        send(s, http, 20)
        return bool(s.status()["rollout"]["status"] == "completed")

    wait_for(completed, "the canary phase to ramp to 100% by itself", timeout_s=60)
    actions = [(r["action"], r["stage"]) for r in audit(s)]
    assert actions == [("start", 0), ("advance", 0), ("advance", 1), ("complete", 1)]
    assert s.status()["routing"]["weights"] == {"stable": 0.0, "canary": 100.0}
