"""Shutdown when a library swallows the cancel: redis-py's asyncio client can catch the
``CancelledError`` delivered while a command is in flight and raise a connection error instead.
With Redis gone, the tasks that follow it must still end, or the sidecar never exits on SIGTERM
(seen: a sidecar whose Redis was stopped with it kept running, SIGTERM after SIGTERM)."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from extproc.config import Drain, Judge
from extproc.contract import signals
from extproc.dev import stack
from extproc.evaluator import drain
from extproc.quality.llm_judge import JudgeClient, JudgeWorker, Pair
from extproc.routing.live import follow
from extproc.supervise import Backoff, TaskGroup

pytestmark = pytest.mark.timeout(30)


class GoneRedisFollower:
    """A :class:`extproc.routing.live.Follower` whose Redis goes away as the cancel arrives:
    the first refresh waits on Redis and turns the cancel into a connection error (what redis-py
    can do), every later one fails at once. Refreshing again after that is the hang."""

    def __init__(self) -> None:
        # A real client of a port nothing listens on: nothing here reaches it before the
        # refreshes fail, but the follower's pub/sub is redis-py's own.
        self.redis = aioredis.Redis(port=stack.free_port())
        self.redis_ok = True
        self.poll_interval_s = 0.01
        self.waiting = asyncio.Event()
        self.refreshes = 0

    async def refresh(self) -> None:
        self.refreshes += 1
        if self.refreshes == 1:
            self.waiting.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                raise RedisConnectionError("connection lost") from None
        if self.refreshes > 3:
            raise AssertionError("still refreshing after the cancel")
        raise RedisConnectionError("connection refused")

    def kept(self) -> str:
        return "routing version 1"


async def _never_subscribed(_: object) -> None:
    raise AssertionError("never subscribed: no refresh succeeds")


async def test_following_redis_ends_on_a_swallowed_cancel_with_redis_gone() -> None:
    f = GoneRedisFollower()
    task = asyncio.create_task(follow(f, _never_subscribed))
    await f.waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert f.refreshes == 1
    assert f.redis_ok is False  # the lost connection was seen as Redis trouble, then it stopped
    await f.redis.aclose()


async def test_a_task_that_swallows_its_cancel_and_dies_is_not_restarted() -> None:
    group = TaskGroup(backoff=Backoff(first=0.01))
    runs = 0
    started = asyncio.Event()

    async def swallows() -> None:
        nonlocal runs
        runs += 1
        if runs > 1:
            return  # restarted after the cancel: close() would wait on it forever
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RedisConnectionError("connection lost") from None

    group.start("follower", swallows)
    await started.wait()
    await group.close()
    assert runs == 1
    assert group.restarts == {}


class JudgedAgain(BaseException):
    """Raised by a judge asked for another pair after its cancel: the consumer went on."""


class SwallowingJudge(JudgeWorker):
    """Judges the first pair until cancelled, and turns that cancel into a connection error."""

    def __init__(self) -> None:
        client = JudgeClient(Judge(endpoint=f"http://127.0.0.1:{stack.free_port()}/v1", model="m"))
        super().__init__(aioredis.Redis(port=stack.free_port()), "exp", client)
        self.judging = asyncio.Event()
        self.calls = 0

    async def judge(self, pair: Pair) -> signals.JudgeSignal | None:
        self.calls += 1
        if self.calls > 1:
            raise JudgedAgain
        self.judging.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RedisConnectionError("connection lost") from None
        return None


async def test_a_judge_consumer_ends_on_a_swallowed_cancel() -> None:
    worker = SwallowingJudge()
    queue: asyncio.Queue[Pair] = asyncio.Queue()
    for rid in ("r1", "r2"):
        queue.put_nowait(Pair(rid, 0, "prompt", "stable", "an answer", "candidate", "another"))
    consumer = asyncio.create_task(worker._consume(queue))
    await worker.judging.wait()
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert worker.calls == 1
    await worker.client.close()
    await worker.redis.aclose()


async def test_a_drain_ends_on_a_cancel_its_look_swallowed() -> None:
    """The evaluator writes each look of a drain to Redis, where redis-py can swallow the cancel
    (``_save_drain`` then suppresses the error): the drain must stop there, not poll Envoy until
    its timeout while the process waits for it at exit."""
    looking = asyncio.Event()

    async def look(_: int | None) -> None:
        looking.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()

    async with aiohttp.ClientSession() as session:
        # No Envoy to ask: every look counts 0 open requests, which would end the drain at once.
        watching = asyncio.create_task(
            drain.watch(session, [], ["c"], Drain(poll_s=0.01), on_look=look)
        )
        await looking.wait()
        watching.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watching
