"""Per-variant time series for the dashboard's charts, derived from the event stream.

Why derived from events rather than sampled from `extproc status` every few seconds: the stream
already holds every request with its start time, so the curves exist the moment the page opens
(no warm-up, nothing lost when the dashboard restarts), every dashboard replica draws the same
curves, and the dashboard writes nothing to Redis. A sampled status figure would also blur time:
each sample summarises the newest 20,000 events, so a latency spike would linger in the curve for
as long as it stays in that window.

The series cover the same events as `extproc status` (the newest ``window`` of the stream), by
default all of them, cut into buckets by request start, and each bucket is summarised by
:func:`extproc.ops.status.summarise`: a point means exactly what the status figure of the same name
means, over one bucket instead of the whole window, and the buckets add up to the status totals.
The default step gives about ``TARGET_BUCKETS`` points whether the window holds a minute of a
busy service or a day of a quiet one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from extproc.contract.signals import FeedbackSignal, JudgeSignal, Signal, WatchdogSignal
from extproc.ops.figures import Figure, flatten
from extproc.ops.status import ended_requests, summarise
from extproc.telemetry.outcome import TokenPrice
from extproc.telemetry.v1.event_pb2 import TelemetryEvent

TARGET_BUCKETS = 60
MAX_BUCKETS = 360
MIN_SPAN_S = 60.0
NICE_STEPS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200)

Columns = dict[str, dict[str, list[Figure]]]


def _columns(rows: list[dict[str, dict[str, Figure]]]) -> Columns:
    """Per bucket {variant: {key: value}} into {variant: {key: [value per bucket]}}."""
    keys: dict[str, dict[str, None]] = {}
    for row in rows:
        for variant, figures in row.items():
            keys.setdefault(variant, {}).update(dict.fromkeys(figures))
    return {
        variant: {k: [row.get(variant, {}).get(k) for row in rows] for k in names}
        for variant, names in keys.items()
    }


def quality_rows(
    signals: Sequence[Signal], events: Sequence[TelemetryEvent], step_ms: int
) -> dict[int, dict[str, dict[str, Figure]]]:
    """Per bucket and variant: the judge's win rate among decisive verdicts, the number of
    negative feedback posts (down, retry, escalation) and the watchdog's failure rate.

    Feedback is attributed as the evaluator does, through the request or conversation of an
    event in the window; feedback on requests older than the window is left out.
    """
    by_request = {ev.request_id: ev.variant for ev in events if ev.request_id and not ev.shadow}
    by_key = {ev.key_hash: ev.variant for ev in events if ev.key_hash and not ev.shadow}
    tally: dict[int, dict[str, dict[str, int]]] = {}

    def count(bucket_ms: int, variant: str, name: str) -> None:
        cell = tally.setdefault(bucket_ms // step_ms, {}).setdefault(variant, {})
        cell[name] = cell.get(name, 0) + 1

    for sig in signals:
        if isinstance(sig, JudgeSignal) and sig.winner != "tie":
            winner, loser = (
                (sig.primary, sig.shadow) if sig.winner == "primary" else (sig.shadow, sig.primary)
            )
            count(sig.time_ms, winner, "wins")
            count(sig.time_ms, loser, "losses")
        elif isinstance(sig, FeedbackSignal) and sig.value != "up":
            variant = (sig.request_id and by_request.get(sig.request_id)) or (
                sig.key_hash and by_key.get(sig.key_hash)
            )
            if variant:
                count(sig.time_ms, variant, "negative")
        elif isinstance(sig, WatchdogSignal):
            count(sig.time_ms, sig.variant, "probes")
            if not sig.passed:
                count(sig.time_ms, sig.variant, "failed")
    out: dict[int, dict[str, dict[str, Figure]]] = {}
    for bucket, per_variant in tally.items():
        for variant, c in per_variant.items():
            figures: dict[str, Figure] = {}
            decided = c.get("wins", 0) + c.get("losses", 0)
            if decided:
                figures["judge_win_rate"] = round(c.get("wins", 0) / decided, 4)
            if c.get("negative"):
                figures["feedback_negative"] = c["negative"]
            if c.get("probes"):
                figures["watchdog_fail_rate"] = round(c.get("failed", 0) / c["probes"], 4)
            out.setdefault(bucket, {})[variant] = figures
    return out


def bucket_step(span_s: float, step_s: float | None = None) -> float:
    """The step used: a round one giving about ``TARGET_BUCKETS`` points unless one is asked
    for, and never more than ``MAX_BUCKETS`` steps per span."""
    if step_s is None:
        wanted = span_s / TARGET_BUCKETS
        step_s = next((s for s in NICE_STEPS_S if s >= wanted), 86_400 * math.ceil(wanted / 86_400))
    return max(step_s, span_s / MAX_BUCKETS)


def series(
    events: list[TelemetryEvent],
    variants: list[str],
    now_s: float,
    *,
    span_s: float | None = None,
    step_s: float | None = None,
    shadow_variant: str | None = None,
    signals: Sequence[Signal] = (),
    prices: Mapping[str, TokenPrice] | None = None,
) -> dict[str, Any]:
    """Every bucket from ``span_s`` ago (default: the oldest event's start, at least a minute)
    until now, empty ones too so gaps show, with each variant's figures.

    ``t`` holds the buckets' start times (seconds since the epoch), aligned to multiples of the
    step; ``variants`` and ``shadow`` map a variant to columns aligned with ``t``. ``shadow``
    summarises the mirrored copies, as the ``shadow`` part of `extproc status` does. Quality
    signals add ``judge_win_rate``, ``feedback_negative`` and ``watchdog_fail_rate`` columns
    (see :func:`quality_rows`), only when there are any.
    """
    if span_s is None:
        oldest = min((ev.time_unix_ms / 1000 for ev in events), default=now_s)
        span_s = max(now_s - oldest, MIN_SPAN_S)
    step_ms = round(1000 * bucket_step(span_s, step_s))
    now_ms = int(now_s * 1000)
    first, last = (now_ms - int(span_s * 1000)) // step_ms, now_ms // step_ms
    buckets: dict[int, list[TelemetryEvent]] = {b: [] for b in range(first, last + 1)}
    for ev in events:
        bucket = buckets.get(ev.time_unix_ms // step_ms)
        if bucket is not None:
            bucket.append(ev)
    quality = quality_rows(signals, events, step_ms)
    ended = ended_requests(events)
    live, mirrored = [], []
    for b, evs in buckets.items():
        per_variant = summarise(evs, variants, prices=prices, ended=ended)
        row = {v: flatten(f) for v, f in per_variant.items()}
        for v, figures in quality.get(b, {}).items():
            row.setdefault(v, {}).update(figures)
        live.append(row)
        if shadow_variant:
            figs = summarise(evs, [shadow_variant], kind="shadow", prices=prices, ended=ended)
            mirrored.append({v: flatten(f) for v, f in figs.items()})
    return {
        "step_s": step_ms / 1000,
        "span_s": span_s,
        "t": [b * step_ms / 1000 for b in buckets],
        "variants": _columns(live),
        "shadow": _columns(mirrored),
    }
