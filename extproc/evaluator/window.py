"""Per-variant samples of the current rollout stage, built incrementally from telemetry events.

The evaluator compares variants within one stage only: a stage has one constant split, which the
sequential tests assume (see docs/STATISTICS.md, "ramp stages"). Forced requests (testers) and
shadow copies are left out of the comparison; they are counted separately.
"""

from __future__ import annotations

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


@dataclass
class VariantWindow:
    """Raw samples of one variant in the stage; arrays are built on demand for the tests."""

    requests: int = 0
    errors: int = 0
    answered: int = 0  # responses whose answer text was inspected
    refusals: int = 0
    latency_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    completion_tokens: list[float] = field(default_factory=list)
    response_bytes: list[float] = field(default_factory=list)
    answer_chars: list[float] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)
    unkeyed: int = 0
    # Quality signals (extproc.signals) attributed to this variant within the stage.
    judge_wins: int = 0  # pairwise verdicts this variant's answer won
    judge_losses: int = 0
    judge_ties: int = 0
    feedback: dict[str, int] = field(default_factory=dict)  # up/down/retry/escalation counts
    probes: int = 0  # watchdog reference prompts answered
    probe_failures: int = 0
    _arrays: dict[str, tuple[NDArray[np.float64], int]] = field(default_factory=dict, repr=False)

    def add(self, ev: TelemetryEvent) -> None:
        self.requests += 1
        if ev.error in SERVER_ERRORS:
            self.errors += 1
        elif ev.error == ErrorClass.ERROR_CLASS_NONE:
            if ev.HasField("duration_ms"):
                self.latency_ms.append(ev.duration_ms)
            if ev.HasField("first_token_ms"):
                self.ttft_ms.append(ev.first_token_ms)
            if ev.HasField("completion_tokens"):
                self.completion_tokens.append(float(ev.completion_tokens))
            self.response_bytes.append(float(ev.response_bytes))
            if ev.HasField("refusal"):
                self.answered += 1
                self.refusals += ev.refusal
            if ev.HasField("answer_chars"):
                self.answer_chars.append(float(ev.answer_chars))
        if ev.key_hash:
            self.keys.add(ev.key_hash)
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
        """A read-only array of one metric's samples, grown in place as the window grows.

        Why a cache: the judge asks for every metric's samples at every tick, and converting the
        whole list each time is O(window) per look; at a 4-hour stage of 20 req/s that is most
        of a tick (and of an offline replay's 2,880 checkpoints). Each array is a buffer that
        only copies the samples added since the last look.
        """
        source = {
            "latency": self.latency_ms,
            "ttft": self.ttft_ms,
            "completion_tokens": self.completion_tokens,
            "response_bytes": self.response_bytes,
            "answer_chars": self.answer_chars,
        }[metric]
        buf, n = self._arrays.get(metric, (np.empty(0), 0))
        m = len(source)
        if m > buf.size:
            grown = np.empty(max(m, 2 * buf.size, 1024))
            grown[:n] = buf[:n]
            buf = grown
        buf[n:m] = source[n:m]
        self._arrays[metric] = (buf, m)
        view = buf[:m]
        view.flags.writeable = False
        return view

    def summary(self) -> dict[str, float | int | dict[str, int] | None]:
        def pct(xs: list[float], q: float) -> float | None:
            return round(float(np.percentile(xs, q)), 2) if xs else None

        def mean(xs: list[float]) -> float | None:
            return round(float(np.mean(xs)), 2) if xs else None

        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.errors / self.requests, 4) if self.requests else None,
            "latency_p50": pct(self.latency_ms, 50),
            "latency_p95": pct(self.latency_ms, 95),
            "latency_p99": pct(self.latency_ms, 99),
            "ttft_p50": pct(self.ttft_ms, 50),
            "ttft_p95": pct(self.ttft_ms, 95),
            "completion_tokens_mean": mean(self.completion_tokens),
            "response_bytes_mean": mean(self.response_bytes),
            "refusal_rate": round(self.refusals / self.answered, 4) if self.answered else None,
            "answer_chars_mean": mean(self.answer_chars),
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
    # conversation) lands on the variant that answered it.
    by_request: dict[str, str] = field(default_factory=dict, repr=False)
    by_key: dict[str, str] = field(default_factory=dict, repr=False)

    def add(self, ev: TelemetryEvent) -> None:
        if ev.time_unix_ms < self.started_ms or not ev.variant:
            return
        if ev.shadow:
            self.shadow += 1
            if self.shadow_as_candidate:
                self.variants.setdefault(ev.variant, VariantWindow()).add(ev)
        elif ev.assignment == Assignment.ASSIGNMENT_FORCED:
            self.forced += 1
        else:
            self.variants.setdefault(ev.variant, VariantWindow()).add(ev)
            if ev.request_id:
                self.by_request[ev.request_id] = ev.variant
                if len(self.by_request) > MAX_REQUESTS_REMEMBERED:  # the oldest goes first
                    del self.by_request[next(iter(self.by_request))]
            if ev.key_hash:
                self.by_key[ev.key_hash] = ev.variant

    def add_signal(self, sig: Signal) -> None:
        """Fold in a quality signal of this stage (signals of earlier stages are ignored)."""
        if sig.time_ms < self.started_ms:
            return
        if isinstance(sig, JudgeSignal):
            primary = self.variants.setdefault(sig.primary, VariantWindow())
            shadow = self.variants.setdefault(sig.shadow, VariantWindow())
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
            fb = self.variants.setdefault(variant, VariantWindow()).feedback
            fb[sig.value] = fb.get(sig.value, 0) + 1
        elif isinstance(sig, WatchdogSignal):
            w = self.variants.setdefault(sig.variant, VariantWindow())
            w.probes += 1
            w.probe_failures += not sig.passed

    def of(self, variant: str) -> VariantWindow:
        return self.variants.get(variant) or VariantWindow()
