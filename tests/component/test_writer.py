"""The telemetry writer: batches into a real Redis, exactly once, bounded while Redis is away."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from extproc import store
from extproc.contract import keys
from extproc.dev import stack
from extproc.telemetry import rollup
from extproc.telemetry.v1.event_pb2 import ErrorClass, TelemetryEvent
from extproc.telemetry.writer import Capture, TelemetryWriter

pytestmark = pytest.mark.timeout(30)


def ev(i: int, variant: str = "stable", shadow: bool = False) -> TelemetryEvent:
    return TelemetryEvent(experiment="e", variant=variant, request_id=f"r{i}", shadow=shadow)


async def test_rollups_are_written_per_bucket_and_width_and_read_back(
    client: aioredis.Redis,
) -> None:
    w = TelemetryWriter(client, batch_size=5, rollup_retention_s=3600)
    # 40 requests over 100 s, every fourth a server error; and one request's in-flight notice,
    # which is no request of its own.
    for i in range(40):
        e = ev(i, "canary" if i % 2 else "stable")
        e.time_unix_ms = 1_000_000 + i * 2_500
        e.duration_ms = 100.0 + i
        e.error = ErrorClass.ERROR_CLASS_UPSTREAM_5XX if i % 4 == 0 else ErrorClass.ERROR_CLASS_NONE
        w.submit(e)
    notice = ev(0, "canary")
    notice.in_flight, notice.time_unix_ms, notice.duration_ms = True, 1_010_000, 5_000.0
    w.submit(notice)
    await w.flush()
    assert await client.hgetall(keys.counts("e")) == {b"canary": b"20", b"stable": b"20"}
    fine = await rollup.read(client, "e", 10, 1_000, 1_100)
    assert [start for start, _ in fine] == list(range(1_000, 1_100, 10))
    # Four requests start in each 10 s bucket, two per variant.
    assert all(t.counts["requests"] == 2 for _, b in fine for t in b.tallies.values())
    coarse = rollup.merged(await rollup.read(client, "e", 300, 1_000, 1_100))
    assert (
        rollup.merged(fine).tallies.keys()
        == coarse.tallies.keys()
        == {
            ("assigned", "stable"),
            ("assigned", "canary"),
        }
    )
    for key, t in rollup.merged(fine).tallies.items():
        assert t.counts == coarse.tallies[key].counts
        assert t.figures() == coarse.tallies[key].figures()
    stable = coarse.tallies[("assigned", "stable")].figures()
    assert (stable["window_requests"], stable["errors"]) == (20, 10)
    ttl = await client.ttl(keys.rollup("e", 300, 900))
    assert 0 < ttl <= 3600


async def test_fine_buckets_are_kept_hours_and_coarse_ones_the_retention(
    client: aioredis.Redis,
) -> None:
    w = TelemetryWriter(client, rollup_retention_s=30 * 86_400)
    e = ev(1)
    e.time_unix_ms = 1_000_000
    w.submit(e)
    await w.flush()
    assert 0 < await client.ttl(keys.rollup("e", 10, 1_000)) <= rollup.FINE_KEPT_S
    assert rollup.FINE_KEPT_S < await client.ttl(keys.rollup("e", 300, 900)) <= 30 * 86_400


async def test_a_span_read_back_is_the_tally_of_its_events(client: aioredis.Redis) -> None:
    """Added up on the server across fine and coarse buckets: counts, sketch bins and the float
    sums (output speed) come back exactly as a tally of the raw events, refused ones counted."""
    w = TelemetryWriter(client, batch_size=50)
    events = []
    for i in range(400):
        e = ev(i, ("stable", "canary", "")[i % 3], shadow=i % 7 == 0)
        e.time_unix_ms = 1_000_000 + i * 2_345  # 938 s: coarse buckets and ragged ends
        e.duration_ms = 50.0 + (i * 37) % 900 + i / 7
        e.first_token_ms = e.duration_ms / 3
        e.streamed = True
        e.completion_tokens = 3 + i % 50
        events.append(e)
        w.submit(e)
    await w.flush()
    span = await rollup.read_span(client, "e", 1_000, 1_000 + 940)
    want = rollup.tally(events)
    assert span.refused == sum(1 for e in events if not e.variant)
    assert span.tallies.keys() == want.keys()
    for key, t in want.items():
        got = span.tallies[key]
        assert got.counts == t.counts, key
        assert {k: s.bins for k, s in got.sketches.items()} == {
            k: s.bins for k, s in t.sketches.items()
        }
        assert got.sums == pytest.approx(t.sums, rel=1e-15)
    assert len(rollup.span_starts(1_000, 1_940)) < 940 // 10  # coarse where they fit


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


class StallingProxy:
    """A TCP proxy in front of a real Redis that can hold back Redis's replies: the command runs,
    its reply outlives the client's socket timeout (a slow fsync, a fork, a network blip)."""

    def __init__(self, target: str) -> None:
        url = urlsplit(target)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 6379
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _connection(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(self.host, self.port)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, held: bool) -> None:
            with contextlib.suppress(OSError):
                while data := await r.read(65_536):
                    if held:
                        await self.flowing.wait()
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pump(down_r, up_w, False), pump(up_r, down_w, True))


async def test_a_batch_whose_reply_was_lost_is_not_written_twice(
    redis_url: str, client: aioredis.Redis
) -> None:
    proxy = StallingProxy(redis_url)
    r = store.connect(await proxy.start(), timeout_s=0.3)
    w = TelemetryWriter(r)
    try:
        for i in range(4):
            w.submit(ev(i, "canary" if i % 2 else "stable"))
        await w.flush()
        proxy.flowing.clear()  # Redis still runs what it gets; its replies are held back
        for i in range(4, 10):
            w.submit(ev(i, "canary" if i % 2 else "stable"))
        with pytest.raises(RedisError):
            await w.flush()
        # The batch was applied although the writer could not know it.
        assert await client.xlen(keys.events("e")) == 10
        assert w.buffered == 6
        proxy.flowing.set()
        await w.flush()  # the retry
        assert (w.buffered, w.stats.written) == (0, 10)
        ids = [
            TelemetryEvent.FromString(f[keys.EVENT_FIELD]).request_id
            for _, f in await client.xrange(keys.events("e"))
        ]
        assert sorted(ids) == sorted(f"r{i}" for i in range(10))
        assert await client.hgetall(keys.counts("e")) == {b"canary": b"5", b"stable": b"5"}
        tallies = rollup.merged(await rollup.read(client, "e", 10, 0, 10))
        assert {v: t.counts["requests"] for (_, v), t in tallies.tallies.items()} == {
            "canary": 5,
            "stable": 5,
        }
        w.submit(ev(10))
        await w.flush()
        # Only the last confirmed batch's id is kept (the ones before are deleted).
        assert len([k async for k in client.scan_iter(keys.batch("e", "*"))]) == 1
    finally:
        await r.aclose()
        await proxy.close()


async def test_the_capture_buffer_is_bounded_in_bytes() -> None:
    r = store.connect(f"redis://127.0.0.1:{stack.free_port()}/0", timeout_s=0.2)
    w = TelemetryWriter(r, max_capture_bytes=10_000)
    doc = "x" * 1_000
    for i in range(30):
        w.submit_capture(Capture("e", f"r{i:02d}", "primary", doc, 60, 100, 0.0))
    assert 9_000 < w.capture_bytes <= 10_000
    assert w.stats.captures_dropped == 21
    with pytest.raises(RedisError):
        await w.flush()
    assert 9_000 < w.capture_bytes <= 10_000  # put back whole after the failed write
    await r.aclose()


async def test_captures_are_written_and_the_buffer_empties(client: aioredis.Redis) -> None:
    w = TelemetryWriter(client, max_capture_bytes=10_000)
    for i in range(5):
        w.submit_capture(Capture("e", f"r{i}", "primary", '{"answer": "hi"}', 60, 100, float(i)))
    await w.flush()
    assert w.capture_bytes == 0
    assert await client.zcard(keys.pairs("e")) == 5
    assert await client.hget(keys.pair("e", "r3"), "primary") == b'{"answer": "hi"}'
