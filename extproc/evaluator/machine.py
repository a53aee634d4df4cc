"""The rollout's state transitions as pure functions: the one decision path of the evaluator.

Why a module of its own: the live evaluator (``service.py``), the offline replay (``replay.py``,
`extproc analyze`) and the simulation (``bench/simulate_evaluator.py``) must take *the same*
decisions from the same evidence, or a backtest proves nothing about production. So every rule
that turns a verdict or an operator's intent into a new rollout state lives here, free of Redis
and of the clock (``now`` is passed in: wall time live, virtual time in a replay), and callers
only carry out the returned :class:`Transition`: set the weights, restart the stage window, save
the state, append the audit record.

The transitions (``S`` is the status, ``k`` the stage index, ``K`` the number of stages):

=====================  ==============================  ===========================================
event                  when                            effect
=====================  ==============================  ===========================================
start                  no rollout state yet            running, k = 0, weights of stage 0
verdict rollback       S = running                     rolled_back, weights: all to stable
verdict advance        S = running, k < K - 1          k + 1, new stage clock and window, weights
verdict complete/adv.  S = running, k = K - 1 or       completed (canary: weights of the last
                       not a canary                    stage without the holdback, i.e. the
                                                       candidate at 100%; blue-green: all to the
                                                       mirrored variant)
verdict hold           S = running, new reasons        recorded; stage and weights unchanged
verdict none           S = running                     nothing
pause / resume         running / paused                paused / running
promote                running or paused               as "advance" (the status is kept)
rollback (operator)    running, paused or completed    as "rollback"
abort                  running or paused               aborted, weights: all to stable
restart                rolled_back, completed or       attempt + 1: running, k = 0, weights of
                       aborted                         stage 0, no evidence, a window that judges
                                                       no request of an earlier attempt
any other intent       otherwise                       recorded as ignored, nothing else changes
=====================  ==============================  ===========================================

A stage behind a manual gate (``gate: manual``) never gets an ``advance`` verdict: the judge
says ``none`` with ``awaiting_promote`` once it is ready, and only a promote moves it on.

With ``phases:``, every rule above applies to the running phase as :meth:`ExperimentSpec.phase`
makes it (its strategy, stages and guardrails), and the completion of any phase but the last is
an ``advance`` into the next one instead: phase + 1, k = 0, the weights of its first stage, a
new stage clock and window, and no evidence carried (each phase proves its own case). An A/B
phase whose decision is not "ship" completes the rollout there (the later phases never start)
unless an operator promotes. A rollback in any phase ends the rollout; a restart begins again
at the first phase.

An advance or a promote also carries each e-valued guardrail's evidence into the next stage
(``judge.carry_evidence``), from the verdict of the stage's last look.

Functions never mutate the state they are given: they return a new one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from extproc.config import ExperimentSpec
from extproc.evaluator.guardrails import Verdict, carry_evidence, judge
from extproc.evaluator.rollout import RolloutState, flip_weights, rollback_weights, stage_weights
from extproc.evaluator.window import StageWindow


@dataclass(frozen=True)
class Transition:
    """What to do after one decision; ``action == ""`` means nothing happened.

    ``weights`` is the routing to set (None: leave it), ``weights_reason`` the reason stored with
    it, ``restart_window`` that a new stage began at ``state.stage_started`` (the caller starts a
    fresh stage window there), ``actor`` who asked ("" = the evaluator itself), and ``verdict``
    the judgement behind it, when there was one. ``archived`` is the state a restart ended, for
    the audit log; after a restart the caller starts the window without following the earlier
    attempt's open requests.
    """

    state: RolloutState
    action: str = ""
    reasons: list[str] = field(default_factory=list)
    weights: dict[str, float] | None = None
    weights_reason: str = ""
    restart_window: bool = False
    actor: str = ""
    verdict: Verdict | None = None
    archived: RolloutState | None = None


def running(spec: ExperimentSpec, state: RolloutState) -> ExperimentSpec:
    """The experiment as the state's phase runs it (the experiment itself without phases)."""
    return spec.phase(min(state.phase, max(len(spec.phases) - 1, 0)))


def new_window(
    spec: ExperimentSpec,
    started: float,
    previous: StageWindow | None = None,
    attempt_started: float = 0.0,
) -> StageWindow:
    """The empty window of a stage that began at ``started`` (seconds since the epoch), for
    ``spec`` as its phase runs it (:func:`running`).

    Under the shadow and blue-green strategies the mirrored answers are the candidate's samples.
    The requests still open in the ``previous`` stage's window are followed on: one that hangs
    after the advance still counts (window.py, "stage credit"). Requests that started before
    ``attempt_started`` belong to an earlier attempt and are not judged at all.
    """
    window = StageWindow(
        started_ms=round(started * 1000),
        attempt_started_ms=round(attempt_started * 1000),
        shadow_as_candidate=spec.strategy in ("shadow", "blue-green"),
        stable=spec.stable,
        notice_ms=spec.inflight.notice_ms,
        hang_multiple=spec.inflight.hang_multiple,
        prices={n: v.price for n, v in spec.variants.items() if v.price is not None},
    )
    if previous is not None:
        window.open = previous.open
    return window


def start(spec: ExperimentSpec, now: float) -> Transition:
    """A rollout with no recorded state begins at stage 0 (the first canary share) of its first
    phase."""
    first = spec.phase(0)
    state = RolloutState(status="running", stage=0, stage_started=now, strategy=first.strategy)
    return Transition(
        state,
        "start",
        ["rollout started" + (f" with phase 1 ({spec.phases[0].name})" if spec.phases else "")],
        weights=stage_weights(first, 0),
        weights_reason="rollout started at stage 1",
        restart_window=True,
    )


def _restart(
    spec: ExperimentSpec, state: RolloutState, why: list[str], now: float, actor: str
) -> Transition:
    """A new attempt from stage 0 with nothing of the last one: no evidence, no stage clock, and
    (through ``attempt_started``) no request of it in any window."""
    ended = {"rolled_back": "rolled back", "completed": "completed"}.get(state.status, state.status)
    reasons = [
        *why,
        f"attempt {state.attempt + 1} from stage 1; attempt {state.attempt} {ended} "
        f"at stage {state.stage + 1}",
    ]
    s = RolloutState(
        status="running",
        stage=0,
        stage_started=now,
        strategy=spec.phase(0).strategy,
        commands_seen=state.commands_seen,
        last_action="restart",
        last_reasons=reasons,
        attempt=state.attempt + 1,
        attempt_started=now,
    )
    return Transition(
        s,
        "restart",
        reasons,
        weights=stage_weights(spec.phase(0), 0),
        weights_reason=f"attempt {s.attempt} started at stage 1",
        restart_window=True,
        actor=actor,
        archived=state,
    )


def _advance(
    spec: ExperimentSpec,
    state: RolloutState,
    verdict: Verdict | None,
    reasons: list[str],
    now: float,
    actor: str = "",
) -> Transition:
    s = replace(state, last_reasons=list(reasons))
    phase = running(spec, state)
    last = s.stage >= len(phase.rollout.shares) - 1
    if (phase.strategy != "canary" or last) and s.phase < len(spec.phases) - 1:
        unshipped = [d for d in (verdict.decisions if verdict else ()) if d.outcome != "ship"]
        if not unshipped or actor:
            return _next_phase(spec, s, verdict, reasons, now, actor)
        # An A/B phase that did not find the candidate better ends the chain with its decision
        # (an operator's promote still moves on).
        reasons = [
            *reasons,
            f"phase {s.phase + 1} ({spec.phases[s.phase].name}) decided "
            f"{unshipped[0].outcome}: the phases after it do not start",
        ]
        s.last_reasons = list(reasons)
    spec = phase
    if spec.strategy != "canary" or last:
        s.status, s.last_action = "completed", "complete"
        weights: dict[str, float] | None = None
        weights_reason = ""
        if spec.strategy == "canary":
            weights = stage_weights(spec, s.stage, holdback=False)
            weights_reason = "rollout complete"
        elif spec.strategy == "blue-green":
            weights, weights_reason = flip_weights(spec), "blue-green flip: " + reasons[-1]
        return Transition(
            s,
            "complete",
            list(reasons),
            weights=weights,
            weights_reason=weights_reason,
            actor=actor,
            verdict=verdict,
        )
    s.evidence = carry_evidence(spec, state.evidence, state.stage, verdict)
    s.stage += 1
    s.stage_started = now
    s.last_action = "advance"
    return Transition(
        s,
        "advance",
        list(reasons),
        weights=stage_weights(spec, s.stage),
        weights_reason=f"stage {s.stage + 1}: {reasons[-1]}",
        restart_window=True,
        actor=actor,
        verdict=verdict,
    )


def _next_phase(
    spec: ExperimentSpec,
    state: RolloutState,
    verdict: Verdict | None,
    reasons: list[str],
    now: float,
    actor: str,
) -> Transition:
    """The running phase passed: the next one starts at its first stage, with no evidence."""
    done, following = spec.phases[state.phase], spec.phases[state.phase + 1]
    nxt = spec.phase(state.phase + 1)
    why = [
        *reasons,
        f"phase {state.phase + 1} ({done.name}, {done.strategy}) passed; "
        f"phase {state.phase + 2} ({following.name}, {following.strategy}) starts",
    ]
    s = replace(
        state,
        phase=state.phase + 1,
        stage=0,
        stage_started=now,
        strategy=nxt.strategy,
        evidence={},
        last_action="advance",
        last_reasons=why,
    )
    return Transition(
        s,
        "advance",
        why,
        weights=stage_weights(nxt, 0),
        weights_reason=f"phase {s.phase + 1} ({following.name}) stage 1: {why[-1]}",
        restart_window=True,
        actor=actor,
        verdict=verdict,
    )


def _rollback(
    spec: ExperimentSpec,
    state: RolloutState,
    verdict: Verdict | None,
    reasons: list[str],
    actor: str = "",
) -> Transition:
    s = replace(state, status="rolled_back", last_action="rollback", last_reasons=list(reasons))
    return Transition(
        s,
        "rollback",
        list(reasons),
        weights=rollback_weights(spec),
        weights_reason="rollback: " + "; ".join(reasons),
        actor=actor,
        verdict=verdict,
    )


RESTARTABLE = ("rolled_back", "completed", "aborted")
"""A new attempt follows an ended one only: a running rollout is rolled back or aborted first,
so that no two attempts ever share traffic or a window."""


def command(
    spec: ExperimentSpec,
    state: RolloutState,
    intent: str,
    actor: str,
    reason: str,
    now: float,
    last_verdict: Verdict | None = None,
) -> Transition:
    """An operator's intent (pause, resume, promote, rollback, abort, restart), applied or
    ignored.

    ``last_verdict`` is the stage's latest judgement: a promote carries its evidence forward.

    An intent that does not fit the status (resume while running, promote after a rollback) is
    recorded as ignored, so the audit log explains why nothing happened.
    """
    why = [f"{intent} by {actor}" + (f": {reason}" if reason else "")]
    s = replace(state)
    weights: dict[str, float] | None = None
    weights_reason = ""
    if intent == "pause" and s.status == "running":
        s.status = "paused"
    elif intent == "resume" and s.status == "paused":
        s.status = "running"
    elif intent == "promote" and s.status in ("running", "paused"):
        return _advance(spec, s, last_verdict, why, now, actor)
    elif intent == "rollback" and s.status in ("running", "paused", "completed"):
        return _rollback(spec, s, None, why, actor)
    elif intent == "abort" and s.status in ("running", "paused"):
        weights, weights_reason = rollback_weights(spec), f"aborted by {actor}"
        s.status = "aborted"
    elif intent == "restart" and s.status in RESTARTABLE:
        return _restart(spec, s, why, now, actor)
    else:
        why = [f"ignored {intent!r} by {actor}: rollout is {state.status}"]
    s.last_action, s.last_reasons = intent, why
    return Transition(s, intent, why, weights, weights_reason, actor=actor)


_FIGURE = re.compile(r"(?<![A-Za-z_-])\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?")
"""A number in a reason (a count, a rate, an e-value); digits inside a name (``v2``) are not."""


def hold_shape(reasons: list[str]) -> list[str]:
    """A hold's reasons without their figures: what is held and why, not by how much."""
    return [_FIGURE.sub("#", r) for r in reasons]


def step(spec: ExperimentSpec, state: RolloutState, verdict: Verdict, now: float) -> Transition:
    """Act on the judge's verdict for a running rollout.

    A hold is recorded only when what is held, or why, changes: its reasons carry live counts
    and evidence that move at every look, so they are compared without their figures. A stage
    held for an hour leaves one audit record (and one webhook call), not 720; the figures of
    every look are in the latest evaluation (`extproc status`).
    """
    if state.status != "running":
        return Transition(state, verdict=verdict)
    if verdict.action == "rollback":
        return _rollback(spec, state, verdict, verdict.reasons)
    if verdict.action in ("advance", "complete"):
        return _advance(spec, state, verdict, verdict.reasons, now)
    if verdict.action == "hold" and hold_shape(state.last_reasons) != hold_shape(verdict.reasons):
        s = replace(state, last_action="hold", last_reasons=list(verdict.reasons))
        return Transition(s, "hold", list(verdict.reasons), verdict=verdict)
    return Transition(state, verdict=verdict)


def evaluate(
    spec: ExperimentSpec,
    state: RolloutState,
    window: StageWindow,
    weights: dict[str, float],
    now: float,
) -> Transition:
    """One checkpoint: judge the stage window under ``weights`` and act on the verdict.

    Only a running rollout is judged; a paused, finished or rolled-back one is left alone (its
    transition has no verdict). Requests still open past the hang bound at ``now`` are counted
    as hung first, so a hang is judged while it is still open.
    """
    if state.status != "running":
        return Transition(state)
    window.look(now * 1000)
    phase = running(spec, state)
    verdict = judge(phase, window, weights, state.stage, now - state.stage_started, state.evidence)
    return step(spec, state, verdict, now)
