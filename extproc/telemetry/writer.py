"""Batch telemetry events into Redis off the request path, with bounded buffers.

Request handlers only append to in-memory deques (no I/O, no await); a background task drains
them. While Redis is away the event buffer holds up to ``max_buffer`` events and the capture
buffer up to ``max_capture_bytes`` of captured texts; past either bound the newest are dropped and
counted (what is buffered stays one stretch from the start of the outage, and dropping costs the
request path nothing), so memory stays bounded and user traffic never waits.

Each batch of one experiment is applied by one Lua script: ``XADD`` per event, one ``HINCRBY``
per variant, and the batch's increments of the time-bucketed rollups (``rollup.py``), so the
stream, the exact per-variant counters and the rollups move together. The
script first claims the batch's id (``SET NX`` with a TTL): when a reply is lost (the script
ran, the socket timed out), the retry sends the same batch under the same id and the script does
nothing, so no event is written twice and the counts stay exact. The next batch deletes the id
of the one before, which is known to have landed; the TTL only bounds what a replica that died
leaves behind. All keys of a batch carry the experiment's hash tag, so this works on Redis Cluster
too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from extproc.contract import keys
from extproc.supervise import raise_if_cancelled
from extproc.telemetry import rollup
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
    captures_dropped: int = 0
    redis_ok: bool = True


@dataclass
class _Batch:
    """Events taken from the buffer, written (and retried) under one id until confirmed."""

    events: list[TelemetryEvent]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


# KEYS: stream, counts, this batch's id key, the previous batch's id key (deleted; the same key
# for an experiment's first batch), then one key per rollup bucket the batch touches, then one
# per open-request set it changes.
# ARGV: id TTL (s), stream MAXLEN, the events' field, event count, variant count, retention (s)
# of the open sets, rollup key count, the oldest start (ms) an open request may have, the
# events, the variant and count pairs; then for each rollup key: its number of integer fields
# and of float fields, its retention (s), and those fields as name and increment pairs; then
# for each open set: its number of requests added and removed, the added as score and id pairs,
# the removed.
_APPLY_BATCH = """
if not redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[1]) then return 0 end
if KEYS[4] ~= KEYS[3] then redis.call('DEL', KEYS[4]) end
local n = tonumber(ARGV[4])
local rollups = tonumber(ARGV[7])
local i = 9
for _ = 1, n do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', ARGV[3], ARGV[i])
  i = i + 1
end
for _ = 1, tonumber(ARGV[5]) do
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
  i = i + 2
end
for k = 5, 4 + rollups do
  local ints, floats, ttl = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), ARGV[i + 2]
  i = i + 3
  for _ = 1, ints do
    redis.call('HINCRBY', KEYS[k], ARGV[i], ARGV[i + 1])
    i = i + 2
  end
  for _ = 1, floats do
    redis.call('HINCRBYFLOAT', KEYS[k], ARGV[i], ARGV[i + 1])
    i = i + 2
  end
  redis.call('EXPIRE', KEYS[k], ttl)
end
for k = 5 + rollups, #KEYS do
  local added, removed = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  i = i + 2
  for _ = 1, added do
    redis.call('ZADD', KEYS[k], ARGV[i], ARGV[i + 1])
    i = i + 2
  end
  for _ = 1, removed do
    redis.call('ZREM', KEYS[k], ARGV[i])
    i = i + 1
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', '(' .. ARGV[8])
  redis.call('EXPIRE', KEYS[k], ARGV[6])
end
return n
"""

BATCH_ID_TTL_S = 86_400
"""How long a batch id guards against a duplicate write: longer than any retry can come."""

ROLLUP_RETENTION_S = 30 * 86_400
"""How long a rollup bucket is kept after its last write: longer than any rollout runs."""

MAX_CAPTURE_BYTES = 64 * 1024 * 1024
"""Default bound of the capture buffer: 64 MiB of captured texts while Redis is away (about
2,000 captures at the largest ``capture.max_bytes`` of prompt and answer, far more at typical
sizes)."""


class TelemetryWriter:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        max_buffer: int = 100_000,
        max_capture_bytes: int = MAX_CAPTURE_BYTES,
        batch_size: int = 500,
        flush_interval_s: float = 0.05,
        stream_maxlen: int = 1_000_000,
        rollup_retention_s: int = ROLLUP_RETENTION_S,
        notice_ms: float = 0.0,
    ) -> None:
        self.redis = redis
        self.max_buffer = max_buffer
        self.max_capture_bytes = max_capture_bytes
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.stream_maxlen = stream_maxlen
        self.rollup_retention_s = rollup_retention_s
        # The data plane's in-flight notice age: a request that ended sooner was never noticed,
        # so its end need not be taken out of the open-request sets (0: take every end out).
        self.notice_ms = notice_ms
        # Per experiment, where a sidecar serves several with their own settings.
        self._settings: dict[str, tuple[int, float]] = {}
        self.stats = WriterStats()
        self._buffer: deque[TelemetryEvent] = deque()
        self._pending: _Batch | None = None  # taken from the buffer, outcome not known yet
        self._last_batch: dict[str, str] = {}  # experiment -> id key of its last confirmed batch
        self._captures: deque[Capture] = deque()
        self._capture_bytes = 0
        self._script = redis.register_script(_APPLY_BATCH)
        self._wake = asyncio.Event()

    def configure(self, experiment: str, rollup_retention_s: int, notice_ms: float) -> None:
        """One experiment's retention and notice age, in place of the writer's own."""
        self._settings[experiment] = (rollup_retention_s, notice_ms)

    @property
    def buffered(self) -> int:
        return len(self._buffer) + (0 if self._pending is None else len(self._pending.events))

    @property
    def capture_bytes(self) -> int:
        """Bytes of captured texts waiting for Redis."""
        return self._capture_bytes

    def submit(self, event: TelemetryEvent) -> None:
        """Queue an event; never blocks and never raises (a full buffer drops and counts)."""
        self.stats.submitted += 1
        if self.buffered >= self.max_buffer:
            self.stats.dropped += 1
            return
        self._buffer.append(event)
        if len(self._buffer) >= self.batch_size:
            self._wake.set()

    def submit_capture(self, capture: Capture) -> None:
        """Queue captured texts; past ``max_capture_bytes`` they are dropped and counted."""
        size = _size(capture)
        if self._capture_bytes + size > self.max_capture_bytes:
            self.stats.captures_dropped += 1
            return
        self._captures.append(capture)
        self._capture_bytes += size

    async def _write_captures(self) -> None:
        while self._captures:
            batch = [self._captures.popleft() for _ in range(min(100, len(self._captures)))]
            self._capture_bytes -= sum(_size(c) for c in batch)
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
                self._capture_bytes += sum(_size(c) for c in batch)
                raise

    async def _write(self, batch: _Batch) -> None:
        """Apply a batch, once per experiment in it; safe to call again with the same batch."""
        by_experiment: dict[str, list[TelemetryEvent]] = {}
        for ev in batch.events:
            by_experiment.setdefault(ev.experiment, []).append(ev)
        for name, events in by_experiment.items():
            # Requests refused before routing (no variant) are events but count for no variant.
            counts = Counter(
                ev.variant for ev in events if ev.variant and not ev.shadow and not ev.in_flight
            )
            batch_key = keys.batch(name, batch.id)
            retention_s, notice_ms = self._settings.get(
                name, (self.rollup_retention_s, self.notice_ms)
            )
            rollup_keys, rollup_args = _rollups(name, events, retention_s)
            open_keys, open_args = _open_sets(name, events, notice_ms)
            await self._script(
                keys=[
                    keys.events(name),
                    keys.counts(name),
                    batch_key,
                    self._last_batch.get(name, batch_key),
                    *rollup_keys,
                    *open_keys,
                ],
                args=[
                    BATCH_ID_TTL_S,
                    self.stream_maxlen,
                    keys.EVENT_FIELD,
                    len(events),
                    len(counts),
                    retention_s,
                    len(rollup_keys),
                    int(time.time() * 1000) - rollup.OPEN_FOR_AT_MOST_MS,
                    *(ev.SerializeToString() for ev in events),
                    *(x for variant, n in counts.items() for x in (variant, n)),
                    *rollup_args,
                    *open_args,
                ],
            )
            self._last_batch[name] = batch_key

    async def flush(self) -> None:
        """Write everything buffered now; on failure keep it buffered and re-raise.

        A batch whose outcome is unknown (the reply was lost) stays pending and is retried,
        whole and under the same id, before anything else: the script applies it at most once.
        """
        await self._write_captures()
        while self._pending is not None or self._buffer:
            if self._pending is None:
                n = min(self.batch_size, len(self._buffer))
                self._pending = _Batch([self._buffer.popleft() for _ in range(n)])
            await self._write(self._pending)
            self.stats.written += len(self._pending.events)
            self._pending = None

    async def run(self) -> None:
        """Drain the buffer until cancelled; on cancel, one last flush attempt."""
        backoff = 0.1
        try:
            while True:
                raise_if_cancelled()
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
            if self.buffered:
                try:
                    await asyncio.wait_for(self.flush(), 2.0)
                except (RedisError, OSError, TimeoutError):
                    log.warning("telemetry: %d events lost at shutdown", self.buffered)


def _rollups(
    experiment: str, events: list[TelemetryEvent], retention_s: int
) -> tuple[list[str], list[str | int | float]]:
    """The rollup keys a batch adds to, and the script's arguments for them: fine buckets are
    kept at most ``rollup.FINE_KEPT_S`` (a chart of hours reads coarse ones), coarse ones for the
    retention."""
    names: list[str] = []
    args: list[str | int | float] = []
    fine = rollup.buckets(events, rollup.FINE_S)
    for width, tallied in (
        (rollup.FINE_S, fine),
        (rollup.COARSE_S, rollup.coarser(fine, rollup.COARSE_S)),
    ):
        ttl = min(retention_s, rollup.FINE_KEPT_S) if width == rollup.FINE_S else retention_s
        for start, (ints, floats) in rollup.fields_of(tallied).items():
            names.append(keys.rollup(experiment, width, start))
            args += [len(ints), len(floats), ttl]
            for k, v in ints.items():
                args += [k, v]
            for k, f in floats.items():
                args += [k, repr(f)]
    return names, args


def _open_sets(
    experiment: str, events: list[TelemetryEvent], notice_ms: float
) -> tuple[list[str], list[str | int]]:
    """The open-request sets a batch changes, and the script's arguments for them."""
    names: list[str] = []
    args: list[str | int] = []
    for (kind, variant), (added, removed) in rollup.open_changes(events, notice_ms).items():
        names.append(keys.open_requests(experiment, kind, variant))
        args += [len(added), len(removed)]
        for start_ms, rid in added:
            args += [start_ms, rid]
        args += removed
    return names, args


def _size(capture: Capture) -> int:
    """What a buffered capture costs, near enough: its texts (JSON, ASCII) and its id."""
    return len(capture.doc) + len(capture.request_id) + len(capture.experiment)
