"""Reading telemetry events back from an experiment's Redis stream.

The evaluator, the export and the operator surfaces all read the same stream; a malformed entry
(another writer, a schema from the future) is skipped rather than stopping any of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError

from extproc.contract import keys
from extproc.telemetry.v1.event_pb2 import TelemetryEvent


def decode_event(fields: Mapping[Any, Any] | None) -> TelemetryEvent | None:
    """A stream entry's event, or None for an entry that is not one (never raises)."""
    ev = TelemetryEvent()
    raw = (fields or {}).get(keys.EVENT_FIELD)
    if not isinstance(raw, bytes):
        return None
    try:
        ev.ParseFromString(raw)
    except DecodeError:
        return None
    return ev


async def recent_events(r: aioredis.Redis, experiment: str, count: int) -> list[TelemetryEvent]:
    """The newest ``count`` events, oldest first."""
    entries = await r.xrevrange(keys.events(experiment), count=count) or []
    events = (decode_event(fields) for _id, fields in reversed(entries))
    return [ev for ev in events if ev is not None]
