"""Rollouts as operators run them, on the real stack: a per-stage schedule whose second stage
waits behind a manual gate for `extproc experiment promote`."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from extproc.dev import stack
from tests.conftest import LiveStack, start_stack, wait_for, write_experiment

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

GUARDRAILS = [{"metric": "error_rate", "max_increase": 0.5, "min_samples": 20}]


def scheduled_stack(tmp: Path, stages: list[Any]) -> LiveStack:
    exp = write_experiment(
        tmp,
        rollout={
            "cadence_s": 0.2,
            "min_stage_seconds": 0.3,
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
    out = s.cli("log", "chat-upgrade", "--json", "--count", "100")
    assert out.returncode == 0, out.stderr
    records: list[dict[str, Any]] = json.loads(out.stdout)
    return records


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
