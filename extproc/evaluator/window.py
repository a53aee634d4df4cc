"""Per-variant samples of the current rollout stage, built incrementally from telemetry events.

The evaluator compares variants within one stage only: a stage has one constant split, which the
sequential tests assume (see docs/STATISTICS.md, "ramp stages"). Forced requests (testers) and
shadow copies are left out of the comparison; they are counted separately. Every event is
classified by ``extproc.telemetry.outcome``, the definition every reader shares.

Requests that are still open matter as much as finished ones: a request that hangs until the
upstream timeout would otherwise be seen only when it ends, minutes later, and often in a later
stage. The data plane sends one in-flight notice for each request still open after
``inflight.notice_ms``; the window follows those requests (:class:`OpenRequests`, carried from
stage to stage) and, at each look (``StageWindow.look``, driven by the evaluator's clock), counts
the ones older than the hang bound as hung: a server error and a timeout of their variant, at
once, while they are still open. Their final event does not count them again.

An event of a request that started before the rollout's current attempt (`extproc experiment
restart`) is not judged at all: each attempt starts from fresh evidence.

An event is credited by when its request STARTED (``outcome.started_ms``). An event of a request
that started before the current stage (it ended, or was found hung, after the advance) cannot
reach a stage that has been decided already; it is judged in the current stage's window instead,
as a request of its variant, but is kept out of the assignment units, so the sample-ratio check
still compares this stage's assignment with this stage's weights (docs/EVALUATOR.md, "Stage
credit").
"""

from __future__ import annotations

from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from extproc.config import Price
from extproc.contract.signals import FeedbackSignal, JudgeSignal, Signal, WatchdogSignal
from extproc.evaluator.clusters import Clusters
from extproc.telemetry import outcome
from extproc.telemetry.outcome import CLIENT_ERRORS, SERVER_ERRORS, is_forced, started_ms
from extproc.telemetry.v1.event_pb2 import ErrorClass, TelemetryEvent

# Feedback by request id is attributed for the newest requests of the stage only: a stage of a
# million requests would otherwise keep a million ids (~200 MB) for feedback that comes, if at
# all, within minutes. Conversations (``by_key``) are far fewer and all kept.
MAX_REQUESTS_REMEMBERED = 200_000
# Hung requests whose final event has not come yet (it comes at the upstream timeout at the
# latest); bounded the same way in case final events are lost.
MAX_HUNG_REMEMBERED = 100_000
# Stable's p99 is trusted for the hang bound once it rests on this many latencies.
MIN_P99_SAMPLES = 100

# Plain ints for the enum values tested on every event: ``ErrorClass.ERROR_CLASS_NONE`` goes
# through protobuf's ``EnumTypeWrapper.__getattr__`` each time (~1.3 us, a seventh of ingest).
_NONE = int(ErrorClass.ERROR_CLASS_NONE)
_TIMEOUT = int(ErrorClass.ERROR_CLASS_TIMEOUT)


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
    errors: int = 0  # server errors (outcome.SERVER_ERRORS) plus hung requests
    timeouts: int = 0  # ERROR_CLASS_TIMEOUT plus hung requests
    hung: int = 0  # requests counted as failed while still open (in-flight past the bound)
    client_errors: int = 0  # outcome.CLIENT_ERRORS: shown apart, never in ``errors``
    successes: int = 0  # complete answers (outcome.is_success)
    answered: int = 0  # complete answers whose text was inspected
    refusals: int = 0
    tool_calls: int = 0  # complete answers that called a tool (outcome.called_tool)
    empty_answers: int = 0  # answered requests with no content and no tool call
    json_checked: int = 0  # answers to a JSON-mode request that could be checked
    json_invalid: int = 0
    latency_ms: array[float] = field(default_factory=_column)
    ttft_ms: array[float] = field(default_factory=_column)
    completion_tokens: array[float] = field(default_factory=_column)
    response_bytes: array[float] = field(default_factory=_column)
    answer_chars: array[float] = field(default_factory=_column)
    output_tokens_per_s: array[float] = field(default_factory=_column)
    cost: array[float] = field(default_factory=_column)  # per request, at the variant's price
    cached_prompt_tokens: array[float] = field(default_factory=_column)
    keys: set[str] = field(default_factory=set)
    unkeyed: int = 0
    # Quality signals (extproc.contract.signals) attributed to this variant within the stage.
    judge_wins: int = 0  # pairwise verdicts this variant's answer won
    judge_losses: int = 0
    judge_ties: int = 0
    judge_scores: array[float] = field(default_factory=_column)  # rubric means, 1-10 per answer
    feedback: dict[str, int] = field(default_factory=dict)  # up/down/retry/escalation counts
    probes: int = 0  # watchdog reference prompts answered
    probe_failures: int = 0
    price: Price | None = field(default=None, repr=False)
    clusters: Clusters = field(default_factory=Clusters, repr=False)  # per conversation

    def add(self, ev: TelemetryEvent, *, unit: bool = True) -> None:
        """Count one finished request; ``unit`` False keeps it out of the assignment units (a
        request of an earlier stage, assigned under that stage's split)."""
        self.requests += 1
        err = ev.error
        if err in SERVER_ERRORS:
            self.errors += 1
            self.timeouts += err == _TIMEOUT
        elif err in CLIENT_ERRORS:
            self.client_errors += 1
        elif err == _NONE:
            self.successes += 1
            self.tool_calls += ev.tool_calls
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
                self.empty_answers += ev.HasField("empty_answer") and ev.empty_answer
            if ev.HasField("answer_chars"):
                self.answer_chars.append(ev.answer_chars)
            if ev.HasField("json_valid"):
                self.json_checked += 1
                self.json_invalid += not ev.json_valid
            speed = outcome.output_tokens_per_s(ev)
            if speed is not None:
                self.output_tokens_per_s.append(speed)
            cost = outcome.cost(ev, self.price)
            if cost is not None:
                self.cost.append(cost)
            cached = outcome.cached_prompt_tokens(ev)
            if cached is not None:
                self.cached_prompt_tokens.append(cached)
        if unit:
            self.count_unit(ev.key_hash)
        self.clusters.add(self, ev.key_hash)

    def add_hung(self, key_hash: str, *, unit: bool = True) -> None:
        """Count a request still open past the hang bound: a failed request, a timeout."""
        self.requests += 1
        self.errors += 1
        self.timeouts += 1
        self.hung += 1
        if unit:
            self.count_unit(key_hash)
        self.clusters.add(self, key_hash)

    def count_unit(self, key_hash: str) -> None:
        if key_hash:
            self.keys.add(key_hash)
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
            "output_tokens_per_s": self.output_tokens_per_s,
            "cost": self.cost,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "judge_scores": self.judge_scores,
        }[metric]
        out = np.frombuffer(column, dtype=np.float64).copy()
        out.flags.writeable = False
        return out

    def summary(self) -> dict[str, float | int | dict[str, int] | None]:
        def pct(xs: NDArray[np.float64], q: float) -> float | None:
            return round(float(np.percentile(xs, q)), 2) if xs.size else None

        def mean(xs: NDArray[np.float64]) -> float | None:
            return round(float(np.mean(xs)), 2) if xs.size else None

        def rate(events: int, trials: int) -> float | None:
            return round(events / trials, 4) if trials else None

        latency, ttft = self.samples("latency"), self.samples("ttft")
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": rate(self.errors, self.requests),
            "timeouts": self.timeouts,
            "timeout_rate": rate(self.timeouts, self.requests),
            "hung": self.hung,
            "client_errors": self.client_errors,
            "client_error_rate": rate(self.client_errors, self.requests),
            "latency_p50": pct(latency, 50),
            "latency_p95": pct(latency, 95),
            "latency_p99": pct(latency, 99),
            "ttft_p50": pct(ttft, 50),
            "ttft_p95": pct(ttft, 95),
            "completion_tokens_mean": mean(self.samples("completion_tokens")),
            "response_bytes_mean": mean(self.samples("response_bytes")),
            "refusal_rate": rate(self.refusals, self.answered),
            "successes": self.successes,
            "answered": self.answered,
            "tool_calls": self.tool_calls,
            "tool_call_rate": rate(self.tool_calls, self.successes),
            "empty_answers": self.empty_answers,
            "empty_answer_rate": rate(self.empty_answers, self.answered),
            "json_checked": self.json_checked,
            "json_invalid": self.json_invalid,
            "json_invalid_rate": rate(self.json_invalid, self.json_checked),
            "answer_chars_mean": mean(self.samples("answer_chars")),
            "output_tokens_per_s": mean(self.samples("output_tokens_per_s")),
            "cost_per_request": (
                round(float(np.mean(c)), 8) if (c := self.samples("cost")).size else None
            ),
            "cached_prompt_tokens": mean(self.samples("cached_prompt_tokens")),
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


@dataclass(frozen=True)
class Notice:
    """A request the data plane reported still open: whose it is and when it began."""

    variant: str
    key_hash: str
    started_ms: int


@dataclass
class OpenRequests:
    """Requests known to be open (in-flight notices), followed from stage to stage.

    A notice waits in ``pending`` until its request ends (the final event removes it) or its
    age crosses the hang bound at a look (it is counted as hung and moves to ``hung``, whose
    final event is then dropped). ``stable_p99_ms`` is the last p99 latency of stable that
    rested on enough samples, kept across stages because a new stage starts with none.
    """

    pending: dict[str, Notice] = field(default_factory=dict)
    hung: OrderedDict[str, None] = field(default_factory=OrderedDict)
    stable_p99_ms: float | None = None


@dataclass
class StageWindow:
    """Every variant's window for the stage that started at ``started_ms``.

    ``notice_ms`` and ``hang_multiple`` (the experiment's ``inflight`` section) set the hang
    bound: max(notice_ms, hang_multiple x stable's p99); until stable's p99 is known, the bound
    is hang_multiple x notice_ms. ``prices`` are the variants' token prices, for the cost column.
    """

    started_ms: int
    attempt_started_ms: int = 0  # requests that started before belong to an earlier attempt
    shadow_as_candidate: bool = False  # shadow strategy: mirrored answers are the candidate's
    stable: str = ""
    notice_ms: float = 5000.0
    hang_multiple: float = 4.0
    prices: dict[str, Price] = field(default_factory=dict, repr=False)
    open: OpenRequests = field(default_factory=OpenRequests, repr=False)
    variants: dict[str, VariantWindow] = field(default_factory=dict)
    forced: int = 0
    shadow: int = 0
    late: int = 0  # events of requests that started before this stage, judged here
    earlier_attempt: int = 0  # events of requests of an earlier attempt, not judged
    unattributed: int = 0  # feedback for requests this stage did not serve
    # Who served what in this stage, so that feedback (which names only a request or a
    # conversation) lands on the variant that answered it. ``by_request`` drops its oldest id at
    # every request past MAX_REQUESTS_REMEMBERED; ``request_order`` names that id (the dict's
    # keys, oldest first). A dict alone finds its first key by scanning past every key deleted
    # before it (until its next resize): ~50 us an eviction, 100+ s of ingest per million
    # events. An OrderedDict evicts in constant time too, but copies ~3x slower, and the
    # snapshot for a standby (snapshot.py) copies it on the evaluator's loop.
    by_request: dict[str, str] = field(default_factory=dict, repr=False)
    request_order: deque[str] = field(default_factory=deque, repr=False)
    by_key: dict[str, str] = field(default_factory=dict, repr=False)

    def add(self, ev: TelemetryEvent) -> None:
        variant = ev.variant
        if not variant:
            return
        if started_ms(ev) < self.attempt_started_ms:
            # A restart promises fresh evidence: the old attempt's stragglers (final events,
            # notices, mirrored answers) were judged in it, or never will be.
            self.earlier_attempt += 1
            return
        if ev.shadow:
            if ev.in_flight:
                if self.shadow_as_candidate:
                    self._notice(ev)
                return
            self.shadow += 1
            if self.shadow_as_candidate and self._first_count(ev):
                self._add_final(variant, ev)
        elif is_forced(ev):
            self.forced += not ev.in_flight
        elif ev.in_flight:
            self._notice(ev)
        elif self._first_count(ev):
            self._add_final(variant, ev)
            rid = ev.request_id
            if rid:
                if rid not in self.by_request:  # a repeated id keeps its place
                    self.request_order.append(rid)
                self.by_request[rid] = variant
                if len(self.by_request) > MAX_REQUESTS_REMEMBERED:  # the oldest goes first
                    del self.by_request[self.request_order.popleft()]
            if ev.key_hash:
                self.by_key[ev.key_hash] = variant

    def _add_final(self, variant: str, ev: TelemetryEvent) -> None:
        late = started_ms(ev) < self.started_ms
        self.late += late
        self._window(variant).add(ev, unit=not late)

    def _notice(self, ev: TelemetryEvent) -> None:
        """Follow a request reported open (a notice without a request id cannot be matched
        with its final event, so it is not followed)."""
        rid = ev.request_id
        if rid and rid not in self.open.hung:
            self.open.pending[rid] = Notice(ev.variant, ev.key_hash, started_ms(ev))

    def _first_count(self, ev: TelemetryEvent) -> bool:
        """Whether a final event still has to be counted: not when its request already was,
        as hung."""
        op = self.open
        rid = ev.request_id
        if not rid or not (op.pending or op.hung):
            return True
        op.pending.pop(rid, None)
        if rid in op.hung:
            del op.hung[rid]
            return False
        return True

    def hang_bound_ms(self) -> float:
        """How old an open request must be to count as hung."""
        stable = self.variants.get(self.stable)
        if stable is not None and len(stable.latency_ms) >= MIN_P99_SAMPLES:
            self.open.stable_p99_ms = float(np.percentile(stable.samples("latency"), 99))
        p99 = self.open.stable_p99_ms
        if p99 is None:
            return self.hang_multiple * self.notice_ms
        return max(self.notice_ms, self.hang_multiple * p99)

    def look(self, now_ms: float) -> int:
        """Count the open requests whose age crossed the hang bound by ``now_ms`` as hung, in
        their variant's window; returns how many. Called at every look, before judging."""
        op = self.open
        if not op.pending:
            return 0
        bound = self.hang_bound_ms()
        crossed = [rid for rid, n in op.pending.items() if now_ms - n.started_ms >= bound]
        for rid in crossed:
            n = op.pending.pop(rid)
            late = n.started_ms < self.started_ms
            self.late += late
            self._window(n.variant).add_hung(n.key_hash, unit=not late)
            op.hung[rid] = None
            if len(op.hung) > MAX_HUNG_REMEMBERED:
                op.hung.popitem(last=False)
        return len(crossed)

    def _window(self, variant: str) -> VariantWindow:
        """``variant``'s window, created on first use. Not ``setdefault(variant,
        VariantWindow())``: that builds and drops a window on every event (~0.8 us each)."""
        w = self.variants.get(variant)
        if w is None:
            w = self.variants[variant] = VariantWindow(price=self.prices.get(variant))
        return w

    def add_signal(self, sig: Signal) -> None:
        """Fold in a quality signal of this stage (signals of earlier stages are ignored)."""
        if sig.time_ms < self.started_ms:
            return
        if isinstance(sig, JudgeSignal):
            primary, shadow = self._window(sig.primary), self._window(sig.shadow)
            for w, r in ((primary, sig.scores.primary), (shadow, sig.scores.shadow)):
                w.judge_scores.append((r.accuracy + r.clarity + r.completeness) / 3)
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
