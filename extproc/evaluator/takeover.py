"""Window snapshots in Redis: written by the active evaluator, loaded by the one taking over.

The format and its checks are ``snapshot.py``'s; this module decides when to write (policy),
keeps the write off the evaluator's loop, fences it by the lease and loads a snapshot back.

When: every ``interval_s`` seconds, or sooner once ``every_events`` events were read since the
last one, and only if the window moved since (new events or signals, or a new stage). The tail a
new leader still reads is therefore at most ``interval_s`` of traffic (and at most
``every_events`` events) plus the time one write takes.

Off the loop: the loop only freezes the window (``snapshot.freeze``: copies of what changes in
place, lengths of what only grows); packing, checksums, optional zlib and the Redis write run in
a background task and a thread, one snapshot at a time (one due while the last is still being
written waits for the next look). The write replaces the hash in one ``MULTI`` under ``WATCH``
of the lease, so an evaluator that lost the lease meanwhile writes nothing.

Bounds: Redis holds one snapshot per experiment (the hash is replaced whole, with a TTL of
``ttl_s``); one larger than ``max_bytes`` after compression is not written (the takeover then
reads the whole stage, as without snapshots). While a snapshot is written, the evaluator holds
one more copy of the window's bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError, WatchError

from extproc.contract import keys
from extproc.evaluator.snapshot import (
    Frozen,
    Identity,
    Restored,
    SnapshotError,
    decode,
    encode,
    freeze,
    restore,
)
from extproc.evaluator.window import StageWindow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SnapshotPolicy:
    """When and how the active evaluator writes its window; ``interval_s`` 0 turns it off."""

    interval_s: float = 10.0
    every_events: int = 100_000
    level: int = 0  # zlib level of the parts that shrink by a tenth or more; 0: no compression
    max_bytes: int = 512 * 2**20
    ttl_s: int = 3600


async def write(
    r: aioredis.Redis, experiment: str, instance: str, hash_fields: dict[bytes, bytes], ttl_s: int
) -> bool:
    """Replace the experiment's snapshot with ``hash_fields`` if ``instance`` still holds the
    lease; False (nothing written) if it does not."""
    lease = keys.lease(experiment)
    key = keys.snapshot(experiment)
    async with r.pipeline(transaction=True) as pipe:
        try:
            await pipe.watch(lease)
            holder = await pipe.get(lease)
            if holder is None or _text(holder) != instance:
                return False
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.delete(key)
            pipe.hset(key, mapping=hash_fields)  # type: ignore[arg-type]
            pipe.expire(key, ttl_s)
            await pipe.execute()
        except WatchError:
            return False
    return True


async def load(
    r: aioredis.Redis, experiment: str, identity: Identity, fresh: StageWindow
) -> Restored:
    """The window of ``identity``'s stage from the experiment's snapshot, built into ``fresh``;
    raises SnapshotError (why) if there is none or it cannot be used."""
    stored = await r.hgetall(keys.snapshot(experiment))
    if not stored:
        raise SnapshotError("none written (or it expired)")
    hash_fields = {k: v for k, v in stored.items() if isinstance(k, bytes) and isinstance(v, bytes)}
    return restore(decode(hash_fields), identity, fresh)


class SnapshotWriter:
    """The active evaluator's snapshot schedule and its one background write.

    ``clock`` (monotonic seconds) is injectable so tests decide when a snapshot is due.
    """

    def __init__(
        self,
        r: aioredis.Redis,
        experiment: str,
        instance: str,
        policy: SnapshotPolicy,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = r
        self.experiment = experiment
        self.instance = instance
        self.policy = policy
        self.clock = clock
        self.written = 0  # snapshots written by this evaluator
        self._last_at = clock()
        self._last_position: tuple[Identity, str, str] | None = None
        self._events = 0
        self._task: asyncio.Task[None] | None = None
        self._too_big: Identity | None = None

    def read(self, events: int) -> None:
        """Count events read into the window since the last snapshot."""
        self._events += events

    def due(self, identity: Identity, events_seen: str, signals_seen: str) -> bool:
        p = self.policy
        if p.interval_s <= 0 or (self._task is not None and not self._task.done()):
            return False
        if self._last_position == (identity, events_seen, signals_seen):
            return False
        return self.clock() - self._last_at >= p.interval_s or self._events >= p.every_events

    def start(
        self,
        window: StageWindow,
        identity: Identity,
        events_seen: str,
        signals_seen: str,
    ) -> None:
        """Take ``window``'s state now (on the loop); pack and write it in the background."""
        frozen = freeze(window, identity, events_seen, signals_seen, int(time.time() * 1000))
        self._last_at = self.clock()
        self._last_position = (identity, events_seen, signals_seen)
        self._events = 0
        self._task = asyncio.create_task(self._write(frozen, identity))
        self._task.add_done_callback(_report_failure)

    async def wait(self) -> None:
        """Until the write in progress (if any) is done."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _write(self, frozen: Frozen, identity: Identity) -> None:
        hash_fields = await asyncio.to_thread(_pack, frozen, self.policy.level)
        size = sum(len(v) for v in hash_fields.values())
        if size > self.policy.max_bytes:
            if self._too_big != identity:
                self._too_big = identity
                log.warning(
                    "window snapshot of %s not written: %d bytes > max %d (a takeover reads the "
                    "whole stage)",
                    self.experiment,
                    size,
                    self.policy.max_bytes,
                )
            return
        try:
            written = await write(
                self.redis, self.experiment, self.instance, hash_fields, self.policy.ttl_s
            )
        except (RedisError, OSError) as err:
            log.warning("window snapshot of %s not written: %s", self.experiment, err)
            return
        self.written += written


def _text(v: bytes | str) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else v


def _pack(frozen: Frozen, level: int) -> dict[bytes, bytes]:
    return encode(frozen.pack(), level)


def _report_failure(task: asyncio.Task[None]) -> None:
    """A bug in a background write is logged with its traceback, not lost with the task (the
    loop goes on: the next snapshot is tried, and a takeover falls back to the full read)."""
    if not task.cancelled() and (err := task.exception()) is not None:
        log.error("window snapshot write failed", exc_info=err)
