"""Quality signals as JSON lines: `extproc export --signals` writes them, `extproc analyze
--signals` replays them beside the events, so an A/B decision that rests on judge verdicts,
rubric scores or feedback can be backtested as the live evaluator takes it.

A line is ``{"id": "<stream id>", "signal": {...}}`` (the signal in its wire form,
``extproc.contract.signals``), or the bare signal. ``seen_ms``, when an evaluator could first
read it, is the stream id's time, else the signal's ``time_ms``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import redis.asyncio as aioredis

from extproc.contract import signals
from extproc.telemetry.export import EventLogError

_STREAM_ID = re.compile(r"^(\d+)-\d+$")


@dataclass(frozen=True)
class RecordedSignal:
    """A signal and when an evaluator could first read it: a replay feeds it at that time."""

    seen_ms: int
    signal: signals.Signal


def signal_from_line(line: str, where: str) -> RecordedSignal:
    """One line of a signal log; :class:`EventLogError` naming the line otherwise."""
    try:
        doc: Any = json.loads(line)
    except json.JSONDecodeError as err:
        raise EventLogError(f"{where}: not JSON ({err.msg})") from err
    sid = doc.get("id") if isinstance(doc, dict) and "signal" in doc else None
    body = doc["signal"] if sid is not None else doc
    m = _STREAM_ID.match(sid) if isinstance(sid, str) else None
    if sid is not None and m is None:
        raise EventLogError(f"{where}: id {sid!r} is not a Redis stream id (ms-seq)")
    try:
        sig = signals.parse(json.dumps(body))
    except ValueError as err:
        raise EventLogError(f"{where}: {err}") from err
    return RecordedSignal(int(m.group(1)) if m else sig.time_ms, sig)


def read_signals(path: str | Path) -> list[RecordedSignal]:
    """Every signal of a JSON-lines file, in the order an evaluator could read them."""
    p = Path(path)
    try:
        with p.open(encoding="utf-8") as f:
            out = [
                signal_from_line(line, f"{p} line {n}")
                for n, line in enumerate(f, 1)
                if line.strip()
            ]
    except OSError as err:
        raise EventLogError(f"{p}: cannot read: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise EventLogError(f"{p}: not UTF-8 text ({err.reason})") from err
    return sorted(out, key=lambda s: s.seen_ms)


async def export_signals(r: aioredis.Redis, experiment: str, out: TextIO) -> int:
    """Write the experiment's signal stream as JSON lines; returns how many."""
    n, after = 0, "0-0"
    while True:
        batch = await signals.read(r, experiment, after)
        for entry_id, sig in batch.signals:
            out.write(json.dumps({"id": entry_id, "signal": json.loads(signals.to_json(sig))}))
            out.write("\n")
            n += 1
        if batch.next_id == after:
            return n
        after = batch.next_id
