"""A synthetic A/B run with a known truth: events and quality signals for the A/B decision.

Why its own generator: the A/B decision must be shown to ship a candidate that is better, keep
stable when the candidate is worse and not ship when the arms are equal, at the rates
docs/STATISTICS.md states. So each quantity the decision compares is a parameter of
:class:`Truth`, and the run is judged through the code `extproc analyze` runs
(``replay.replay`` over events and signals), the decision path of the live evaluator.

Per request (an even split by default, one conversation each): lognormal latency (median
800 ms, sigma 0.5) times the arm's factor, Poisson completion tokens, errors and refusals at the
arm's rates. A share of the requests is judged: the candidate wins a decisive verdict with
``win``, ties come at ``ties``; each answer's rubric score (1-10) is normal around 7 plus the
arm's shift. A share of the requests draws feedback, negative at the arm's rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from extproc.contract.signals import FeedbackSignal, JudgeScores, JudgeSignal, Rubric
from extproc.evaluator.signal_log import RecordedSignal
from extproc.telemetry.export import RecordedEvent
from extproc.telemetry.v1.event_pb2 import Assignment, ErrorClass, TelemetryEvent

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


@dataclass(frozen=True)
class Truth:
    """What the candidate is, compared with stable (stable's values are the defaults)."""

    win: float = 0.5  # P(candidate wins a decisive judge verdict)
    latency_factor: float = 1.0
    errors: float = 0.01
    stable_errors: float = 0.01
    score_shift: float = 0.0  # rubric points
    negative_feedback: float = 0.1
    stable_negative_feedback: float = 0.1


EQUAL = Truth()
BETTER = Truth(win=0.6, latency_factor=0.9, score_shift=0.5, negative_feedback=0.07)
WORSE = Truth(win=0.4, latency_factor=1.15, score_shift=-0.5, negative_feedback=0.13)
SLIGHTLY_BETTER = Truth(win=0.55)  # the judge only: 782 decisive verdicts for 80% power


def _rubric(score: float) -> Rubric:
    s = float(np.clip(round(score * 2) / 2, 1, 10))  # judges score in halves (two orders)
    return Rubric(accuracy=s, clarity=s, completeness=s)


def ab_run(
    truth: Truth,
    seed: int,
    requests: int = 4000,
    *,
    seconds: float = 600,
    share: float = 0.5,
    judged: float = 0.3,
    ties: float = 0.1,
    feedback: float = 0.2,
) -> tuple[list[RecordedEvent], list[RecordedSignal]]:
    """The events and signals of one A/B run of ``requests`` over ``seconds``."""
    rng = np.random.default_rng(seed)
    start = np.sort(rng.uniform(0, seconds * 1000, requests)).astype(np.int64) + T0
    cand = rng.random(requests) < share
    latency = rng.lognormal(np.log(800), 0.5, requests) * np.where(cand, truth.latency_factor, 1)
    failed = rng.random(requests) < np.where(cand, truth.errors, truth.stable_errors)
    tokens = rng.poisson(120, requests)
    events, sigs = [], []
    for i in range(requests):
        variant = "canary" if cand[i] else "stable"
        ev = TelemetryEvent(
            time_unix_ms=int(start[i]),
            request_id=f"r{i}",
            experiment="exp",
            variant=variant,
            key_hash=f"k{i}",
            assignment=Assignment.ASSIGNMENT_STICKY,
            recorder="ab-sim",
        )
        end = int(start[i])
        if failed[i]:
            ev.status, ev.error = 502, ErrorClass.ERROR_CLASS_UPSTREAM_5XX
        else:
            ev.status, ev.duration_ms = 200, float(latency[i])
            ev.completion_tokens, ev.prompt_tokens = int(tokens[i]), 200
            ev.response_bytes, ev.refusal = int(4 * tokens[i]), False
            end += int(np.ceil(latency[i]))
        events.append(RecordedEvent(ev, end))
        if failed[i]:
            continue
        if rng.random() < judged:
            sigs.append(
                RecordedSignal(end + 2000, _verdict(truth, rng, i, int(start[i]), variant, ties))
            )
        if rng.random() < feedback:
            bad = truth.negative_feedback if cand[i] else truth.stable_negative_feedback
            value = "down" if rng.random() < bad else "up"
            fb = FeedbackSignal(time_ms=end + 1000, request_id=f"r{i}", key_hash=None, value=value)
            sigs.append(RecordedSignal(end + 1000, fb))
    return events, sigs


def _verdict(
    truth: Truth, rng: np.random.Generator, i: int, start_ms: int, primary: str, ties: float
) -> JudgeSignal:
    """A pairwise verdict on request ``i``: the served answer (``primary``) against the other
    variant's mirrored one."""
    other = "stable" if primary == "canary" else "canary"
    winner: Literal["primary", "shadow", "tie"]
    if rng.random() < ties:
        winner = "tie"
    else:
        cand_won = rng.random() < truth.win
        winner = "primary" if cand_won == (primary == "canary") else "shadow"
    score = {
        "stable": 7.0 + rng.normal(0, 1.2),
        "canary": 7.0 + truth.score_shift + rng.normal(0, 1.2),
    }
    return JudgeSignal(
        time_ms=start_ms,
        request_id=f"r{i}",
        primary=primary,
        shadow=other,
        winner=winner,
        scores=JudgeScores(primary=_rubric(score[primary]), shadow=_rubric(score[other])),
        consistent=winner != "tie",
    )
