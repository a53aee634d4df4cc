"""`extproc evaluate --all`: one process evaluates every experiment in a real Redis, follows
creations, replacements and removals while it runs, and shares the experiments with another
such process through the per-experiment leases."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from extproc import store
from extproc.config import EXAMPLE_EXPERIMENT, load_experiment, parse_experiment
from extproc.contract import keys
from extproc.evaluator.fleet import Fleet
from extproc.evaluator.rollout import load_state

pytestmark = pytest.mark.timeout(60)


def experiment(name: str, **changes: Any) -> Any:
    """The example experiment under another name, ticking every 0.1 s."""
    doc = load_experiment(EXAMPLE_EXPERIMENT).to_json_dict()
    doc.update(name=name, salt=f"{name}-salt", **changes)
    doc["rollout"] = {**doc["rollout"], "cadence_s": 0.1}
    return parse_experiment(doc)


async def until(
    check: Callable[[], Awaitable[bool] | bool], what: str, timeout_s: float = 20
) -> None:
    """Poll ``check`` (every 20 ms) until it holds; fail with ``what`` after ``timeout_s``."""

    async def holds() -> bool:
        got = check()
        return bool(await got) if inspect.isawaitable(got) else bool(got)

    for _ in range(round(timeout_s / 0.02)):
        if await holds():
            return
        await asyncio.sleep(0.02)  # a polling interval, not a synchronisation
    pytest.fail(f"timed out waiting for {what}")


async def lease(r: aioredis.Redis, name: str) -> str | None:
    held = await r.get(keys.lease(name))
    return None if held is None else held.decode() if isinstance(held, bytes) else held


async def lease_is(r: aioredis.Redis, name: str, holder: str | None) -> bool:
    return await lease(r, name) == holder


async def test_a_fleet_follows_the_experiments_as_they_come_change_and_go(
    client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    r = client
    for name in ("chat", "code"):
        await store.register_experiment(r, experiment(name))
    fleet = Fleet(r, "f1", refresh_s=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(fleet.run(stop))
    try:

        async def started(*names: str) -> bool:
            return all([await load_state(r, n) is not None for n in names])

        await until(lambda: started("chat", "code"), "both rollouts to start")
        assert await lease(r, "chat") == "f1/chat"
        assert await lease(r, "code") == "f1/code"
        # Created while the fleet runs: evaluated without a restart.
        await store.register_experiment(r, experiment("embed"))
        await until(lambda: started("embed"), "the new experiment's rollout to start")
        # Replaced: its evaluator restarts with the new definition and keeps the lease.
        before = fleet.running["chat"].digest
        await store.register_experiment(r, experiment("chat", sticky_keys=["x-user-id"]))

        async def replaced() -> bool:
            entry = fleet.running.get("chat")
            return entry is not None and entry.digest != before

        await until(replaced, "the chat evaluator to restart with the new definition")
        await until(lambda: lease_is(r, "chat", "f1/chat"), "the lease kept across the restart")
        # Removed: its evaluator stops and hands its lease over at once.
        await r.srem(keys.EXPERIMENTS, "code")
        await until(lambda: lease_is(r, "code", None), "the removed one's lease released")
        assert set(fleet.running) == {"chat", "embed"}
        # A definition this release cannot read is reported and skipped; the rest go on.
        await r.sadd(keys.EXPERIMENTS, "broken")
        await r.set(keys.definition("broken"), '{"name": "broken", "variants": 3}')
        with caplog.at_level(logging.ERROR, logger="extproc.evaluator.fleet"):
            await until(lambda: "broken" in fleet.invalid, "the broken one reported")
        assert "not evaluating broken" in caplog.text
        assert "broken" not in fleet.running
        assert await lease(r, "embed") == "f1/embed"
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    # Stopped: every lease handed over.
    assert [await lease(r, n) for n in ("chat", "embed")] == [None, None]


async def test_two_fleets_share_the_experiments_and_one_takes_over_from_the_other(
    client: aioredis.Redis,
) -> None:
    r = client
    names = [f"exp{i}" for i in range(4)]
    for name in names:
        await store.register_experiment(r, experiment(name))
    first, second = Fleet(r, "a", refresh_s=0.05), Fleet(r, "b", refresh_s=0.05)
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    task_a = asyncio.create_task(first.run(stop_a))
    task_b = asyncio.create_task(second.run(stop_b))
    try:

        async def all_held() -> bool:
            return all([await lease(r, n) is not None for n in names])

        await until(all_held, "every experiment to have an active evaluator")
        holders = {n: await lease(r, n) for n in names}
        # Exactly one decides for each experiment, whichever fleet got there first.
        assert set(holders.values()) <= {f"{f}/{n}" for f in "ab" for n in names}
        assert all(h is not None and h.endswith(f"/{n}") for n, h in holders.items())
        stop_a.set()
        await asyncio.wait_for(task_a, 30)

        async def all_on_b() -> bool:
            return all([await lease(r, n) == f"b/{n}" for n in names])

        await until(all_on_b, "the second fleet to take over every experiment")
    finally:
        stop_a.set()
        stop_b.set()
        await asyncio.wait_for(asyncio.gather(task_a, task_b), 30)
