"""A standby that takes over loads the active evaluator's window snapshot from a real Redis and
reads only the tail of the stream; without a usable snapshot it reads the whole stage. No wall
clock: the snapshot schedule runs on an injected clock."""

from __future__ import annotations

import logging
import time

import pytest
import redis.asyncio as aioredis

from extproc.config import EXAMPLE_EXPERIMENT, load_experiment
from extproc.contract import keys
from extproc.evaluator import takeover
from extproc.evaluator.rollout import load_state
from extproc.evaluator.service import Evaluator
from extproc.evaluator.snapshot import Identity
from extproc.evaluator.takeover import SnapshotPolicy, SnapshotWriter
from extproc.telemetry.v1.event_pb2 import Assignment, ErrorClass, TelemetryEvent
from tests.unit.test_window_snapshot import differences

pytestmark = pytest.mark.timeout(60)
EXP = load_experiment(EXAMPLE_EXPERIMENT)
NAME = EXP.name


async def send(r: aioredis.Redis, first: int, n: int) -> None:
    """``n`` answered or failed requests of this stage, numbered from ``first``."""
    now_ms = int(time.time() * 1000)
    async with r.pipeline(transaction=False) as pipe:
        for i in range(first, first + n):
            ev = TelemetryEvent(
                variant="canary" if i % 3 == 0 else "stable",
                time_unix_ms=now_ms,
                request_id=f"r{i}",
                key_hash=f"k{i % 50}",
                assignment=Assignment.ASSIGNMENT_STICKY,
                duration_ms=100.0 + i,
                completion_tokens=i % 90,
                response_bytes=10 * i,
                error=ErrorClass.ERROR_CLASS_UPSTREAM_5XX if i % 11 == 0 else 0,
            )
            pipe.xadd(keys.events(NAME), {keys.EVENT_FIELD: ev.SerializeToString()})
        await pipe.execute()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def active_with_snapshot(r: aioredis.Redis, events: int) -> Evaluator:
    """An active evaluator that read ``events`` events and wrote its snapshot when due."""
    clock = Clock()
    active = Evaluator(EXP, r, "active", lease_ttl_s=30)
    active.snapshots = SnapshotWriter(r, NAME, "active", SnapshotPolicy(interval_s=10), clock)
    assert await active._hold_lease()  # no state yet: the rollout starts at stage 1
    await send(r, 0, events)
    await active.tick()
    active._snapshot_if_due()  # 0 s since the last look: not due
    await active.snapshots.wait()
    assert active.snapshots.written == 0
    clock.now = 10.0
    active._snapshot_if_due()
    await active.snapshots.wait()
    assert active.snapshots.written == 1
    active._snapshot_if_due()  # nothing new since: no second write
    await active.snapshots.wait()
    assert active.snapshots.written == 1
    return active


async def whole_stream_window(r: aioredis.Redis) -> Evaluator:
    """An evaluator that read the whole stage (the snapshot out of its way)."""
    saved = await r.dump(keys.snapshot(NAME))
    await r.delete(keys.snapshot(NAME))
    full = Evaluator(EXP, r, "full", lease_ttl_s=30)
    await full._take_over()
    full.leader = True
    await full._read_events()
    if saved is not None:
        await r.restore(keys.snapshot(NAME), 0, saved)
    return full


async def hand_over(r: aioredis.Redis, who: str) -> Evaluator:
    await r.delete(keys.lease(NAME))  # what a stopping leader does
    standby = Evaluator(EXP, r, who, lease_ttl_s=30)
    assert await standby._hold_lease()
    return standby


async def test_a_standby_loads_the_snapshot_and_reads_only_the_tail(
    client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    active = await active_with_snapshot(client, 600)
    covered = active.events_seen
    await send(client, 600, 150)  # after the snapshot
    with caplog.at_level(logging.INFO, "extproc.evaluator.service"):
        standby = await hand_over(client, "standby")
    assert "restored from a snapshot" in caplog.text
    assert standby.events_seen == covered
    assert await standby._read_events() == 150
    full = await whole_stream_window(client)
    assert differences(standby.window, full.window) == []
    assert standby.window.variants["canary"].requests == 250
    # and the first decision is the one the full read leads to
    await standby.tick()
    await full.tick()
    assert standby.last_verdict is not None
    assert full.last_verdict is not None
    assert [c.to_json() for c in standby.last_verdict.checks] == [
        c.to_json() for c in full.last_verdict.checks
    ]


async def test_a_corrupt_snapshot_falls_back_to_the_whole_stage(
    client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await active_with_snapshot(client, 300)
    await client.hset(keys.snapshot(NAME), "p:v0/col/latency_ms", b"\x00" * 16)
    with caplog.at_level(logging.WARNING, "extproc.evaluator.service"):
        standby = await hand_over(client, "standby")
    assert "snapshot not used, reading the whole stage: part v0/col/latency_ms" in caplog.text
    state = await load_state(client, NAME)
    assert state is not None
    assert standby.events_seen == f"{int(state.stage_started * 1000)}-0"
    assert await standby._read_events() == 300
    full = await whole_stream_window(client)
    assert differences(standby.window, full.window) == []


async def test_a_snapshot_of_an_earlier_stage_is_not_used(
    client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    active = await active_with_snapshot(client, 300)
    assert active.state is not None
    # The rollout moved on to stage 2 after the snapshot (the leader died before its next one).
    await active._save(active.state.__class__(**{**vars(active.state), "stage": 1}))
    with caplog.at_level(logging.WARNING, "extproc.evaluator.service"):
        standby = await hand_over(client, "standby")
    assert "of another stage or configuration" in caplog.text
    assert await standby._read_events() == 300


async def test_no_snapshot_means_the_whole_stage(
    client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    active = Evaluator(EXP, client, "active", lease_ttl_s=30)
    assert await active._hold_lease()
    await send(client, 0, 40)
    with caplog.at_level(logging.WARNING, "extproc.evaluator.service"):
        standby = await hand_over(client, "standby")
    assert "none written" in caplog.text
    assert await standby._read_events() == 40


async def test_an_evaluator_without_the_lease_writes_no_snapshot(client: aioredis.Redis) -> None:
    active = await active_with_snapshot(client, 100)
    before = await client.hgetall(keys.snapshot(NAME))
    await client.set(keys.lease(NAME), "someone else")
    assert not await takeover.write(client, NAME, "active", {b"meta": b"{}"}, 60)
    assert await client.hgetall(keys.snapshot(NAME)) == before
    assert await client.ttl(keys.snapshot(NAME)) > 0
    assert active.snapshots.written == 1


async def test_a_snapshot_is_due_by_time_or_by_events_and_only_when_the_window_moved(
    client: aioredis.Redis,
) -> None:
    clock = Clock()
    policy = SnapshotPolicy(interval_s=10, every_events=1000)
    writer = SnapshotWriter(client, NAME, "active", policy, clock)
    active = Evaluator(EXP, client, "active", lease_ttl_s=30)
    assert await active._hold_lease()
    assert active.state is not None
    identity = Identity.of(active.state.attempt, active.state.stage, active.window)
    assert not writer.due(identity, "5-0", "0-0")  # neither 10 s nor 1,000 events yet
    writer.read(999)
    assert not writer.due(identity, "5-0", "0-0")
    writer.read(1)
    assert writer.due(identity, "5-0", "0-0")  # 1,000 events
    writer.start(active.window, identity, "5-0", "0-0")
    await writer.wait()
    assert writer.written == 1
    clock.now = 20.0
    assert not writer.due(identity, "5-0", "0-0")  # nothing new to write
    assert writer.due(identity, "6-0", "0-0")
    assert writer.due(identity, "5-0", "1-0")  # a signal moved the window too
    off = SnapshotWriter(client, NAME, "active", SnapshotPolicy(interval_s=0), clock)
    off.read(10**6)
    clock.now = 10**6
    assert not off.due(identity, "9-0", "0-0")


async def test_a_snapshot_over_the_size_bound_is_not_written(
    client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    active = Evaluator(EXP, client, "active", lease_ttl_s=30)
    assert await active._hold_lease()
    assert active.state is not None
    await send(client, 0, 50)
    await active.tick()
    writer = SnapshotWriter(client, NAME, "active", SnapshotPolicy(max_bytes=1000), Clock())
    identity = Identity.of(active.state.attempt, active.state.stage, active.window)
    with caplog.at_level(logging.WARNING, "extproc.evaluator.takeover"):
        for position in ("1-0", "2-0"):  # said once per stage, not at every look
            writer.start(active.window, identity, position, "0-0")
            await writer.wait()
    assert writer.written == 0
    assert not await client.exists(keys.snapshot(NAME))
    assert caplog.text.count("bytes > max 1000") == 1
