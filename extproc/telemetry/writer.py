"""Batch telemetry events into Redis off the request path, with a bounded buffer.

Request handlers only append to an in-memory deque (no I/O, no await); a background task drains
it in pipelined transactions. While Redis is away the buffer holds up to ``max_buffer`` events and
later events are dropped and counted, so memory stays bounded and user traffic never waits.

Each flush is one MULTI/EXEC per experiment (``XADD`` per event and one ``HINCRBY`` per variant),
so the stream and the exact per-variant counters move together. If a connection breaks after Redis
ran EXEC but before the reply arrived, the retry writes that batch twice; readers that need exact
figures de-duplicate by ``request_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from extproc import keys
from extproc.telemetry.v1.event_pb2 import TelemetryEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Capture:
    """One side (primary or shadow) of a captured request, stored under its request id."""

    experiment: str
    request_id: str
    role: str
    doc: str  # JSON
    ttl_s: int
    max_pairs: int
    time: float


@dataclass
class WriterStats:
    submitted: int = 0
    written: int = 0
    dropped: int = 0
    redis_ok: bool = True


class TelemetryWriter:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        max_buffer: int = 100_000,
        batch_size: int = 500,
        flush_interval_s: float = 0.05,
        stream_maxlen: int = 1_000_000,
    ) -> None:
        self.redis = redis
        self.max_buffer = max_buffer
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.stream_maxlen = stream_maxlen
        self.stats = WriterStats()
        self._buffer: deque[TelemetryEvent] = deque()
        self._captures: deque[Capture] = deque(maxlen=max(1, max_buffer // 10))
        self._wake = asyncio.Event()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def submit(self, event: TelemetryEvent) -> None:
        """Queue an event; never blocks and never raises (a full buffer drops and counts)."""
        self.stats.submitted += 1
        if len(self._buffer) >= self.max_buffer:
            self.stats.dropped += 1
            return
        self._buffer.append(event)
        if len(self._buffer) >= self.batch_size:
            self._wake.set()

    def submit_capture(self, capture: Capture) -> None:
        """Queue captured texts; the oldest are dropped first when Redis is away for long."""
        self._captures.append(capture)

    async def _write_captures(self) -> None:
        while self._captures:
            batch = [self._captures.popleft() for _ in range(min(100, len(self._captures)))]
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for c in batch:
                        key = keys.pair(c.experiment, c.request_id)
                        pipe.hset(key, c.role, c.doc)
                        pipe.expire(key, c.ttl_s)
                        index = keys.pairs(c.experiment)
                        pipe.zadd(index, {c.request_id: c.time})
                        pipe.zremrangebyrank(index, 0, -c.max_pairs - 1)
                    await pipe.execute()
            except BaseException:
                self._captures.extendleft(reversed(batch))
                raise

    async def _write(self, batch: list[TelemetryEvent]) -> None:
        by_experiment: dict[str, list[TelemetryEvent]] = {}
        for ev in batch:
            by_experiment.setdefault(ev.experiment, []).append(ev)
        for name, events in by_experiment.items():
            stream = keys.events(name)
            async with self.redis.pipeline(transaction=True) as pipe:
                for ev in events:
                    pipe.xadd(
                        stream,
                        {keys.EVENT_FIELD: ev.SerializeToString()},
                        maxlen=self.stream_maxlen,
                        approximate=True,
                    )
                # Requests refused before routing (no variant) are events but count for no variant.
                counts = Counter(ev.variant for ev in events if ev.variant and not ev.shadow)
                for variant, n in counts.items():
                    pipe.hincrby(keys.counts(name), variant, n)
                await pipe.execute()

    async def flush(self) -> None:
        """Write everything buffered now; on failure keep it buffered and re-raise."""
        await self._write_captures()
        while self._buffer:
            n = min(self.batch_size, len(self._buffer))
            batch = [self._buffer.popleft() for _ in range(n)]
            try:
                await self._write(batch)
            except BaseException:
                self._buffer.extendleft(reversed(batch))
                raise
            self.stats.written += n

    async def run(self) -> None:
        """Drain the buffer until cancelled; on cancel, one last flush attempt."""
        backoff = 0.1
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
                self._wake.clear()
                try:
                    await self.flush()
                except (RedisError, OSError) as err:
                    if self.stats.redis_ok:
                        log.warning("telemetry: redis unreachable, buffering: %s", err)
                    self.stats.redis_ok = False
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                if not self.stats.redis_ok:
                    log.info("telemetry: redis back, buffer drained")
                self.stats.redis_ok = True
                backoff = 0.1
        finally:
            if self._buffer:
                try:
                    await asyncio.wait_for(self.flush(), 2.0)
                except (RedisError, OSError, TimeoutError):
                    log.warning("telemetry: %d events lost at shutdown", len(self._buffer))
