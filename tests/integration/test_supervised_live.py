"""Background tasks of the sidecar under supervision, with a real gRPC server and a real Redis:
a dead task turns health NOT_SERVING until it is restarted; a corrupted routing key is reported
while traffic keeps the last good routing, and a rollback written over it is applied."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc import store
from extproc.config import EXAMPLE_EXPERIMENT, load_experiment
from extproc.contract import keys
from extproc.contract.envoy import SIDECAR_SERVICE
from extproc.dataplane.server import Sidecar, SidecarSettings
from extproc.dev import stack
from extproc.supervise import Backoff
from tests.conftest import LiveStack, start_stack, wait_for, write_experiment
from tests.integration.sidecar_probe import health, heartbeats

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

EXP = load_experiment(EXAMPLE_EXPERIMENT)


async def until(check: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    """Wait on a condition (sync or async), polling; fail with ``what`` after 15 s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15.0
    while True:
        got = check()
        if await got if inspect.isawaitable(got) else got:
            return
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_a_dead_routing_follower_turns_health_not_serving_until_restarted(
    redis_url: str, client: aioredis.Redis
) -> None:
    sidecar = Sidecar(EXP, SidecarSettings(listen="127.0.0.1:0", redis_url=redis_url))
    sidecar.tasks.backoff = Backoff(first=2.0)  # long enough to see NOT_SERVING meanwhile
    bound: list[str] = []
    serving = asyncio.create_task(sidecar.run(ready=bound.append))
    await until(lambda: bool(bound), "the sidecar to listen")
    lane = sidecar.catalog.only
    assert lane is not None
    live = lane.live
    refresh = live.refresh
    armed = asyncio.Event()

    async def buggy_refresh() -> None:  # stands for a bug the follower does not expect
        if armed.is_set():
            armed.clear()
            raise RuntimeError("unexpected")
        await refresh()

    live.refresh = buggy_refresh  # type: ignore[method-assign]
    async with grpc.aio.insecure_channel(bound[0]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        async def status_is(want: int) -> bool:
            req = health_pb2.HealthCheckRequest(service=SIDECAR_SERVICE)
            return bool((await stub.Check(req, timeout=2)).status == want)

        await until(lambda: status_is(health_pb2.HealthCheckResponse.SERVING), "SERVING")
        armed.set()
        await until(lambda: status_is(health_pb2.HealthCheckResponse.NOT_SERVING), "NOT_SERVING")
        assert "live-routing" in sidecar.tasks.down
        await until(lambda: status_is(health_pb2.HealthCheckResponse.SERVING), "SERVING again")
        assert sidecar.tasks.restarts == {"live-routing": 1}
        # The restarted follower applies changes again.
        state = await store.set_weights(
            client, EXP, {"stable": 100, "canary": 0}, reason="rollback", actor="test"
        )
        await until(lambda: live.current.version == state.version, "the rollback")
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)


@pytest.fixture
def ab_stack(tmp_path: Path) -> Iterator[LiveStack]:
    """The example as an A/B test whose stage outlasts the test: only the test sets weights."""
    exp = write_experiment(tmp_path, strategy="ab", rollout={"min_stage_seconds": 3600})
    s = start_stack(tmp_path / "stack", exp)
    try:
        yield s
    finally:
        stack.down(s.state_dir)


def test_a_corrupted_routing_key_is_reported_and_a_later_rollback_applied(
    ab_stack: LiveStack, http: httpx.Client
) -> None:
    s = ab_stack
    s.set_weights(stable=50, canary=50)
    s.redis().set(keys.routing("chat-upgrade"), "{not a routing")

    def reported() -> bool:
        beats = heartbeats(s).values()
        return bool(beats) and all(b.get(b"routing_error") for b in beats)

    wait_for(reported, "every sidecar to report the malformed routing")
    channel = grpc.insecure_channel(s.state["endpoints"]["sidecar"])
    assert health(channel) == "SERVING"  # the follower is alive, on the last good routing
    convs = [f"c{i}" for i in range(20)]
    split = {s.chat(http, {"x-conversation-id": c}).headers["x-llm-variant"] for c in convs}
    assert split == {"stable", "canary"}

    out = s.cli("experiment", "set-weights", "chat-upgrade", "stable=100", "canary=0", "--json")
    assert out.returncode == 0, out.stderr
    version = int(json.loads(out.stdout)["version"])

    def rolled_back() -> bool:
        beats = heartbeats(s).values()
        return all(
            not b.get(b"routing_error") and int(b[b"routing_version"]) == version for b in beats
        )

    wait_for(rolled_back, "every sidecar to apply the rollback")
    for c in convs:
        assert s.chat(http, {"x-conversation-id": c}).headers["x-llm-variant"] == "stable"
    assert health(channel) == "SERVING"
    channel.close()
