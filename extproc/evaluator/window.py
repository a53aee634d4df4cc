"""Per-variant samples of the current rollout stage, built incrementally from telemetry events.

The evaluator compares variants within one stage only: a stage has one constant split, which the
sequential tests assume (see docs/STATISTICS.md, "ramp stages"). Forced requests (testers) and
shadow copies are left out of the comparison; they are counted separately.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from extproc.signals import FeedbackSignal, JudgeSignal, Signal, WatchdogSignal
from extproc.telemetry.v1.event_pb2 import Assignment, ErrorClass, TelemetryEvent

# Feedback by request id is attributed for the newest requests of the stage only: a stage of a
# million requests would otherwise keep a million ids (~200 MB) for feedback that comes, if at
# all, within minutes. Conversations (``by_key``) are far fewer and all kept.
MAX_REQUESTS_REMEMBERED = 200_000

SERVER_ERRORS = frozenset(
    {
        ErrorClass.ERROR_CLASS_UPSTREAM_5XX,
        ErrorClass.ERROR_CLASS_TIMEOUT,
        ErrorClass.ERROR_CLASS_RESET,
    }
)
# Plain ints for the enum values tested on every event: ``ErrorClass.ERROR_CLASS_NONE`` goes
# through protobuf's ``EnumTypeWrapper.__getattr__`` each time (~1.3 us, a seventh of ingest).
_NONE = int(ErrorClass.ERROR_CLASS_NONE)
_FORCED = int(Assignment.ASSIGNMENT_FORCED)


def _column() -> array[float]:
    return array("d")


@dataclass
class VariantWindow:
    """Raw samples of one variant in the stage, one ``array("d")`` column per metric.

    Why columns and not lists: the judge needs numpy arrays, and a list of Python floats is
    converted one float at a time (~75 ns each: 0.3-0.6 s for a 1M-event window's first look),
    while an ``array("d")`` holds the same doubles a numpy array does and is copied in one
    memcpy. Appending to either costs about the same.
    """

    requests: int = 0
    errors: int = 0
    answered: int = 0  # responses whose answer text was inspected
    refusals: int = 0
    latency_ms: array[float] = field(default_factory=_column)
    ttft_ms: array[float] = field(default_factory=_column)
    completion_tokens: array[float] = field(default_factory=_column)
    response_bytes: array[float] = field(default_factory=_column)
    answer_chars: array[float] = field(default_factory=_column)
    keys: set[str] = field(default_factory=set)
    unkeyed: int = 0
    # Quality signals (extproc.signals) attributed to this variant within the stage.
    judge_wins: int = 0  # pairwise verdicts this variant's answer won
    judge_losses: int = 0
    judge_ties: int = 0
    feedback: dict[str, int] = field(default_factory=dict)  # up/down/retry/escalation counts
    probes: int = 0  # watchdog reference prompts answered
    probe_failures: int = 0

    def add(self, ev: TelemetryEvent) -> None:
        self.requests += 1
        err = ev.error
        if err in SERVER_ERRORS:
            self.errors += 1
        elif err == _NONE:
            if ev.HasField("duration_ms"):
                self.latency_ms.append(ev.duration_ms)
            if ev.HasField("first_token_ms"):
                self.ttft_ms.append(ev.first_token_ms)
            if ev.HasField("completion_tokens"):
                self.completion_tokens.append(ev.completion_tokens)
            self.response_bytes.append(ev.response_bytes)
            if ev.HasField("refusal"):
                self.answered += 1
                self.refusals += ev.refusal
            if ev.HasField("answer_chars"):
                self.answer_chars.append(ev.answer_chars)
        key = ev.key_hash
        if key:
            self.keys.add(key)
        else:
            self.unkeyed += 1

    @property
    def negative_feedback(self) -> int:
        return sum(n for v, n in self.feedback.items() if v != "up")

    @property
    def assignment_units(self) -> int:
        """Conversations (distinct sticky keys) plus unkeyed requests: what assignment splits."""
        return len(self.keys) + self.unkeyed

    def samples(self, metric: str) -> NDArray[np.float64]:
        """A read-only copy of one metric's samples.

        A copy, not a view of the column: ``array("d")`` refuses to grow (``BufferError``) while
        a numpy array shares its memory, so a view the judge kept would stop ingest. The copy is
        a memcpy (~0.4 ms per 500,000 samples), cheap enough at every look without a cache.
        """
        column = {
            "latency": self.latency_ms,
            "ttft": self.ttft_ms,
            "completion_tokens": self.completion_tokens,
            "response_bytes": self.response_bytes,
            "answer_chars": self.answer_chars,
        }[metric]
        out = np.frombuffer(column, dtype=np.float64).copy()
        out.flags.writeable = False
        return out

    def summary(self) -> dict[str, float | int | dict[str, int] | None]:
        def pct(xs: NDArray[np.float64], q: float) -> float | None:
            return round(float(np.percentile(xs, q)), 2) if xs.size else None

        def mean(xs: NDArray[np.float64]) -> float | None:
            return round(float(np.mean(xs)), 2) if xs.size else None

        latency, ttft = self.samples("latency"), self.samples("ttft")
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.errors / self.requests, 4) if self.requests else None,
            "latency_p50": pct(latency, 50),
            "latency_p95": pct(latency, 95),
            "latency_p99": pct(latency, 99),
            "ttft_p50": pct(ttft, 50),
            "ttft_p95": pct(ttft, 95),
            "completion_tokens_mean": mean(self.samples("completion_tokens")),
            "response_bytes_mean": mean(self.samples("response_bytes")),
            "refusal_rate": round(self.refusals / self.answered, 4) if self.answered else None,
            "answer_chars_mean": mean(self.samples("answer_chars")),
            "conversations": len(self.keys),
            "judge_verdicts": (decided := self.judge_wins + self.judge_losses) + self.judge_ties,
            "judge_win_rate": round(self.judge_wins / decided, 4) if decided else None,
            "feedback": dict(self.feedback),
            "feedback_negative_rate": (
                round(min(self.negative_feedback, self.requests) / self.requests, 4)
                if self.requests and self.feedback
                else None
            ),
            "watchdog_probes": self.probes,
            "watchdog_fail_rate": (
                round(self.probe_failures / self.probes, 4) if self.probes else None
            ),
        }


@dataclass
class StageWindow:
    """Every variant's window for the stage that started at ``started_ms``."""

    started_ms: int
    shadow_as_candidate: bool = False  # shadow strategy: mirrored answers are the candidate's
    variants: dict[str, VariantWindow] = field(default_factory=dict)
    forced: int = 0
    shadow: int = 0
    unattributed: int = 0  # feedback for requests this stage did not serve
    # Who served what in this stage, so that feedback (which names only a request or a
    # conversation) lands on the variant that answered it. ``by_request`` is an OrderedDict
    # because it drops its oldest id at every request past MAX_REQUESTS_REMEMBERED: a dict finds
    # its first key by scanning past every key deleted before it (until its next resize), which
    # made each eviction cost ~50 us, and ingest 100+ s per million events.
    by_request: OrderedDict[str, str] = field(default_factory=OrderedDict, repr=False)
    by_key: dict[str, str] = field(default_factory=dict, repr=False)

    def add(self, ev: TelemetryEvent) -> None:
        variant = ev.variant
        if ev.time_unix_ms < self.started_ms or not variant:
            return
        if ev.shadow:
            self.shadow += 1
            if self.shadow_as_candidate:
                self._window(variant).add(ev)
        elif ev.assignment == _FORCED:
            self.forced += 1
        else:
            self._window(variant).add(ev)
            if ev.request_id:
                self.by_request[ev.request_id] = variant
                if len(self.by_request) > MAX_REQUESTS_REMEMBERED:  # the oldest goes first
                    self.by_request.popitem(last=False)
            if ev.key_hash:
                self.by_key[ev.key_hash] = variant

    def _window(self, variant: str) -> VariantWindow:
        """``variant``'s window, created on first use. Not ``setdefault(variant,
        VariantWindow())``: that builds and drops a window on every event (~0.8 us each)."""
        w = self.variants.get(variant)
        if w is None:
            w = self.variants[variant] = VariantWindow()
        return w

    def add_signal(self, sig: Signal) -> None:
        """Fold in a quality signal of this stage (signals of earlier stages are ignored)."""
        if sig.time_ms < self.started_ms:
            return
        if isinstance(sig, JudgeSignal):
            primary, shadow = self._window(sig.primary), self._window(sig.shadow)
            if sig.winner == "tie":
                primary.judge_ties += 1
                shadow.judge_ties += 1
            else:
                won, lost = (primary, shadow) if sig.winner == "primary" else (shadow, primary)
                won.judge_wins += 1
                lost.judge_losses += 1
        elif isinstance(sig, FeedbackSignal):
            variant = (sig.request_id and self.by_request.get(sig.request_id)) or (
                sig.key_hash and self.by_key.get(sig.key_hash)
            )
            if not variant:
                self.unattributed += 1
                return
            fb = self._window(variant).feedback
            fb[sig.value] = fb.get(sig.value, 0) + 1
        elif isinstance(sig, WatchdogSignal):
            w = self._window(sig.variant)
            w.probes += 1
            w.probe_failures += not sig.passed

    def of(self, variant: str) -> VariantWindow:
        return self.variants.get(variant) or VariantWindow()
