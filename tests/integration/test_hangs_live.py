"""A candidate whose requests hang is rolled back while they hang, on the real stack (Envoy, the
sidecar, Redis, the evaluator), long before the upstream timeout: the in-flight notices come from
the observer's sweeper (ext_proc) or from Envoy's periodic access-log entries (native)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from extproc.dev import stack
from tests.conftest import LiveStack, start_stack, write_experiment

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]


@pytest.fixture(params=["ext_proc", "native"])
def hanging(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LiveStack]:
    """On either data plane: the observer's sweeper or Envoy's periodic access-log entries."""
    exp = write_experiment(
        tmp_path,
        dataplane=request.param,
        envoy={"request_timeout_s": 300},
        inflight={"notice_ms": 300, "hang_multiple": 4},
        rollout={
            "stages": [30, 60, 100],
            "cadence_s": 0.2,
            "min_stage_seconds": 600,
            "min_stage_samples": 15,
        },
        guardrails=[{"metric": "error_rate", "max_increase": 0.5, "min_samples": 20}],
    )
    s = start_stack(tmp_path / "stack", exp)
    yield s
    stack.down(s.state_dir)


async def test_hanging_candidate_is_rolled_back_before_its_requests_end(
    hanging: LiveStack,
) -> None:
    s = hanging
    canary = s.state["endpoints"]["models"]["canary"]
    async with httpx.AsyncClient(timeout=None) as http:
        (await http.post(f"{canary}/admin/behaviour", json={"hang_rate": 0.4})).raise_for_status()
        open_requests: list[asyncio.Task[httpx.Response]] = []

        async def chat() -> httpx.Response:
            return await http.post(
                f"{s.listener}/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "hello"}]},
                headers={"x-conversation-id": str(uuid.uuid4())},
            )

        async def hanging() -> int:
            """Requests the candidate holds without answering, so far (it counts each)."""
            stats = (await http.get(f"{canary}/admin/stats")).json()
            return int(stats["outcomes"].get("hang", 0))

        async def wave() -> None:
            """Ten requests, until each has either been answered or is held by the candidate:
            the answered ones end, the hanging stay open."""
            held_before = await hanging()
            pending = {asyncio.create_task(chat()) for _ in range(10)}
            deadline = asyncio.get_running_loop().time() + 60
            while len(pending) > await hanging() - held_before:
                assert asyncio.get_running_loop().time() < deadline, "a wave never settled"
                # Wakes at an answer, or after a moment to look at the candidate's count again.
                done, pending = await asyncio.wait(
                    pending, timeout=0.05, return_when=asyncio.FIRST_COMPLETED
                )
                assert all(t.result().status_code == 200 for t in done)
            open_requests.extend(pending)

        async def rolled_back() -> bool:
            for _ in range(3):
                await wave()
            st = await asyncio.to_thread(s.status)
            return bool(st["rollout"]["status"] == "rolled_back")

        deadline = asyncio.get_running_loop().time() + 90
        while not await rolled_back():
            assert asyncio.get_running_loop().time() < deadline, "no rollback within 90 s"

        out = await asyncio.to_thread(s.cli, "log", "chat-upgrade", "--json", "--count", "100")
        assert out.returncode == 0, out.stderr
        rollback = [r for r in json.loads(out.stdout) if r["action"] == "rollback"]
        assert len(rollback) == 1
        assert rollback[0]["stage"] == 0
        assert any("error rate" in r for r in rollback[0]["reasons"])
        snap = rollback[0]["snapshot"]["canary"]
        assert snap["hung"] > 0
        assert snap["errors"] == snap["hung"] == snap["timeouts"]  # every failure still open

        # The decision was taken on requests that are still open: none of them has ended, and
        # no canary request has a final event with an error.
        assert open_requests
        assert not any(t.done() for t in open_requests)
        events = await asyncio.to_thread(lambda: s.events(notices=True))
        ended = {e.request_id for e in events if not e.in_flight}
        noticed = {e.request_id for e in events if e.in_flight and e.variant == "canary"}
        assert len(noticed - ended) >= snap["hung"]
        assert not any(e.error for e in events if e.variant == "canary" and not e.in_flight)

        served = [(await chat()).headers["x-llm-variant"] for _ in range(10)]
        assert set(served) == {"stable"}
        for t in open_requests:
            t.cancel()
        await asyncio.gather(*open_requests, return_exceptions=True)
