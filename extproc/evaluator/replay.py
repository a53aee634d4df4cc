"""Offline replay (`extproc analyze`): the evaluator's decisions over a recorded event log.

Why: guardrails are only worth what they would have done. Replaying last week's traffic through
the *same* judge and the *same* transitions as the live evaluator (``machine.py``) answers "would
these guardrails have fired on that traffic, and when?" before they guard a real rollout.

How: virtual time starts at the first request in the log with a fresh rollout at stage 0; every
``cadence_s`` of virtual time is a checkpoint, as the live evaluator ticks. At a checkpoint the
window receives every event an evaluator could have read by then (stream id time, see
``extproc.telemetry.export.RecordedEvent``), is judged, and the transition is applied: an
advance starts a new stage window, a rollback or completion ends the replay.

What it cannot do: re-route. The split in the log is whatever it was when it was recorded, not
the one the replayed schedule would have set, so

* by default (``split="schedule"``) the judge is given the schedule's weights, as the live
  evaluator is given the routing's: the sequential sample-ratio check then holds a stage whose
  recorded split is off its weight, as it would have live. That is the question for a log of a
  rollout recorded under this schedule. For a log recorded at some other split, the check would
  hold every stage; ``split="observed"`` judges under the split observed in each stage window
  instead (over the variants the schedule has live), and the sample-ratio check cannot fire;
* a stage's candidate sample size is what the log had in that stretch of time, not what the
  stage's share would have produced: a log recorded at a 5% split replays every stage at 5%;
* after a replayed rollback the recording still has candidate traffic; the replay stops there;
* no operator is there to promote: a stage behind a manual gate (``gate: manual``, or
  ``auto_advance: false``) holds the replay unless ``promote_when_ready`` plays an operator who
  promotes at the first checkpoint the stage is ready (``Verdict.awaiting_promote``).

Events are fed in the order an evaluator could have read them, and each checkpoint looks at the
open requests with the replay's clock (``StageWindow.look`` in ``machine.evaluate``): a request
the log has an in-flight notice for is counted as hung at the first checkpoint past its crossing
time, as live, not when its final event arrives.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from extproc.config import ExperimentSpec
from extproc.evaluator import machine
from extproc.evaluator.decision import render as render_decision
from extproc.evaluator.guardrails import Verdict
from extproc.evaluator.signal_log import RecordedSignal
from extproc.evaluator.window import StageWindow
from extproc.telemetry.export import EventLogError, RecordedEvent
from extproc.telemetry.outcome import started_ms

Split = Literal["schedule", "observed"]

_UNOBSERVED = 1e-6  # weight of a live candidate with no traffic yet: judged, waiting, no SRM


@dataclass(frozen=True)
class Point:
    """One row of the trajectory: a decision (or, on request, any checkpoint).

    ``stage`` is the index after the action (0-based, as in the audit log); ``weights`` the
    split the evaluator would have set; ``observed`` the split of assignment units in the
    window that was judged (percent); ``snapshot`` that window's per-variant figures.
    """

    time_ms: int
    elapsed_s: float
    stage: int
    status: str
    weights: dict[str, float]
    action: str
    reasons: list[str]
    observed: dict[str, float]
    checks: list[dict[str, Any]]
    snapshot: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"time": iso_time(self.time_ms), **asdict(self)}


@dataclass
class GuardrailRecord:
    """How one guardrail of one candidate fared over the replay."""

    variant: str
    metric: str
    action: str
    checked: int = 0  # checkpoints where it could judge (pass or fail)
    failed: int = 0
    first_fail_ms: int | None = None
    first_fail_stage: int | None = None
    first_detail: str = ""


@dataclass
class ReplayResult:
    experiment: str
    cadence_s: float
    events: int
    start_ms: int
    end_ms: int
    checkpoints: int = 0
    status: str = "running"
    stage: int = 0
    weights: dict[str, float] = field(default_factory=dict)
    trajectory: list[Point] = field(default_factory=list)
    guardrails: list[GuardrailRecord] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)  # an A/B run's end

    def to_json(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "cadence_s": self.cadence_s,
            "events": self.events,
            "start": iso_time(self.start_ms),
            "end": iso_time(self.end_ms),
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
            "checkpoints": self.checkpoints,
            "final": {"status": self.status, "stage": self.stage, "weights": self.weights},
            "decisions": self.decisions,
            "trajectory": [p.to_json() for p in self.trajectory],
            "guardrails": [
                {
                    **asdict(g),
                    "first_fail": None if g.first_fail_ms is None else iso_time(g.first_fail_ms),
                    "first_fail_elapsed_s": None
                    if g.first_fail_ms is None
                    else (g.first_fail_ms - self.start_ms) / 1000,
                }
                for g in self.guardrails
            ],
        }


def iso_time(ms: int) -> str:
    t = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
    return t.replace("+00:00", "Z")


def judged_weights(
    spec: ExperimentSpec, window: StageWindow, schedule: dict[str, float]
) -> dict[str, float]:
    """The split to judge a recorded window under: observed, over the schedule's live variants.

    A replay cannot route, so the schedule's weights describe nothing in the log; judging under
    them would make the sample-ratio check hold every stage whose share differs from the
    recording's. A candidate the schedule has live but the window has not seen yet keeps a tiny
    weight, so it is judged (and waits for data) as it would be live.
    """
    live = [v for v in spec.variants if schedule.get(v, 0) > 0]
    units = {v: window.of(v).assignment_units for v in live}
    total = sum(units.values())
    if total == 0:
        return dict(schedule)
    out = dict.fromkeys(spec.variants, 0.0)
    for v in live:
        if units[v]:
            out[v] = 100 * units[v] / total
        elif v != spec.stable:
            out[v] = _UNOBSERVED
    return out


def _observed(spec: ExperimentSpec, window: StageWindow) -> dict[str, float]:
    units = {v: window.of(v).assignment_units for v in spec.variants}
    total = sum(units.values())
    return {v: round(100 * u / total, 2) if total else 0.0 for v, u in units.items()}


def _check_variants(spec: ExperimentSpec, events: Sequence[RecordedEvent]) -> None:
    """Refuse a log that cannot say anything about this experiment's variants."""
    seen = sorted({e.event.variant for e in events if e.event.variant})
    cands = [v for v in spec.variants if v != spec.stable]
    if spec.strategy == "shadow" and spec.shadow.variant:
        cands = [spec.shadow.variant]
    problems = []
    if spec.stable not in seen:
        problems.append(f"no events of the stable variant {spec.stable!r}")
    if cands and not any(v in seen for v in cands):
        problems.append(f"no events of any candidate ({', '.join(cands)})")
    if problems:
        raise EventLogError(
            "the log does not match the experiment: "
            + "; ".join(problems)
            + f" (variants in the log: {', '.join(seen) or 'none'})"
        )


class Source(Protocol):
    """Events for a replay that routes: a simulation whose split follows the replay's decisions.

    A recorded log cannot re-route (module docstring); a traffic generator can, and judging its
    requests through this same loop is what makes a simulation evidence about the evaluator.
    """

    def read(self, now_ms: int, weights: Mapping[str, float]) -> Iterable[RecordedEvent]:
        """The events an evaluator could read by ``now_ms`` and has not read yet; requests that
        arrived since the previous checkpoint were routed by ``weights``."""
        ...


@dataclass
class _Log:
    """A recorded log as a :class:`Source`: its routing is the recording's, whatever the weights."""

    ordered: list[RecordedEvent]
    i: int = 0

    def read(self, now_ms: int, weights: Mapping[str, float]) -> Iterable[RecordedEvent]:
        j = bisect_right(self.ordered, now_ms, lo=self.i, key=lambda e: e.seen_ms)
        out, self.i = self.ordered[self.i : j], j
        return out


def replay(
    spec: ExperimentSpec,
    events: Sequence[RecordedEvent],
    *,
    cadence_s: float | None = None,
    every_checkpoint: bool = False,
    split: Split = "schedule",
    promote_when_ready: bool = False,
    signals: Sequence[RecordedSignal] = (),
) -> ReplayResult:
    """Run the evaluator's decisions over ``events`` (any order), checkpoint by checkpoint.

    The trajectory holds the start and every decision (advance, hold, rollback, complete);
    ``every_checkpoint`` adds a row for each checkpoint (action ``none``) too. ``split`` is what
    the judge compares the recorded split with, ``promote_when_ready`` whether manual gates
    are promoted as soon as they are ready (module docstring).
    """
    if not events:
        raise EventLogError("the log has no events")
    _check_variants(spec, events)
    ordered = sorted(events, key=lambda e: e.seen_ms)
    start_ms = min(started_ms(e.event) for e in events)
    res = replay_source(
        spec,
        _Log(ordered),
        start_ms,
        ordered[-1].seen_ms,
        cadence_s=cadence_s,
        every_checkpoint=every_checkpoint,
        split=split,
        promote_when_ready=promote_when_ready,
        signals=signals,
    )
    res.events = len(events)
    return res


def replay_source(
    spec: ExperimentSpec,
    source: Source,
    start_ms: int,
    end_ms: int,
    *,
    cadence_s: float | None = None,
    every_checkpoint: bool = False,
    split: Split = "schedule",
    promote_when_ready: bool = False,
    signals: Sequence[RecordedSignal] = (),
) -> ReplayResult:
    """:func:`replay` over a :class:`Source` from ``start_ms`` until the rollout ends or the
    first checkpoint at or past ``end_ms``; ``events`` counts the events read. ``signals``
    (judge verdicts, feedback, probes) reach the window at the first checkpoint at or past
    their ``seen_ms``, after that checkpoint's events, as the live evaluator reads them."""
    pending = sorted(signals, key=lambda s: s.seen_ms)
    read = 0
    cadence = spec.rollout.cadence_s if cadence_s is None else cadence_s
    if not (math.isfinite(cadence) and cadence > 0):
        raise EventLogError(f"cadence must be a positive number of seconds, got {cadence}")
    res = ReplayResult(spec.name, cadence, 0, start_ms, end_ms)
    t = machine.start(spec, start_ms / 1000)
    state, weights = t.state, dict(t.weights or {})
    window = machine.new_window(machine.running(spec, state), state.stage_started)
    res.trajectory.append(
        Point(start_ms, 0.0, 0, state.status, dict(weights), t.action, t.reasons, {}, [], {})
    )
    records: dict[tuple[str, str], GuardrailRecord] = {}
    k = 0
    while state.status == "running":
        k += 1
        now_ms = start_ms + round(k * cadence * 1000)
        for e in source.read(now_ms, weights):
            window.add(e.event)
            res.events += 1
        while read < len(pending) and pending[read].seen_ms <= now_ms:
            window.add_signal(pending[read].signal)
            read += 1
        phase = machine.running(spec, state)
        judged = weights if split == "schedule" else judged_weights(phase, window, weights)
        t = machine.evaluate(spec, state, window, judged, now_ms / 1000)
        if promote_when_ready and t.verdict is not None and t.verdict.awaiting_promote:
            why = "manual gate: promoted when ready"
            t = machine.command(spec, t.state, "promote", "replay", why, now_ms / 1000, t.verdict)
        res.checkpoints += 1
        if t.verdict is not None:
            _record(records, t.verdict, now_ms, state.stage)
            if t.verdict.decisions:
                res.decisions = [d.to_json() for d in t.verdict.decisions]
        if t.weights is not None:
            weights = dict(t.weights)
        if t.action or every_checkpoint:
            res.trajectory.append(_point(spec, t, now_ms, start_ms, weights, window))
        state = t.state
        if t.restart_window:
            window = machine.new_window(machine.running(spec, state), state.stage_started, window)
        if now_ms >= end_ms:
            break
    res.status, res.stage, res.weights = state.status, state.stage, weights
    res.guardrails = list(records.values())
    return res


def _record(
    records: dict[tuple[str, str], GuardrailRecord], verdict: Verdict, now_ms: int, stage: int
) -> None:
    for c in verdict.checks:
        rec = records.setdefault(
            (c.variant, c.metric), GuardrailRecord(c.variant, c.metric, c.action)
        )
        if c.status == "waiting":
            continue
        rec.checked += 1
        if c.status == "fail":
            rec.failed += 1
            if rec.first_fail_ms is None:
                rec.first_fail_ms, rec.first_fail_stage, rec.first_detail = now_ms, stage, c.detail


def _point(
    spec: ExperimentSpec,
    t: machine.Transition,
    now_ms: int,
    start_ms: int,
    weights: dict[str, float],
    window: StageWindow,
) -> Point:
    v = t.verdict
    return Point(
        time_ms=now_ms,
        elapsed_s=(now_ms - start_ms) / 1000,
        stage=t.state.stage,
        status=t.state.status,
        weights=dict(weights),
        action=t.action or "none",
        reasons=list(t.reasons if t.action else (v.reasons if v else [])),
        observed=_observed(spec, window),
        checks=[c.to_json() for c in v.checks] if v else [],
        snapshot={name: w.summary() for name, w in window.variants.items()},
    )


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def render(res: ReplayResult, spec: ExperimentSpec) -> str:
    """The trajectory and the guardrail summary for a terminal."""
    n_stages = len(spec.rollout.shares) if spec.strategy == "canary" else 1
    lines = [
        f"replay of {res.experiment}: {res.events} events, {iso_time(res.start_ms)} to "
        f"{iso_time(res.end_ms)} ({_clock((res.end_ms - res.start_ms) / 1000)}), "
        f"a checkpoint every {res.cadence_s:g} s ({res.checkpoints} evaluated)",
        "",
        f"{'time':<25}{'elapsed':>9}  {'stage':<6}{'action':<10}weights",
    ]
    for p in res.trajectory:
        w = ", ".join(f"{k} {v:g}%" for k, v in p.weights.items())
        lines.append(
            f"{iso_time(p.time_ms):<25}{_clock(p.elapsed_s):>9}  "
            f"{f'{p.stage + 1}/{n_stages}':<6}{p.action:<10}{w}"
        )
        lines += [f"{'':>42}{r}" for r in p.reasons]
    lines += ["", "guardrails (first failure, failed / judged checkpoints):"]
    for g in res.guardrails:
        if g.first_fail_ms is None:
            lines.append(
                f"  {g.variant} {g.metric} ({g.action}): never failed "
                f"(judged at {g.checked} checkpoints)"
            )
        else:
            lines.append(
                f"  {g.variant} {g.metric} ({g.action}): failed first at "
                f"+{_clock((g.first_fail_ms - res.start_ms) / 1000)} in stage "
                f"{(g.first_fail_stage or 0) + 1}, {g.failed}/{g.checked}: {g.first_detail}"
            )
    end = (
        "end of the log"
        if res.status == "running"
        else {"rolled_back": "rolled back", "completed": "completed"}.get(res.status, res.status)
    )
    lines += ["", f"result: {end} at stage {res.stage + 1}/{n_stages}"]
    lines += [render_decision(d)[0] for d in res.decisions]  # in full among the reasons above
    return "\n".join(lines)
