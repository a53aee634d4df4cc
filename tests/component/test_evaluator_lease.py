"""The evaluator keeps its lease while it reads a long stage, and stops if it lost it."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis.asyncio as aioredis

from extproc import store
from extproc.config import EXAMPLE_EXPERIMENT, load_experiment
from extproc.contract import keys
from extproc.evaluator.service import Evaluator
from extproc.telemetry.v1.event_pb2 import TelemetryEvent

pytestmark = pytest.mark.timeout(120)
EVENTS = 40_000


async def fill(r: aioredis.Redis, name: str) -> None:
    raw = TelemetryEvent(time_unix_ms=1, variant="stable", duration_ms=5).SerializeToString()
    for start in range(0, EVENTS, 5000):
        async with r.pipeline(transaction=False) as pipe:
            for _ in range(start, start + 5000):
                pipe.xadd(keys.events(name), {keys.EVENT_FIELD: raw})
            await pipe.execute()


def test_a_long_read_renews_the_lease_and_stops_when_it_is_lost(redis_url: str) -> None:
    exp = load_experiment(EXAMPLE_EXPERIMENT)

    async def go() -> tuple[int, int, bool, bool, int]:
        r = store.connect(redis_url, timeout_s=30)
        try:
            await r.delete(keys.events(exp.name), keys.lease(exp.name))
            await fill(r, exp.name)
            # A lease of 30 ms: reading 40,000 events takes far longer, so it must be renewed.
            ev = Evaluator(exp, r, "reader", lease_ttl_s=0.03)
            assert await ev._renew()
            ev.leader = True
            renewals = 0
            renew = ev._renew

            async def counted() -> bool:
                nonlocal renewals
                renewals += 1
                return await renew()

            ev._renew = counted  # type: ignore[method-assign]
            read = await ev._read_events()
            # Another evaluator holds the lease: the reader stops and steps down.
            other = Evaluator(exp, r, "other", lease_ttl_s=30)
            ev2 = Evaluator(exp, r, "late", lease_ttl_s=0.03)
            ev2.leader = True
            await r.delete(keys.lease(exp.name))
            assert await other._renew()
            partial = await ev2._read_events()
            return renewals, read, ev.leader, ev2.leader, partial
        finally:
            await r.aclose()

    renewals, read, reader_leads, late_leads, partial = asyncio.run(go())
    assert read == EVENTS
    assert renewals >= 1
    assert reader_leads
    assert not late_leads
    assert partial < EVENTS


async def test_a_malformed_routing_is_reported_and_the_loop_goes_on(redis_url: str) -> None:
    """A bad manual edit of the routing key is logged at each look; it does not end the loop
    (which would leave the rollout unwatched until a restart)."""
    exp = load_experiment(EXAMPLE_EXPERIMENT)
    r = store.connect(redis_url)
    try:
        await r.delete(keys.lease(exp.name))
        await store.register_experiment(r, exp)
        ev = Evaluator(exp, r, "e")
        assert await ev._hold_lease()  # the rollout starts: its first routing is written
        await r.set(keys.routing(exp.name), "{not a routing")
        stop = asyncio.Event()

        class StopOnReport(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "cannot read the routing" in record.getMessage():
                    stop.set()

        handler = StopOnReport()
        logging.getLogger("extproc.evaluator.service").addHandler(handler)
        try:
            await asyncio.wait_for(ev.run(stop), 30)
        finally:
            logging.getLogger("extproc.evaluator.service").removeHandler(handler)
        assert stop.is_set()
    finally:
        await r.aclose()
