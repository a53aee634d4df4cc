"""Prometheus metrics of the sidecar and the evaluator, served on ``/metrics``.

Operators already watch Prometheus and Grafana; these metrics put a rollout next to the rest of
their fleet (``deploy/grafana/extproc-dashboard.json`` is a dashboard over exactly these names).
Redis stays the source of truth for decisions: the evaluator judges from the event stream, not
from here, so a scrape that is late or lost changes nothing but a chart.

Names follow the Prometheus conventions: an ``extproc_`` prefix, base units (seconds, bytes),
``_total`` on counters, ratios in 0..1. Every label value comes from a closed set or from the
experiment file (experiment and variant names), so the number of series stays bounded; a
process that somehow sees more (experiment, variant) pairs than ``max_variants`` folds the rest
under ``experiment="_overflow", variant="_overflow"`` instead of growing without
limit.

Each metrics object owns its own :class:`~prometheus_client.CollectorRegistry` rather than the
process-wide default one, so tests, and a process that hosts several components, can create as
many as they like without "duplicated timeseries" errors.

Sidecar metrics (``SidecarMetrics``):

==============================================  =========  ====================================
name                                            type       labels
==============================================  =========  ====================================
``extproc_requests_total``                      counter    experiment, variant, shadow,
                                                           assignment, error_class
``extproc_request_duration_seconds``            histogram  experiment, variant, shadow
``extproc_time_to_first_token_seconds``         histogram  experiment, variant, shadow
``extproc_tokens_total``                        counter    experiment, variant, shadow, type
``extproc_response_bytes_total``                counter    experiment, variant, shadow
``extproc_answers_total``                       counter    experiment, variant, shadow, signal
``extproc_output_tokens_per_second``            histogram  experiment, variant, shadow
``extproc_cost_total``                          counter    experiment, variant, shadow
``extproc_in_flight_notices_total``             counter    experiment, variant, shadow
``extproc_telemetry_events_dropped_total``      counter    (none)
``extproc_telemetry_events_buffered``           gauge      (none)
``extproc_routing_version``                     gauge      experiment
``extproc_routing_weight_ratio``                gauge      experiment, variant
``extproc_redis_up``                            gauge      (none)
==============================================  =========  ====================================

Every figure is classified by :mod:`extproc.telemetry.outcome`, as the evaluator's guardrails
and `extproc status` classify it. The error rate of a variant is ``extproc_requests_total``
with ``{assignment!~"forced|override", error_class=~"upstream_5xx|timeout|reset"}`` over
``extproc_requests_total{assignment!~"forced|override"}``; client errors (``client_error``,
``client_disconnect``) are their own figure. Forced tester requests are counted in
``extproc_requests_total{assignment="forced"}`` only: timings, tokens, cost and answer signals
are those of assigned traffic (and, under ``shadow="true"``, of the mirrored copies), as the
evaluator compares them. In-flight notices (a request still open past ``inflight.notice_ms``)
are never requests: they go to ``extproc_in_flight_notices_total`` alone.

``extproc_answers_total`` counts answer signals by ``signal``: ``tool_call`` (over successful
requests: the tool-call rate), ``inspected`` (answers whose text was checked), ``empty`` and
``refusal`` (over ``inspected``), ``json_checked`` and ``json_invalid`` (JSON-invalid rate).
``extproc_tokens_total{type="cached_prompt"}`` counts prompt tokens served from the model
server's prompt cache; ``extproc_cost_total`` is the requests' cost at the variant's ``price``
(the file's currency), so cost per request is its rate over the successful requests' rate
(both count successful requests only, as the guardrails do).

Evaluator metrics (``EvaluatorMetrics``):

==============================================  =========  ====================================
``extproc_evaluator_decisions_total``           counter    experiment, action
``extproc_evaluator_stage``                     gauge      experiment (1-based, as in status)
``extproc_evaluator_weight_ratio``              gauge      experiment, variant
``extproc_evaluator_active``                    gauge      experiment (1 = holds the lease)
``extproc_evaluator_rollout_status``            gauge      experiment, status (1 = current)
==============================================  =========  ====================================
"""

from __future__ import annotations

import bisect
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from extproc.telemetry import outcome
from extproc.telemetry.outcome import TokenPrice
from extproc.telemetry.v1.event_pb2 import Assignment, ErrorClass, TelemetryEvent

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.15,
    0.25,
    0.4,
    0.6,
    1.0,
    1.5,
    2.5,
    4.0,
    6.0,
    10.0,
    15.0,
    25.0,
    40.0,
    60.0,
    90.0,
    120.0,
)
"""About 1.6x apart from 10 ms to 120 s: a cached or tiny answer's TTFT at the low end, a long
non-streamed completion at the top, and close enough together that ``histogram_quantile``'s
linear interpolation inside a bucket stays within a few tens of percent of the true p95."""

TOKENS_PER_S_BUCKETS: tuple[float, ...] = (
    2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 65.0, 80.0, 100.0, 130.0, 170.0, 220.0, 300.0,
    400.0, 600.0, 1000.0,
)  # fmt: skip
"""Generation speed of one streamed answer: a large model on a busy server near the bottom, a
small one on a fast server near the top, about 1.3x apart where most servers are."""

ANSWER_SIGNALS: tuple[str, ...] = (
    "tool_call",
    "inspected",
    "empty",
    "refusal",
    "json_checked",
    "json_invalid",
)
"""Values of the ``signal`` label of ``extproc_answers_total``: a closed set."""

UNROUTED = "_unrouted"
"""Variant label of a request refused before routing (for example an unknown forced variant)."""
OVERFLOW = "_overflow"
"""Experiment and variant label once more than ``max_variants`` pairs were seen."""
OTHER = "other"

ROLLOUT_STATUSES: tuple[str, ...] = (
    "warming_up",
    "running",
    "paused",
    "rolled_back",
    "completed",
    "aborted",
)
"""The evaluator's rollout statuses (``extproc.evaluator.rollout.Status``)."""
DECISION_ACTIONS: tuple[str, ...] = (
    "advance",
    "complete",
    "hold",
    "rollback",
    "pause",
    "resume",
    "promote",
    "abort",
)
"""Actions the evaluator records (its verdicts and the operator intents it applies); any other
value is counted as ``other`` so a typo cannot create new series."""


def _enum_labels(names: Iterable[tuple[str, int]], prefix: str) -> dict[int, str]:
    return {number: name.removeprefix(prefix).lower() for name, number in names}


_ASSIGNMENT = _enum_labels(Assignment.items(), "ASSIGNMENT_")
_ERROR_CLASS = _enum_labels(ErrorClass.items(), "ERROR_CLASS_")
_NO_ERROR = int(ErrorClass.ERROR_CLASS_NONE)
_STICKY = int(Assignment.ASSIGNMENT_STICKY)
_BOOL = {False: "false", True: "true"}


def _label(value: str, fallback: str) -> str:
    # An empty label value is the same as no label at all in Prometheus: name the absence.
    return value or fallback


class _Histogram:
    """One labelled histogram's buckets as plain numbers: ``le`` is inclusive, as Prometheus has
    it (a value on a bound counts in that bound's bucket)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf alone)
        self.total = 0.0

    def observe(self, x: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, x)] += 1
        self.total += x

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative counts by ``le``, as the exposition format lists them."""
        out, seen = [], 0
        for bound, n in zip((*map(floatToGoString, self.bounds), "+Inf"), self.counts, strict=True):
            seen += n
            out.append((bound, float(seen)))
        return out


@dataclass(slots=True)
class _VariantSeries:
    """The figures of one (experiment, variant, shadow), as plain numbers.

    Why not prometheus_client's labelled children: each of their increments takes a lock and a
    few calls, about ten of them per request, which made the metrics a tenth of the sidecar's CPU
    per access-log entry. These are only touched on the sidecar's event loop, and
    :class:`_RequestCollector` turns them into metric families at scrape time.
    """

    labels: tuple[str, str, str]
    price: TokenPrice | None = None
    by_outcome: dict[tuple[int, int], int] = field(default_factory=dict)
    duration: _Histogram = field(default_factory=lambda: _Histogram(LATENCY_BUCKETS_S))
    ttft: _Histogram = field(default_factory=lambda: _Histogram(LATENCY_BUCKETS_S))
    output_tps: _Histogram = field(default_factory=lambda: _Histogram(TOKENS_PER_S_BUCKETS))
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    response_bytes: int = 0
    cost: float = 0.0
    notices: int = 0
    answers: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ANSWER_SIGNALS, 0))


class _RequestCollector:
    """The per-request families of every :class:`_VariantSeries`, made at each scrape."""

    def __init__(self, series: Mapping[tuple[str, str, bool], _VariantSeries]) -> None:
        self.series = series

    def collect(self) -> Iterator[Metric]:
        labels = ["experiment", "variant", "shadow"]
        requests = CounterMetricFamily(
            "extproc_requests",
            "Requests seen by the sidecar, by variant, how the variant was assigned, and the "
            "error class (none for a complete response).",
            labels=[*labels, "assignment", "error_class"],
        )
        duration = HistogramMetricFamily(
            "extproc_request_duration_seconds",
            "Time from request start to the end of the response, successful requests only "
            "(errors are counted in extproc_requests_total), as in `extproc status`.",
            labels=labels,
        )
        ttft = HistogramMetricFamily(
            "extproc_time_to_first_token_seconds",
            "Time from request start to the first token (first SSE content chunk; first body "
            "byte of a JSON response), successful requests only.",
            labels=labels,
        )
        tokens = CounterMetricFamily(
            "extproc_tokens",
            "Tokens reported in the responses' usage, by type (prompt, completion, or "
            "cached_prompt: prompt tokens of successful requests served from the model "
            "server's prompt cache).",
            labels=[*labels, "type"],
        )
        response_bytes = CounterMetricFamily(
            "extproc_response_bytes", "Response body bytes sent to the client.", labels=labels
        )
        answers = CounterMetricFamily(
            "extproc_answers",
            "Answer signals of successful requests, by signal: tool_call, inspected (answer "
            "text checked), empty and refusal (of inspected), json_checked, json_invalid.",
            labels=[*labels, "signal"],
        )
        output_tps = HistogramMetricFamily(
            "extproc_output_tokens_per_second",
            "Generation speed of each streamed successful answer: tokens after the first over "
            "the time after the first token.",
            labels=labels,
        )
        cost = CounterMetricFamily(
            "extproc_cost",
            "Cost of the successful requests at their variant's price (the experiment file's "
            "currency).",
            labels=labels,
        )
        notices = CounterMetricFamily(
            "extproc_in_flight_notices",
            "In-flight notices: requests still open past the notice bound (not requests; the "
            "request is counted when it ends).",
            labels=labels,
        )
        for s in self.series.values():
            values = list(s.labels)
            for (assignment, error), n in s.by_outcome.items():
                requests.add_metric(
                    [
                        *values,
                        _ASSIGNMENT.get(assignment, "unknown"),
                        _ERROR_CLASS.get(error, "unknown"),
                    ],
                    n,
                )
            for family, h in ((duration, s.duration), (ttft, s.ttft), (output_tps, s.output_tps)):
                family.add_metric(values, h.buckets(), h.total)
            tokens.add_metric([*values, "prompt"], s.prompt_tokens)
            tokens.add_metric([*values, "completion"], s.completion_tokens)
            tokens.add_metric([*values, "cached_prompt"], s.cached_tokens)
            response_bytes.add_metric(values, s.response_bytes)
            for signal, n in s.answers.items():
                answers.add_metric([*values, signal], n)
            cost.add_metric(values, s.cost)
            notices.add_metric(values, s.notices)
        yield from (
            requests, duration, ttft, tokens, answers, output_tps, cost, notices, response_bytes
        )  # fmt: skip


class SidecarMetrics:
    """Per-request metrics from the sidecar's telemetry events, plus the sidecar's own health.

    Wire :meth:`observe` next to the telemetry writer's ``submit`` (or use :meth:`tee`), and
    refresh the gauges from the writer and the live routing, e.g. in ``serve_metrics``'s
    ``before_scrape`` hook so every scrape sees current values without a loop of its own.
    """

    def __init__(self, *, max_variants: int = 200) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.max_variants = max_variants
        reg = self.registry
        # Per request: plain numbers, made into families at scrape (see _VariantSeries).
        self._series: dict[tuple[str, str, bool], _VariantSeries] = {}
        reg.register(_RequestCollector(self._series))
        self.dropped = Counter(
            "extproc_telemetry_events_dropped",
            "Telemetry events dropped because the buffer was full while Redis was away.",
            registry=reg,
        )
        self.buffered = Gauge(
            "extproc_telemetry_events_buffered",
            "Telemetry events waiting in memory to be written to Redis.",
            registry=reg,
        )
        self.routing_version = Gauge(
            "extproc_routing_version",
            "Version of the routing config this replica applies (replicas should agree).",
            ["experiment"],
            registry=reg,
        )
        self.routing_weight = Gauge(
            "extproc_routing_weight_ratio",
            "Share of traffic this replica routes to each variant (0..1).",
            ["experiment", "variant"],
            registry=reg,
        )
        self.redis_up = Gauge(
            "extproc_redis_up",
            "1 if the last Redis operation of this replica succeeded, else 0.",
            registry=reg,
        )
        self.unmatched = Counter(
            "extproc_unmatched_requests",
            "Requests no experiment took (a fleet sidecar): passed through untouched.",
            registry=reg,
        )
        self.experiments = Gauge(
            "extproc_experiments_served",
            "Experiments this replica routes by (1 for a sidecar run from a file).",
            registry=reg,
        )
        self._overflow_warned = False
        self._dropped_seen = 0
        self._weights: dict[str, set[str]] = {}
        self._prices: dict[tuple[str, str], TokenPrice] = {}

    # --- per request -----------------------------------------------------------------------------

    def declare(
        self,
        experiment: str,
        variants: Iterable[str],
        prices: Mapping[str, TokenPrice | None] | None = None,
    ) -> None:
        """Create the series of known variants at zero, so ``rate()`` works from the first request,
        and learn the variants' prices (``extproc_cost_total`` counts only priced variants).

        Optional: without it a variant's series appear with its first request, and Prometheus
        cannot see that first increase.
        """
        for variant, price in (prices or {}).items():
            if price is not None:
                self._prices[(experiment, variant)] = price
        for variant in variants:
            self._variant(experiment, variant, False).by_outcome.setdefault((_STICKY, _NO_ERROR), 0)

    def _variant(self, experiment: str, variant: str, shadow: bool) -> _VariantSeries:
        key = (experiment, variant, shadow)
        series = self._series.get(key)
        if series is not None:
            return series
        if len(self._series) >= self.max_variants and experiment != OVERFLOW:
            # Not cached under ``key``: the cache, like the series, stays bounded.
            if not self._overflow_warned:
                self._overflow_warned = True
                log.warning(
                    "metrics: more than %d experiment/variant pairs; the rest are counted "
                    "under experiment=variant=%r",
                    self.max_variants,
                    OVERFLOW,
                )
            return self._variant(OVERFLOW, OVERFLOW, shadow)
        labels = (_label(experiment, "_none"), _label(variant, UNROUTED), _BOOL[shadow])
        series = _VariantSeries(labels, price=self._prices.get((experiment, variant)))
        self._series[key] = series
        return series

    def observe(self, event: TelemetryEvent) -> None:
        """Count one finished request; called once per request on the sidecar's event loop.

        No I/O and no allocation beyond the first request of a variant: a cached lookup, then
        additions to plain numbers (exposed at scrape time by :class:`_RequestCollector`).
        """
        s = self._variant(event.experiment, event.variant, event.shadow)
        if outcome.is_notice(event):
            s.notices += 1
            return
        error = event.error
        key = (event.assignment, error)
        s.by_outcome[key] = s.by_outcome.get(key, 0) + 1
        if outcome.is_forced(event):
            return  # tester traffic: counted above, apart, and in no comparison figure
        if error == _NO_ERROR:
            # Timings of successful requests only, as the evaluator's guardrails take them: a
            # fast 5xx would otherwise make a failing variant look quick.
            if event.HasField("duration_ms"):
                s.duration.observe(event.duration_ms / 1000.0)
            if event.HasField("first_token_ms"):
                s.ttft.observe(event.first_token_ms / 1000.0)
            self._answer(s, event)
        s.prompt_tokens += event.prompt_tokens
        s.completion_tokens += event.completion_tokens
        s.response_bytes += event.response_bytes

    @staticmethod
    def _answer(s: _VariantSeries, event: TelemetryEvent) -> None:
        """The figures of one successful request, as ``extproc status`` and the guardrails count
        them: answer signals, generation speed, cost and prompt-cache hits."""
        s.cached_tokens += event.cached_prompt_tokens
        if (cost := outcome.cost(event, s.price)) is not None:
            s.cost += cost
        a = s.answers
        if event.tool_calls:
            a["tool_call"] += 1
        if event.HasField("empty_answer"):
            a["inspected"] += 1
            a["empty"] += event.empty_answer
            a["refusal"] += event.refusal
        if event.HasField("json_valid"):
            a["json_checked"] += 1
            a["json_invalid"] += not event.json_valid
        if (tps := outcome.output_tokens_per_s(event)) is not None:
            s.output_tps.observe(tps)

    def tee(self, emit: Callable[[TelemetryEvent], None]) -> Callable[[TelemetryEvent], None]:
        """``emit`` that also observes: ``ObserverContext(emit=metrics.tee(writer.submit))``."""
        observe = self.observe

        def both(event: TelemetryEvent) -> None:
            observe(event)
            emit(event)

        return both

    # --- gauges ----------------------------------------------------------------------------------

    def set_telemetry(self, *, dropped_total: int, buffered: int) -> None:
        """Report the writer's cumulative drop count and its current buffer size.

        Takes the writer's running total (``WriterStats.dropped``) rather than single drops, so
        the writer needs no change; the counter moves by the difference and never goes back.
        """
        if dropped_total > self._dropped_seen:
            self.dropped.inc(dropped_total - self._dropped_seen)
            self._dropped_seen = dropped_total
        self.buffered.set(buffered)

    def set_routing(
        self, experiment: str, version: int, weights: Mapping[str, float] | None = None
    ) -> None:
        """Report the routing version (and weights in percent, as stored) this replica applies."""
        self.routing_version.labels(experiment).set(version)
        if weights is None:
            return
        old = self._weights.get(experiment, set())
        for variant, pct in weights.items():
            self.routing_weight.labels(experiment, variant).set(pct / 100.0)
        for gone in old - set(weights):
            self.routing_weight.remove(experiment, gone)
        self._weights[experiment] = set(weights)

    def forget_routing(self, experiment: str) -> None:
        """Drop an ended experiment's routing gauges: a replica no longer applies them. Its
        request counters stay (they are cumulative; Prometheus keeps their history)."""
        with contextlib.suppress(KeyError):
            self.routing_version.remove(experiment)
        for variant in self._weights.pop(experiment, set()):
            with contextlib.suppress(KeyError):
                self.routing_weight.remove(experiment, variant)

    def set_redis_up(self, up: bool) -> None:
        self.redis_up.set(1 if up else 0)


class EvaluatorMetrics:
    """The evaluator's decisions and where each rollout stands.

    Every evaluator replica exports ``extproc_evaluator_active``; dashboards read stage and
    weights from the replica where it is 1 (the lease holder), since a standby's view may lag.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.decisions = Counter(
            "extproc_evaluator_decisions",
            "Decisions the evaluator recorded in the audit log, by action (verdicts such as "
            "advance, hold, rollback, and operator intents such as pause or promote).",
            ["experiment", "action"],
            registry=reg,
        )
        self.stage_gauge = Gauge(
            "extproc_evaluator_stage",
            "Current rollout stage, 1-based as `extproc status` shows it.",
            ["experiment"],
            registry=reg,
        )
        self.weight = Gauge(
            "extproc_evaluator_weight_ratio",
            "Share of traffic the evaluator set for each variant at the current stage (0..1).",
            ["experiment", "variant"],
            registry=reg,
        )
        self.active_gauge = Gauge(
            "extproc_evaluator_active",
            "1 if this evaluator holds the experiment's lease (decides), 0 if standby.",
            ["experiment"],
            registry=reg,
        )
        self.status_gauge = Gauge(
            "extproc_evaluator_rollout_status",
            "1 for the rollout's current status, 0 for the others.",
            ["experiment", "status"],
            registry=reg,
        )
        self._known: set[str] = set()
        self._weights: dict[str, set[str]] = {}

    def _declare(self, experiment: str) -> None:
        # Every action at zero from the start: increase() then sees the first rollback.
        if experiment not in self._known:
            self._known.add(experiment)
            for action in (*DECISION_ACTIONS, OTHER):
                self.decisions.labels(experiment, action)

    def decision(self, experiment: str, action: str) -> None:
        """Count one recorded decision (call where the audit record is appended)."""
        self._declare(experiment)
        self.decisions.labels(experiment, action if action in DECISION_ACTIONS else OTHER).inc()

    def stage(self, experiment: str, stage_index: int, weights: Mapping[str, float]) -> None:
        """Report the stage (0-based index, as in ``RolloutState.stage``) and its weights (%)."""
        self._declare(experiment)
        self.stage_gauge.labels(experiment).set(stage_index + 1)
        old = self._weights.get(experiment, set())
        for variant, pct in weights.items():
            self.weight.labels(experiment, variant).set(pct / 100.0)
        for gone in old - set(weights):
            self.weight.remove(experiment, gone)
        self._weights[experiment] = set(weights)

    def active(self, experiment: str, active: bool) -> None:
        self._declare(experiment)
        self.active_gauge.labels(experiment).set(1 if active else 0)

    def rollout_status(self, experiment: str, status: str) -> None:
        """Report the rollout status as an enum: one series per status, the current one at 1."""
        self._declare(experiment)
        current = status if status in ROLLOUT_STATUSES else OTHER
        for s in (*ROLLOUT_STATUSES, OTHER):
            self.status_gauge.labels(experiment, s).set(1 if s == current else 0)


# --- serving ---------------------------------------------------------------------------------


class _WithoutCreated:
    """A registry's metrics without the ``_created`` samples of counters and histograms.

    In the text format those are separate gauge series, one per labelled child: they would
    double the series count of every counter for a timestamp no dashboard here reads.
    prometheus_client can only turn them off process-wide (``disable_created_metrics``), which
    would change other libraries' metrics too; filtering at exposition keeps it local.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():  # fresh Metric objects on every collect
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


async def serve_metrics(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    before_scrape: Callable[[], None] | None = None,
) -> web.AppRunner:
    """Serve ``GET /metrics`` on the running event loop; ``await runner.cleanup()`` stops it.

    aiohttp rather than prometheus_client's own thread server: the sidecar and the evaluator
    already run an asyncio loop, and a scrape then never races the loop's own updates.
    ``before_scrape`` refreshes gauges (telemetry buffer, routing version) at scrape time.
    ``port=0`` picks a free port: read it back with :func:`bound_port`.
    """

    exposed = _WithoutCreated(registry)

    async def metrics(_request: web.Request) -> web.Response:
        if before_scrape is not None:
            before_scrape()
        return web.Response(
            body=generate_latest(exposed), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The TCP port a runner from :func:`serve_metrics` listens on (useful with ``port=0``)."""
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    raise RuntimeError("metrics server is not listening on a TCP port")
