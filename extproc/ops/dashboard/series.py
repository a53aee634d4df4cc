"""Per-variant time series for the dashboard's charts, read from the telemetry rollups.

Why rollups rather than samples of `extproc status` taken every few seconds: the writer already
adds every request into 10 s and 5 min buckets by its start time (:mod:`extproc.telemetry.rollup`),
so the curves exist the moment the page opens (no warm-up, nothing lost when the dashboard
restarts), every dashboard replica draws the same curves, the dashboard writes nothing to Redis,
and a chart can span a whole rollout of hours for the cost of a few dozen hashes.

Each point is a step of the chart (a multiple of the rollups' 10 s, or of 5 min once the step
allows), summarised by :func:`extproc.ops.status.figures_of`: a point means exactly what the
status figure of the same name means, over one step instead of the status window, and counts add
up across points. The default step gives about ``TARGET_BUCKETS`` points whether the span is five
minutes or a day.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from extproc.config import Price
from extproc.contract.signals import FeedbackSignal, JudgeSignal, Signal, WatchdogSignal
from extproc.ops.figures import Figure, flatten
from extproc.ops.status import figures_of
from extproc.telemetry import rollup

TARGET_BUCKETS = 60
MAX_BUCKETS = 360
MIN_SPAN_S = 60.0
# No step between a minute and five: a two-hour chart of 10 s buckets would read 720 hashes.
NICE_STEPS_S = (10, 30, 60, 300, 600, 900, 1800, 3600, 7200, 21600, 43200)

Columns = dict[str, dict[str, list[Figure]]]
Attribution = tuple[Mapping[str, str], Mapping[str, str]]
"""Which variant answered: by request id, and by conversation (key hash)."""


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
    signals: Sequence[Signal], attribution: Attribution, step_ms: int
) -> dict[int, dict[str, dict[str, Figure]]]:
    """Per bucket and variant: the judge's win rate among decisive verdicts, the number of
    negative feedback posts (down, retry, escalation) and the watchdog's failure rate.

    Feedback is attributed as the evaluator does, through the request or conversation it names
    (``attribution``); feedback on a request the attribution does not know is left out.
    """
    by_request, by_key = attribution
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


def bucket_step(span_s: float, step_s: float | None = None) -> int:
    """The step used, whole multiples of the rollups' 10 s: a round one giving about
    ``TARGET_BUCKETS`` points unless one is asked for, never more than ``MAX_BUCKETS`` per span."""
    if step_s is None:
        wanted = span_s / TARGET_BUCKETS
        step_s = next((s for s in NICE_STEPS_S if s >= wanted), 86_400 * math.ceil(wanted / 86_400))
    step = max(step_s, span_s / MAX_BUCKETS)
    return rollup.FINE_S * math.ceil(step / rollup.FINE_S)


def width_for(step_s: int) -> int:
    """The rollup width a step is read at: the coarse one when it divides the step."""
    return rollup.COARSE_S if step_s % rollup.COARSE_S == 0 else rollup.FINE_S


def series(
    buckets: Sequence[tuple[int, rollup.Bucket]],
    variants: list[str],
    *,
    since_s: int,
    until_s: int,
    step_s: int,
    shadow_variant: str | None = None,
    signals: Sequence[Signal] = (),
    attribution: Attribution = ({}, {}),
    prices: Mapping[str, Price] | None = None,
) -> dict[str, Any]:
    """Every step from ``since_s`` until ``until_s`` (both multiples of ``step_s``), empty
    ones too so gaps show, with each variant's figures, from rollup ``buckets`` of a width that
    divides the step.

    ``t`` holds the steps' start times (seconds since the epoch); ``variants`` and ``shadow`` map
    a variant to columns aligned with ``t``. ``shadow`` summarises the mirrored copies, as the
    ``shadow`` part of `extproc status` does. Quality signals add ``judge_win_rate``,
    ``feedback_negative`` and ``watchdog_fail_rate`` columns (see :func:`quality_rows`), only
    when there are any.
    """
    prices = prices or {}
    steps: dict[int, rollup.Bucket] = {s: rollup.Bucket() for s in range(since_s, until_s, step_s)}
    for start, bucket in buckets:
        at = start - start % step_s
        if at in steps:
            steps[at].merge(bucket)
    quality = quality_rows(signals, attribution, step_s * 1000)
    live, mirrored = [], []
    for start, span in steps.items():
        row = {v: _points(f) for v, f in figures_of(span, "assigned", variants, prices).items()}
        for v, figures in quality.get(start // step_s, {}).items():
            row.setdefault(v, {}).update(figures)
        live.append(row)
        if shadow_variant:
            figs = figures_of(span, "shadow", [shadow_variant], prices)
            mirrored.append({v: _points(f) for v, f in figs.items()})
    return {
        "step_s": step_s,
        "span_s": until_s - since_s,
        "t": list(steps),
        "variants": _columns(live),
        "shadow": _columns(mirrored),
    }


def _points(figures: Mapping[str, Any]) -> dict[str, Figure]:
    """A step's figures as chart columns: requests still open are a figure of now, not of a
    step, and are left out."""
    return {k: v for k, v in flatten(figures).items() if k != "open_requests"}
