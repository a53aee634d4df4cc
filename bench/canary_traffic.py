"""Synthetic canary traffic that follows the evaluator's routing: the simulation's generator.

Why its own generator: the evaluator must be judged on traffic with the features that broke it
(hangs, incidents that hit both variants, drift, heavy tails, clustered conversations, a split
off its weights), each one a parameter here, and on a closed loop: :class:`Traffic` is a
``replay.Source``, so ``replay_source`` (the loop `extproc analyze` runs) decides, and the
requests arriving after each checkpoint are routed by the weights it set.

The model, per request:

* **Arrivals**: sessions (conversations) start as a Poisson process; a session has one request,
  or about ``Sessions.mean_requests`` separated by exponential gaps. Its sticky key is one
  ``key_hash`` and one uniform bucket; a request goes to the candidate when the bucket is below
  the candidate's current weight (times ``share_factor``), as the sidecar's monotone buckets do.
* **Latency**: a lognormal body mixed with a Pareto tail. A regression is a monotone transform of
  the quantile level (:class:`Shift`): ``x * g(F(x))`` with ``g = 1`` below ``start`` and
  ``factor`` from ``q`` on, so the quantile ``q`` rises by exactly ``factor`` and every quantile
  below ``start`` is unchanged. TTFT likewise (lognormal).
* **Outcomes**: server errors (a fast 502), refusals, tool calls, empty answers, completion and
  prompt tokens; hangs (the request ends at the upstream timeout with a timeout error).
* **In-flight notices**: every request still open at ``notice_ms`` gets one notice (as the data
  plane sends), then its final event; an event is readable when it is sent (the request's end).
* **Common effects**: a burst (errors and slowness for both variants for ``seconds``), diurnal-
  like drift of load and latency, and per-session random effects (latency and TTFT factors,
  shifts of the log-odds of errors, refusals and tool calls) shared by all of a session's requests.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from scipy.special import expit, logit, ndtr

from extproc.telemetry.export import RecordedEvent
from extproc.telemetry.v1.event_pb2 import Assignment, ErrorClass, TelemetryEvent

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class Shift:
    """Scale the quantiles from level ``start`` up, reaching ``factor`` at level ``q``."""

    q: float
    factor: float
    start: float

    def gain(self, u: FloatArray) -> FloatArray:
        """The factor applied to a draw at quantile level ``u`` (monotone in ``u``)."""
        ramp = np.clip((u - self.start) / (self.q - self.start), 0.0, 1.0)
        out: FloatArray = self.factor**ramp
        return out


def p99(factor: float) -> Shift:
    """A tail regression: p99 times ``factor``, quantiles up to p95 unchanged."""
    return Shift(0.99, factor, 0.95)


def p95(factor: float) -> Shift:
    """p95 times ``factor``, quantiles up to p80 unchanged."""
    return Shift(0.95, factor, 0.80)


@dataclass(frozen=True)
class Arm:
    """One variant's outcome distributions (rates are per request)."""

    latency_median_ms: float = 800.0
    latency_sigma: float = 0.8
    tail_share: float = 0.02  # Pareto component of the latency mixture
    tail_scale_ms: float = 3000.0
    tail_alpha: float = 2.0
    latency_shift: Shift | None = None
    ttft_median_ms: float = 250.0
    ttft_sigma: float = 0.5
    ttft_shift: Shift | None = None
    error_rate: float = 0.01
    refusal_rate: float = 0.02
    tool_call_rate: float = 0.30
    empty_rate: float = 0.005
    tokens_mean: float = 150.0
    hang_rate: float = 0.0

    def latency_cdf(self, x: FloatArray) -> FloatArray:
        body = ndtr((np.log(x) - math.log(self.latency_median_ms)) / self.latency_sigma)
        tail = np.where(
            x > self.tail_scale_ms, 1.0 - (self.tail_scale_ms / x) ** self.tail_alpha, 0
        )
        out: FloatArray = (1 - self.tail_share) * body + self.tail_share * tail
        return out

    def latency(self, rng: np.random.Generator, n: int) -> FloatArray:
        body = self.latency_median_ms * np.exp(self.latency_sigma * rng.standard_normal(n))
        tail = self.tail_scale_ms * (1.0 - rng.random(n)) ** (-1.0 / self.tail_alpha)
        x: FloatArray = np.where(rng.random(n) < self.tail_share, tail, body)
        if self.latency_shift is not None:
            x = x * self.latency_shift.gain(self.latency_cdf(x))
        return x

    def ttft(self, rng: np.random.Generator, n: int) -> FloatArray:
        z = rng.standard_normal(n)
        x: FloatArray = self.ttft_median_ms * np.exp(self.ttft_sigma * z)
        if self.ttft_shift is not None:
            x = x * self.ttft_shift.gain(ndtr(z))
        return x


@dataclass(frozen=True)
class Sessions:
    """Conversations of many requests with random effects shared by all their requests."""

    mean_requests: float = 100.0
    mean_gap_s: float = 6.0  # between a session's requests
    latency_sigma: float = 0.5  # log-scale sd of the session's latency factor
    ttft_sigma: float = 0.4
    logit_sd: float = 1.0  # sd of the session's shift of the log-odds of errors, tool calls
    refusal_logit_sd: float = 1.5


@dataclass(frozen=True)
class Burst:
    """An incident hitting both variants: from ``at_s`` (drawn uniformly in ``window_s`` when
    None) for ``seconds``, errors at ``error_rate`` and latency times ``latency_factor``."""

    seconds: float = 60.0
    error_rate: float = 0.30
    latency_factor: float = 3.0
    window_s: tuple[float, float] = (60.0, 1500.0)


@dataclass(frozen=True)
class Drift:
    """Diurnal-like drift common to both variants over a ``period_s`` cycle: load and latency
    scaled by ``1 + amplitude * sin``, latency lagging load by a quarter period."""

    period_s: float = 7200.0
    load_amplitude: float = 0.5
    latency_amplitude: float = 0.3


@dataclass(frozen=True)
class Scenario:
    """Everything one simulated rollout's traffic depends on."""

    stable: Arm = field(default_factory=Arm)
    candidate: Arm = field(default_factory=Arm)
    rps: float = 20.0
    sessions: Sessions | None = None  # None: one request per conversation
    burst: Burst | None = None
    drift: Drift | None = None
    share_factor: float = 1.0  # the candidate's actual share over its weight


@dataclass
class _Session:
    key: str
    bucket: float
    latency: float = 1.0
    ttft: float = 1.0
    logit: float = 0.0
    refusal_logit: float = 0.0


@dataclass(order=True)
class _Pending:
    seen_ms: int
    seq: int
    event: RecordedEvent = field(compare=False)


class Traffic:
    """A ``replay.Source``: requests routed by the replay's weights, events when readable.

    ``candidate_requests`` counts the candidate's requests that have arrived so far (by the last
    :meth:`read`), the cost of the decision when the replay stops; ``candidate_by_checkpoint``
    the same count at every checkpoint, for decisions before the last.
    """

    def __init__(
        self,
        scenario: Scenario,
        seed: int,
        *,
        start_ms: int,
        experiment: str,
        stable: str,
        candidate: str,
        notice_ms: int,
        timeout_ms: int,
    ) -> None:
        self.sc, self.rng = scenario, np.random.default_rng(seed)
        self.start_ms, self.experiment = start_ms, experiment
        self.stable, self.candidate = stable, candidate
        self.notice_ms, self.timeout_ms = notice_ms, timeout_ms
        self.candidate_requests = 0
        self.candidate_by_checkpoint: dict[int, int] = {}
        self._arrivals: list[tuple[int, int, _Session]] = []  # (time, seq, session)
        self._pending: list[_Pending] = []
        self._seq = 0
        # Sessions run for minutes: start them well before the rollout, so that it begins in
        # the steady state (as many sessions open as later) rather than with none.
        ses = scenario.sessions
        warmup_s = 0.0 if ses is None else 3 * ses.mean_requests * ses.mean_gap_s
        self._next_session_ms = start_ms - 1000 * warmup_s
        burst = scenario.burst
        self.burst_at_ms: int | None = None
        if burst is not None:
            self.burst_at_ms = start_ms + round(1000 * self.rng.uniform(*burst.window_s))

    # -- arrivals ---------------------------------------------------------------------------

    def _load(self, t_ms: float) -> float:
        d = self.sc.drift
        if d is None:
            return 1.0
        return 1.0 + d.load_amplitude * math.sin(
            2 * math.pi * (t_ms - self.start_ms) / 1000 / d.period_s
        )

    def _latency_drift(self, t_ms: FloatArray) -> FloatArray:
        d = self.sc.drift
        if d is None:
            return np.ones_like(t_ms)
        phase = 2 * np.pi * ((t_ms - self.start_ms) / 1000 / d.period_s - 0.25)
        out: FloatArray = 1.0 + d.latency_amplitude * np.sin(phase)
        return out

    def _new_session(self, t_ms: int) -> None:
        s = _Session(key=f"k{self._seq}", bucket=float(self.rng.random()))
        ses = self.sc.sessions
        if ses is None:
            self._push_arrival(t_ms, s)
            return
        r = self.rng
        s.latency = float(np.exp(ses.latency_sigma * r.standard_normal()))
        s.ttft = float(np.exp(ses.ttft_sigma * r.standard_normal()))
        s.logit = float(ses.logit_sd * r.standard_normal())
        s.refusal_logit = float(ses.refusal_logit_sd * r.standard_normal())
        n = 1 + int(r.poisson(ses.mean_requests - 1))
        times = t_ms + np.cumsum(np.r_[0.0, r.exponential(1000 * ses.mean_gap_s, n - 1)])
        for t in times:
            self._push_arrival(int(t), s)

    def _push_arrival(self, t_ms: int, s: _Session) -> None:
        heapq.heappush(self._arrivals, (t_ms, self._seq, s))
        self._seq += 1

    def _sessions_until(self, end_ms: int) -> None:
        """Start every session beginning before ``end_ms`` (thinned Poisson for drifting load)."""
        ses = self.sc.sessions
        mean_len = 1.0 if ses is None else ses.mean_requests
        peak = self.sc.rps / mean_len * (1 + (self.sc.drift.load_amplitude if self.sc.drift else 0))
        while self._next_session_ms < end_ms:
            t = self._next_session_ms
            if self.rng.random() * (peak * mean_len / self.sc.rps) < self._load(t):
                self._new_session(int(t))
            self._next_session_ms += 1000 * float(self.rng.exponential(1 / peak))

    # -- replay.Source ------------------------------------------------------------------------

    def read(self, now_ms: int, weights: Mapping[str, float]) -> Iterable[RecordedEvent]:
        share = weights.get(self.candidate, 0.0) / 100 * self.sc.share_factor
        self._sessions_until(now_ms)
        batch: list[tuple[int, _Session]] = []
        while self._arrivals and self._arrivals[0][0] < now_ms:
            t, _, s = heapq.heappop(self._arrivals)
            if t >= self.start_ms:
                batch.append((t, s))
        if batch:
            self._serve(batch, share)
        self.candidate_by_checkpoint[now_ms] = self.candidate_requests
        out = []
        while self._pending and self._pending[0].seen_ms <= now_ms:
            out.append(heapq.heappop(self._pending).event)
        return out

    # -- outcomes -----------------------------------------------------------------------------

    def _serve(self, batch: list[tuple[int, _Session]], share: float) -> None:
        n = len(batch)
        t = np.array([b[0] for b in batch], dtype=np.float64)
        cand = np.array([b[1].bucket < share for b in batch])
        self.candidate_requests += int(cand.sum())
        lat_f = np.array([b[1].latency for b in batch])
        ttft_f = np.array([b[1].ttft for b in batch])
        shift = np.array([b[1].logit for b in batch])
        ref_shift = np.array([b[1].refusal_logit for b in batch])
        r = self.rng
        cols: dict[str, FloatArray] = {}
        for name in ("latency", "ttft", "error", "refusal", "tool", "empty", "tokens", "hang"):
            cols[name] = np.empty(n)
        for arm, mask in ((self.sc.stable, ~cand), (self.sc.candidate, cand)):
            k = int(mask.sum())
            if not k:
                continue
            cols["latency"][mask] = arm.latency(r, k)
            cols["ttft"][mask] = arm.ttft(r, k)
            cols["error"][mask] = arm.error_rate
            cols["refusal"][mask] = arm.refusal_rate
            cols["tool"][mask] = arm.tool_call_rate
            cols["empty"][mask] = arm.empty_rate
            cols["tokens"][mask] = r.poisson(arm.tokens_mean, k)
            cols["hang"][mask] = arm.hang_rate
        drift = self._latency_drift(t)
        latency = cols["latency"] * lat_f * drift
        ttft = cols["ttft"] * ttft_f * drift
        p_error = _shifted(cols["error"], shift)
        burst = self.sc.burst
        if burst is not None and self.burst_at_ms is not None:
            hit = (t >= self.burst_at_ms) & (t < self.burst_at_ms + 1000 * burst.seconds)
            p_error = np.where(hit, np.maximum(p_error, burst.error_rate), p_error)
            latency = np.where(hit, latency * burst.latency_factor, latency)
            ttft = np.where(hit, ttft * burst.latency_factor, ttft)
        error = r.random(n) < p_error
        hang = r.random(n) < cols["hang"]
        refusal = r.random(n) < _shifted(cols["refusal"], ref_shift)
        tool = r.random(n) < _shifted(cols["tool"], shift)
        empty = r.random(n) < cols["empty"]
        prompt = r.poisson(400, n)
        for i, (start, s) in enumerate(batch):
            variant = self.candidate if cand[i] else self.stable
            rid = f"r{self._seq}"
            self._seq += 1
            ev = TelemetryEvent(
                time_unix_ms=start,
                request_id=rid,
                experiment=self.experiment,
                variant=variant,
                key_hash=s.key,
                assignment=Assignment.ASSIGNMENT_STICKY,
            )
            ms = max(float(latency[i]), float(ttft[i]))  # a request lasts until its first token
            if hang[i] or ms >= self.timeout_ms:
                ms = float(self.timeout_ms)
                ev.status, ev.error = 504, ErrorClass.ERROR_CLASS_TIMEOUT
                ev.duration_ms = ms
            elif error[i]:
                ms = min(ms, float(ttft[i]))
                ev.status, ev.error = 502, ErrorClass.ERROR_CLASS_UPSTREAM_5XX
                ev.duration_ms = ms
            else:
                tokens = int(cols["tokens"][i])
                ev.status = 200
                ev.headers_ms = ev.first_token_ms = float(ttft[i])
                ev.duration_ms = ms
                ev.streamed = True
                ev.prompt_tokens = int(prompt[i])
                ev.completion_tokens = 0 if empty[i] else tokens
                ev.response_bytes = 200 + 4 * ev.completion_tokens
                ev.answer_chars = 0 if empty[i] else 4 * tokens
                ev.refusal = bool(refusal[i]) and not empty[i]
                ev.empty_answer = bool(empty[i])
                ev.tool_calls = bool(tool[i])
                ev.finish_reason = "tool_calls" if tool[i] else "stop"
            if ms >= self.notice_ms:
                notice = TelemetryEvent(
                    time_unix_ms=start + self.notice_ms,
                    duration_ms=self.notice_ms,
                    in_flight=True,
                    request_id=rid,
                    experiment=self.experiment,
                    variant=variant,
                    key_hash=s.key,
                    assignment=Assignment.ASSIGNMENT_STICKY,
                )
                self._push(RecordedEvent(notice, start + self.notice_ms))
            self._push(RecordedEvent(ev, start + math.ceil(ms)))

    def _push(self, ev: RecordedEvent) -> None:
        heapq.heappush(self._pending, _Pending(ev.seen_ms, self._seq, ev))
        self._seq += 1


def _shifted(p: FloatArray, shift: FloatArray) -> FloatArray:
    """Rates moved by per-session log-odds shifts (no shift: the rate itself)."""
    inner = np.clip(p, 1e-9, 1 - 1e-9)
    out: FloatArray = np.where(shift == 0, p, expit(logit(inner) + shift))
    return out
