"""An A/B run on the real stack ends in a stated decision: the model stand-in for the candidate
answers faster (or slower) than stable's, latency is the primary metric, and the evaluator
states "ship the candidate" (or "keep stable") in its evaluation, the audit log and `extproc
status`."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from extproc.dev import stack
from tests.conftest import LiveStack, start_stack, wait_for, write_experiment

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
SPLIT = {
    "stable": {"cluster": "model_stable", "address": "127.0.0.1:8001", "weight": 50},
    "canary": {"cluster": "model_canary", "address": "127.0.0.1:8002", "weight": 50},
}
FAST, SLOW = (
    ["--latency-ms", "10", "--tokens-per-s", "0"],
    ["--latency-ms", "60", "--tokens-per-s", "0"],
)


@pytest.fixture(params=["better", "worse"])
def ab_stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[LiveStack, str]]:
    exp = write_experiment(
        tmp_path,
        strategy="ab",
        variants=SPLIT,
        rollout={"cadence_s": 0.5, "min_stage_seconds": 0, "min_stage_samples": 40},
        guardrails=[{"metric": "error_rate", "max_increase": 1.0, "action": "warn"}],
        ab={"primary": "latency", "metrics": ["latency", "error_rate"], "min_samples": 40},
    )
    better = request.param == "better"
    mocks = {"stable": SLOW, "canary": FAST} if better else {"stable": FAST, "canary": SLOW}
    s = start_stack(tmp_path / "stack", exp, mock_args=mocks)
    try:
        yield s, request.param
    finally:
        stack.down(s.state_dir)


def test_the_ab_run_states_whether_to_ship(
    ab_stack: tuple[LiveStack, str], http: httpx.Client
) -> None:
    s, truth = ab_stack
    for _ in range(160):
        r = s.chat(http, {"x-conversation-id": str(uuid.uuid4())})
        assert r.status_code == 200, r.text

    def decided() -> list[dict[str, object]] | None:
        found = (s.status().get("evaluation") or {}).get("decisions")
        return found or None

    found = wait_for(decided, "the A/B decision in the evaluation", timeout_s=60)
    outcome = "ship" if truth == "better" else "keep"
    assert [d["outcome"] for d in found] == [outcome]
    assert s.status()["rollout"]["status"] == "completed"
    log = s.cli("log", "chat-upgrade", "--json", "--count", "20")
    assert log.returncode == 0, log.stderr
    complete = [rec for rec in json.loads(log.stdout) if rec["action"] == "complete"]
    assert [d["outcome"] for d in complete[-1]["decisions"]] == [outcome]
    text = s.cli("status", "chat-upgrade")
    assert text.returncode == 0, text.stderr
    headline = "SHIP THE CANDIDATE" if outcome == "ship" else "KEEP STABLE"
    assert f"A/B decision for canary: {headline}: latency mean" in text.stdout
