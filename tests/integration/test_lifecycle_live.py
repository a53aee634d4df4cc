"""A candidate's lifecycle on the real stack (Envoy, the sidecar, Redis, the evaluator, the model
stand-ins as processes): the warm-up gate before stage 1, and the drain after a rollback read
from Envoy's real admin interface, with the ``on_drained`` hook to an HTTP receiver.

The candidate is cold: its first requests take 2 s, beyond the upstream timeout (0.5 s here), so
they fail as a model's first requests do while it loads. Judged on them it is rolled back;
warmed up first (forced requests, kept out of the comparison) it completes the rollout.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from extproc.dev import stack
from extproc.telemetry.outcome import is_forced
from tests.conftest import LiveStack, run_cli, start_stack, wait_for, write_experiment

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

GUARDRAILS = [{"metric": "error_rate", "max_increase": 0.5, "min_samples": 10}]
COLD = ["--cold-requests", "20", "--cold-ms", "2000"]  # the first 20 requests time out
WARMUP = {"requests": 10, "concurrency": 4, "timeout_s": 30}


def send(s: LiveStack, http: httpx.Client, n: int) -> None:
    for _ in range(n):
        s.chat(http, {"x-conversation-id": str(uuid.uuid4())})


@pytest.fixture(params=[True, False], ids=["warmed-up", "cold"])
def cold_candidate(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[LiveStack, bool]]:
    """A cold candidate behind a two-stage ramp, with the warm-up gate (True) or without it."""
    lifecycle = {"warmup": WARMUP} if request.param else {}
    exp = write_experiment(
        tmp_path,
        envoy={"request_timeout_s": 0.5},
        inflight={"notice_ms": 250},
        rollout={
            "cadence_s": 0.2,
            "min_stage_seconds": 0.3,
            "min_stage_samples": 40,
            "stages": [50, 100],
            "alpha": 0.2,  # a sure rollback of the cold candidate within the first stage
        },
        guardrails=GUARDRAILS,
        lifecycle=lifecycle,
    )
    s = start_stack(tmp_path / "stack", exp, mock_args={"canary": COLD})
    yield s, bool(request.param)
    stack.down(s.state_dir)


def test_a_warm_up_keeps_a_cold_candidate_from_being_rolled_back(
    cold_candidate: tuple[LiveStack, bool], http: httpx.Client
) -> None:
    s, warmed = cold_candidate

    def decided() -> str | None:
        send(s, http, 10)
        status = str(s.status()["rollout"]["status"])
        return status if status in ("completed", "rolled_back") else None

    outcome = wait_for(decided, "the rollout to complete or roll back", timeout_s=60)
    records = s.audit()
    actions = [r["action"] for r in records]
    if not warmed:  # the same candidate, judged on its cold start
        assert outcome == "rolled_back", records
        assert actions[:2] == ["start", "rollback"]
        assert records[1]["reasons"][0].startswith("canary: error rate ")
        return
    assert outcome == "completed", records
    assert actions[:2] == ["start", "warmed_up"]
    assert "rollback" not in actions
    assert records[0]["reasons"][1] == (
        "warm-up started: 10 answered requests to each of canary, within 30 s"
    )
    report = records[1]["warmup"]
    assert report["ok"]
    assert report["answered"] == {"canary": 10}
    assert report["sent"]["canary"] >= 30  # the 20 cold requests failed, and were sent again
    assert records[1]["reasons"][0].startswith("warm-up finished in ")
    assert s.status()["rollout"]["warmup"]["ok"]
    # The warm-up's requests are forced: in the stream, failures included, and never judged.
    forced = [e for e in s.events() if is_forced(e) and e.variant == "canary"]
    assert len(forced) == report["sent"]["canary"]
    assert sum(e.status >= 500 for e in forced) >= 20
    first_stage = next(r for r in records if r["action"] == "advance")["snapshot"]["canary"]
    assert first_stage["errors"] == 0
    assert first_stage["requests"] >= 40
    # While it warmed up, the users' requests all went to stable.
    started = records[1]["time"] * 1000
    early = [e for e in s.events() if not is_forced(e) and e.time_unix_ms < started - 1000]
    assert {e.variant for e in early} <= {"stable"}


def test_a_warm_up_that_cannot_finish_rolls_back_before_any_user_reaches_the_candidate(
    tmp_path: Path, http: httpx.Client
) -> None:
    exp = write_experiment(
        tmp_path,
        envoy={"request_timeout_s": 0.5},
        inflight={"notice_ms": 250},
        rollout={"cadence_s": 0.2, "stages": [50, 100]},
        guardrails=GUARDRAILS,
        lifecycle={"warmup": {"requests": 5, "timeout_s": 3}},
    )
    never_warm = ["--cold-requests", "100000", "--cold-ms", "2000"]
    s = start_stack(tmp_path / "stack", exp, mock_args={"canary": never_warm})
    try:

        def rolled_back() -> bool:
            send(s, http, 5)
            return bool(s.status()["rollout"]["status"] == "rolled_back")

        wait_for(rolled_back, "the failed warm-up's rollback", timeout_s=30)
        records = s.audit()
        assert [r["action"] for r in records][:2] == ["start", "rollback"]
        assert records[1]["reasons"][0].startswith(
            "warm-up failed after 3.0 s: fewer than 5 answers from ['canary']"
        )
        assert records[1]["warmup"]["answered"] == {"canary": 0}
        assert s.status()["rollout"]["warmup"]["ok"] is False
        assigned = {e.variant for e in s.events() if not is_forced(e)}
        assert assigned == {"stable"}  # no user request ever reached the cold candidate
    finally:
        stack.down(s.state_dir)


class Receiver(BaseHTTPRequestHandler):
    """A serving layer's hook endpoint: records every body, answers 204."""

    received: list[dict[str, Any]]

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        self.received.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        """Quiet: the test reads what it received."""


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (Receiver,), {"received": received}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/drained", received
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


async def test_the_drain_after_a_rollback_is_recorded_and_on_drained_is_called(
    tmp_path: Path, receiver: tuple[str, list[dict[str, Any]]]
) -> None:
    """The canary's requests hang, so they are open for as long as the test wants: after the
    rollback the evaluator sees them on the real Envoy's stats, then the clients give up, Envoy
    resets the upstream requests, and the canary has drained."""
    url, received = receiver
    exp = write_experiment(
        tmp_path,
        rollout={"cadence_s": 0.2, "min_stage_seconds": 600, "stages": [50, 100]},
        guardrails=GUARDRAILS,
        hooks={"on_drained": url, "backoff_s": 0.05},
        lifecycle={"drain": {"poll_s": 0.2, "timeout_s": 60}},
    )
    s = start_stack(tmp_path / "stack", exp, mock_args={"canary": ["--hang-rate", "1"]})
    canary = s.state["endpoints"]["models"]["canary"]

    def drain() -> dict[str, Any]:
        return dict(s.status()["rollout"]["drain"])

    try:
        async with httpx.AsyncClient(timeout=60) as client:
            url_chat = f"{s.listener}/v1/chat/completions"
            body = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
            open_ = [
                asyncio.create_task(
                    client.post(url_chat, json=body, headers={"x-conversation-id": f"c{i}"})
                )
                for i in range(12)
            ]
            await asyncio.to_thread(
                wait_for,
                lambda: httpx.get(f"{canary}/admin/stats").json()["in_flight"] >= 2,
                "requests open on the canary",
            )
            out = await asyncio.to_thread(
                run_cli, "experiment", "rollback", "chat-upgrade", "--state-dir", str(s.state_dir)
            )
            assert out.returncode == 0, out.stderr
            await asyncio.to_thread(
                wait_for,
                lambda: drain().get("status") == "draining" and (drain().get("active") or 0) >= 2,
                "the evaluator to see the open requests on Envoy",
            )
            text = await asyncio.to_thread(s.cli, "status")
            assert "drain      canary draining since the rollback: " in text.stdout
            for task in open_:
                task.cancel()  # the clients give up: Envoy resets the canary's requests
            await asyncio.gather(*open_, return_exceptions=True)
        await asyncio.to_thread(wait_for, lambda: drain()["status"] == "drained", "the drain")
        doc = drain()
        assert (doc["variants"], doc["clusters"], doc["after"]) == (
            ["canary"],
            ["model_canary"],
            "rollback",
        )
        assert doc["first"] >= 2  # the real Envoy's stats showed the open requests
        assert doc["active"] == 0
        assert doc["seconds"] > 0
        records = s.audit()
        assert [r["action"] for r in records] == ["start", "rollback", "drained"]
        assert records[2]["drain"] == doc
        assert records[2]["reasons"] == [
            f"canary drained after {doc['seconds']:.1f} s "
            f"({doc['first']} requests open at the first look)"
        ]
        text = await asyncio.to_thread(s.cli, "status")
        assert f"drain      canary drained after {doc['seconds']:.1f} s" in text.stdout
        await asyncio.to_thread(wait_for, lambda: received, "the on_drained hook")
        assert (received[0]["hook"], received[0]["action"]) == ("on_drained", "drained")
        assert received[0]["drain"] == doc
    finally:
        stack.down(s.state_dir)
