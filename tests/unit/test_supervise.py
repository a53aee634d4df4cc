"""The supervised task group: a task that dies is reported, restarted with backoff, and the
group is healthy again once it runs; a task that finishes is left alone."""

from __future__ import annotations

import asyncio

import pytest

from extproc.supervise import Backoff, TaskGroup

pytestmark = pytest.mark.timeout(30)

QUICK = Backoff(first=0.01, most=0.04, healthy_after_s=10.0)


def test_backoff_doubles_while_a_task_dies_young_and_resets_after_a_long_run() -> None:
    b = Backoff(first=0.5, most=4.0, healthy_after_s=30.0)
    delays = [b.next(None, 0.0)]
    for _ in range(5):
        delays.append(b.next(delays[-1], 1.0))
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.next(4.0, 31.0) == 0.5


async def test_a_task_that_dies_is_reported_and_restarted() -> None:
    seen: list[tuple[bool, dict[str, str]]] = []
    group: TaskGroup

    async def report() -> None:
        seen.append((group.healthy, dict(group.down)))

    group = TaskGroup(report, backoff=QUICK)
    runs = 0
    running = asyncio.Event()

    async def follower() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise ValueError(f"malformed value #{runs}")
        running.set()
        await asyncio.Event().wait()  # runs until cancelled

    group.start("follower", follower)
    await asyncio.wait_for(running.wait(), 10)
    assert group.healthy
    assert group.restarts == {"follower": 2}
    assert seen == [
        (False, {"follower": "ValueError: malformed value #1"}),
        (True, {}),
        (False, {"follower": "ValueError: malformed value #2"}),
        (True, {}),
    ]
    await group.close()


async def test_a_finished_task_is_not_restarted_nor_one_that_dies_after_stop() -> None:
    stop = asyncio.Event()
    group = TaskGroup(stop=stop, backoff=Backoff(first=60.0))
    done = group.start("once", lambda: asyncio.sleep(0))
    calls = 0

    async def dies() -> None:
        nonlocal calls
        calls += 1
        stop.set()
        raise RuntimeError("boom")

    dying = group.start("dies", dies)
    await asyncio.wait_for(asyncio.gather(done, dying), 10)  # no 60 s backoff: stop cuts it
    assert calls == 1
    assert group.restarts == {}


async def test_a_task_name_is_supervised_once() -> None:
    group = TaskGroup()
    group.start("t", asyncio.Event().wait)
    with pytest.raises(ValueError, match="already supervised"):
        group.start("t", asyncio.Event().wait)
    await group.close()
