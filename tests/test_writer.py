"""The telemetry writer: batches into a real Redis, bounded while Redis is away."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from extproc import keys, stack, store
from extproc.telemetry.v1.event_pb2 import TelemetryEvent
from extproc.telemetry.writer import TelemetryWriter

pytestmark = pytest.mark.timeout(30)


def ev(i: int, variant: str = "stable", shadow: bool = False) -> TelemetryEvent:
    return TelemetryEvent(experiment="e", variant=variant, request_id=f"r{i}", shadow=shadow)


async def test_flush_writes_events_and_exact_counts(client: aioredis.Redis) -> None:
    w = TelemetryWriter(client, batch_size=7)
    for i in range(30):
        w.submit(ev(i, "canary" if i % 3 == 0 else "stable", shadow=i == 1))
    await w.flush()
    assert await client.xlen(keys.events("e")) == 30
    counts = await client.hgetall(keys.counts("e"))
    assert counts == {b"canary": b"10", b"stable": b"19"}  # the shadow event counts for nobody
    assert (w.stats.written, w.stats.dropped, w.buffered) == (30, 0, 0)


async def test_unreachable_redis_buffers_up_to_the_bound_then_counts_drops() -> None:
    r = store.connect(f"redis://127.0.0.1:{stack.free_port()}/0", timeout_s=0.2)
    w = TelemetryWriter(r, max_buffer=10)
    for i in range(25):
        w.submit(ev(i))
    with pytest.raises(RedisError):
        await w.flush()
    assert (w.buffered, w.stats.dropped, w.stats.written) == (10, 15, 0)
    await r.aclose()
