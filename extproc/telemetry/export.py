"""Telemetry events as JSON lines: `extproc export` writes them, `extproc analyze` reads them.

Why JSON lines and not the protobuf stream: a recorded log is for people and tools outside the
project too (jq, pandas, a notebook), it must survive schema additions, and one event per line
streams and concatenates. The format is the protobuf JSON mapping of ``TelemetryEvent`` with the
proto field names and enum names, plus the Redis stream id, with two deliberate choices (both are
still read by ``json_format.Parse``):

* 64-bit integers (``time_unix_ms``, ``response_bytes``) are JSON numbers, not strings;
* every field without presence is written, even at its default (``"error":
  "ERROR_CLASS_NONE"``, ``"shadow": false``), so that **a field absent from a line is unknown**:
  only the ``optional`` fields of the schema (timings, token counts, quality signals) can be
  absent, and absent means the sidecar could not know, never zero.

The schema, field by field, is in docs/EVALUATOR.md.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import redis.asyncio as aioredis
from google.protobuf import json_format

from extproc.contract import keys
from extproc.telemetry.events import decode_event
from extproc.telemetry.v1.event_pb2 import TelemetryEvent

STREAM_ID = "stream_id"
_STREAM_ID_RE = re.compile(r"^(\d+)-(\d+)$")
_BATCH = 5000
_FIELD_NAMES = frozenset(n for f in TelemetryEvent.DESCRIPTOR.fields for n in (f.name, f.json_name))


class EventLogError(ValueError):
    """A recorded event log (or an export option) that cannot be used: bad input, exit code 2."""


@dataclass(frozen=True)
class RecordedEvent:
    """One event of a log, and when an evaluator could first have read it.

    ``seen_ms`` is the millisecond part of the Redis stream id when the log has one (the sidecar
    appends an event when its request ends), else the end of the request (start plus duration),
    else its start: the virtual clock of a replay.
    """

    event: TelemetryEvent
    seen_ms: int
    stream_id: str | None = None


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def event_to_dict(ev: TelemetryEvent, stream_id: str | None = None) -> dict[str, Any]:
    """One line of the export (see the module docstring for the two deviations from proto JSON)."""
    doc: dict[str, Any] = json_format.MessageToDict(
        ev,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )
    if stream_id is not None:
        doc[STREAM_ID] = stream_id
    return doc


def seen_ms(ev: TelemetryEvent, stream_id: str | None) -> int:
    """When the event became visible to an evaluator (see :class:`RecordedEvent`)."""
    if stream_id is not None:
        m = _STREAM_ID_RE.match(stream_id)
        if m:
            return int(m.group(1))
    end = ev.time_unix_ms
    if ev.in_flight:  # a notice carries the time it was sent
        return end
    if ev.HasField("duration_ms") and math.isfinite(ev.duration_ms) and ev.duration_ms > 0:
        end += math.ceil(ev.duration_ms)
    return end


def event_from_dict(doc: Any, where: str = "event") -> RecordedEvent:
    """Parse one exported line; unknown fields are skipped so newer logs stay readable."""
    if not isinstance(doc, dict):
        raise EventLogError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    body = dict(doc)
    sid = body.pop(STREAM_ID, None)
    if sid is not None and (not isinstance(sid, str) or not _STREAM_ID_RE.match(sid)):
        raise EventLogError(f"{where}: {STREAM_ID} {sid!r} is not a Redis stream id (ms-seq)")
    ev = TelemetryEvent()
    # Fields this reader does not know (a newer exporter) are skipped; values are still checked
    # strictly, so a misspelt enum name is an error rather than a silent "no error".
    known = {k: v for k, v in body.items() if k in _FIELD_NAMES}
    try:
        json_format.ParseDict(known, ev)
    except json_format.ParseError as err:
        raise EventLogError(f"{where}: {err}") from err
    if ev.time_unix_ms <= 0:
        raise EventLogError(f"{where}: time_unix_ms is missing (milliseconds since the epoch)")
    return RecordedEvent(ev, seen_ms(ev, sid), sid)


def iter_jsonl(lines: Iterable[str], source: str) -> Iterator[RecordedEvent]:
    """Events of a JSON-lines log; blank lines are skipped, anything else must be an event."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as err:
            raise EventLogError(f"{source} line {n}: not JSON ({err.msg})") from err
        yield event_from_dict(doc, f"{source} line {n}")


def read_jsonl(path: str | Path) -> list[RecordedEvent]:
    """Every event of a JSON-lines file, with a clear message for an unreadable one."""
    p = Path(path)
    try:
        with p.open(encoding="utf-8") as f:
            return list(iter_jsonl(f, str(p)))
    except OSError as err:
        raise EventLogError(f"{p}: cannot read: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise EventLogError(f"{p}: not UTF-8 text ({err.reason})") from err


def parse_since(text: str) -> int:
    """``--since``: milliseconds since the epoch, or an ISO 8601 time (naive = UTC)."""
    t = text.strip()
    if t.isdigit():
        return int(t)
    try:
        when = datetime.fromisoformat(t)
    except ValueError as err:
        raise EventLogError(
            f"--since {text!r}: expected milliseconds since the epoch or an ISO 8601 time "
            "(e.g. 2026-11-03T10:00:00Z)"
        ) from err
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


async def stream_events(
    r: aioredis.Redis, experiment: str, since_ms: int | None = None, count: int | None = None
) -> AsyncIterator[tuple[str, TelemetryEvent]]:
    """(stream id, event) pairs, oldest first, read in batches.

    With ``since_ms``, the first ``count`` events from that time on; without it, the newest
    ``count`` (all when ``count`` is None). Entries that are not events are skipped.
    """
    name = keys.events(experiment)
    if since_ms is None and count is not None:
        newest: list[tuple[str, TelemetryEvent]] = []
        high = "+"
        while len(newest) < count:
            entries = await r.xrevrange(name, max=high, count=min(_BATCH, count)) or []
            for entry_id, fields in entries:
                ev = decode_event(fields)
                if ev is not None and len(newest) < count:
                    newest.append((_text(entry_id), ev))
            if len(entries) < min(_BATCH, count):
                break
            high = f"({_text(entries[-1][0])}"
        for item in reversed(newest):
            yield item
        return
    low = f"{since_ms}-0" if since_ms is not None else "-"
    left = count
    while left is None or left > 0:
        batch = _BATCH if left is None else min(_BATCH, left)
        entries = await r.xrange(name, min=low, count=batch) or []
        for entry_id, fields in entries:
            ev = decode_event(fields)
            if ev is not None and (left is None or left > 0):
                yield _text(entry_id), ev
                left = None if left is None else left - 1
        if len(entries) < batch:
            return
        low = f"({_text(entries[-1][0])}"


async def export(
    r: aioredis.Redis,
    experiment: str,
    out: TextIO,
    since_ms: int | None = None,
    count: int | None = None,
) -> int:
    """Write the experiment's events to ``out`` as JSON lines; returns how many."""
    n = 0
    async for entry_id, ev in stream_events(r, experiment, since_ms, count):
        out.write(json.dumps(event_to_dict(ev, entry_id), separators=(",", ":")) + "\n")
        n += 1
    return n
