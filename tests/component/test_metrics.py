"""Prometheus metrics: observed events and gauges, scraped over real HTTP and parsed as Prometheus
parses them (prometheus_client's text parser)."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from extproc.config import Price
from extproc.telemetry.prometheus import (
    DECISION_ACTIONS,
    LATENCY_BUCKETS_S,
    OVERFLOW,
    UNROUTED,
    EvaluatorMetrics,
    SidecarMetrics,
    bound_port,
    serve_metrics,
)
from extproc.telemetry.v1.event_pb2 import Assignment, ErrorClass, TelemetryEvent

pytestmark = pytest.mark.timeout(30)

E = "chat-upgrade"


@dataclass
class Scrape:
    """One parsed scrape: sample values by (name, labels), and each family's type."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
    types: dict[str, str]
    content_type: str

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def value(self, name: str, **labels: str) -> float:
        got = self.get(name, **labels)
        assert got is not None, f"no sample {name}{labels}"
        return got


async def _scrape(url: str) -> Scrape:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as s, s.get(url) as resp:
        assert resp.status == 200
        text = await resp.text()
        ctype = resp.headers["Content-Type"]
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(samples, types, ctype)


@pytest.fixture
async def sidecar() -> AsyncIterator[tuple[SidecarMetrics, str, list[int]]]:
    m = SidecarMetrics()
    calls: list[int] = []
    runner = await serve_metrics(m.registry, "127.0.0.1", 0, before_scrape=lambda: calls.append(1))
    try:
        yield m, f"http://127.0.0.1:{bound_port(runner)}/metrics", calls
    finally:
        await runner.cleanup()


@pytest.fixture
async def evaluator() -> AsyncIterator[tuple[EvaluatorMetrics, str]]:
    m = EvaluatorMetrics()
    runner: web.AppRunner = await serve_metrics(m.registry, "127.0.0.1", 0)
    try:
        yield m, f"http://127.0.0.1:{bound_port(runner)}/metrics"
    finally:
        await runner.cleanup()


def event(variant: str = "canary", **kw: object) -> TelemetryEvent:
    fields: dict[str, object] = {
        "experiment": E,
        "variant": variant,
        "assignment": Assignment.ASSIGNMENT_STICKY,
        "status": 200,
        "duration_ms": 812.0,
        "first_token_ms": 120.0,
        "prompt_tokens": 30,
        "completion_tokens": 200,
        "response_bytes": 1500,
        "streamed": True,
    }
    fields.update(kw)
    return TelemetryEvent(**fields)  # type: ignore[arg-type]


async def test_sidecar_names_types_and_content_type(
    sidecar: tuple[SidecarMetrics, str, list[int]],
) -> None:
    m, url, _ = sidecar
    m.observe(event())
    m.set_telemetry(dropped_total=0, buffered=0)
    m.set_routing(E, 1, {"stable": 90, "canary": 10})
    m.set_redis_up(True)
    got = await _scrape(url)
    assert got.content_type.startswith("text/plain")
    assert not [name for name, _ in got.samples if name.endswith("_created")]
    assert {k: v for k, v in got.types.items() if k.startswith("extproc_")} == {
        "extproc_requests": "counter",
        "extproc_request_duration_seconds": "histogram",
        "extproc_time_to_first_token_seconds": "histogram",
        "extproc_tokens": "counter",
        "extproc_response_bytes": "counter",
        "extproc_answers": "counter",
        "extproc_output_tokens_per_second": "histogram",
        "extproc_cost": "counter",
        "extproc_in_flight_notices": "counter",
        "extproc_telemetry_events_dropped": "counter",
        "extproc_telemetry_events_buffered": "gauge",
        "extproc_routing_version": "gauge",
        "extproc_routing_weight_ratio": "gauge",
        "extproc_redis_up": "gauge",
        "extproc_unmatched_requests": "counter",
        "extproc_experiments_served": "gauge",
    }


async def test_observed_events_reach_counters_and_histograms(
    sidecar: tuple[SidecarMetrics, str, list[int]],
) -> None:
    m, url, _ = sidecar
    for _ in range(3):
        m.observe(event())
    m.observe(event(duration_ms=50.0, first_token_ms=20.0, completion_tokens=10))
    m.observe(event("stable", assignment=Assignment.ASSIGNMENT_FORCED))
    # A timeout: counted as an error, kept out of the latency histogram, no usage, no TTFT.
    m.observe(
        TelemetryEvent(
            experiment=E,
            variant="canary",
            assignment=Assignment.ASSIGNMENT_STICKY,
            status=504,
            error=ErrorClass.ERROR_CLASS_TIMEOUT,
            duration_ms=30_000.0,
        )
    )
    # A fast 5xx: its timings would make a failing variant look quick.
    m.observe(
        event(
            status=502,
            error=ErrorClass.ERROR_CLASS_UPSTREAM_5XX,
            duration_ms=5.0,
            first_token_ms=4.0,
            prompt_tokens=0,
            completion_tokens=0,
            response_bytes=0,
        )
    )
    got = await _scrape(url)
    canary = {"experiment": E, "variant": "canary", "shadow": "false"}
    ok = {"assignment": "sticky", "error_class": "none"}
    assert got.value("extproc_requests_total", **canary, **ok) == 4
    assert (
        got.value("extproc_requests_total", **canary, assignment="sticky", error_class="timeout")
        == 1
    )
    assert (
        got.value(
            "extproc_requests_total",
            experiment=E,
            variant="stable",
            shadow="false",
            assignment="forced",
            error_class="none",
        )
        == 1
    )

    dur = "extproc_request_duration_seconds"
    assert got.value(f"{dur}_count", **canary) == 4  # errors are not latencies
    assert got.value(f"{dur}_sum", **canary) == pytest.approx(3 * 0.812 + 0.05)
    assert got.value(f"{dur}_bucket", **canary, le="0.05") == 1
    assert got.value(f"{dur}_bucket", **canary, le="0.6") == 1
    assert got.value(f"{dur}_bucket", **canary, le="1.0") == 4
    assert got.value(f"{dur}_bucket", **canary, le="+Inf") == 4
    buckets = [k for k in got.samples if k[0] == f"{dur}_bucket" and ("variant", "canary") in k[1]]
    assert len(buckets) == len(LATENCY_BUCKETS_S) + 1
    assert min(LATENCY_BUCKETS_S) == 0.01
    assert max(LATENCY_BUCKETS_S) == 120.0

    ttft = "extproc_time_to_first_token_seconds"
    assert got.value(f"{ttft}_count", **canary) == 4
    assert got.value(f"{ttft}_sum", **canary) == pytest.approx(3 * 0.12 + 0.02)
    assert got.value(f"{ttft}_bucket", **canary, le="0.025") == 1

    assert got.value("extproc_tokens_total", **canary, type="prompt") == 4 * 30
    assert got.value("extproc_tokens_total", **canary, type="completion") == 3 * 200 + 10
    assert got.value("extproc_response_bytes_total", **canary) == 4 * 1500


async def test_absent_optional_fields_are_not_zeros(
    sidecar: tuple[SidecarMetrics, str, list[int]],
) -> None:
    m, url, _ = sidecar
    m.observe(TelemetryEvent(experiment=E, variant="stable", status=200))
    got = await _scrape(url)
    stable = {"experiment": E, "variant": "stable", "shadow": "false"}
    outcome = {"assignment": "unspecified", "error_class": "none"}
    assert got.value("extproc_requests_total", **stable, **outcome) == 1
    assert got.value("extproc_request_duration_seconds_count", **stable) == 0
    assert got.value("extproc_time_to_first_token_seconds_count", **stable) == 0
    assert got.value("extproc_tokens_total", **stable, type="prompt") == 0


async def test_shadow_and_unrouted_requests_are_labelled_apart(
    sidecar: tuple[SidecarMetrics, str, list[int]],
) -> None:
    m, url, _ = sidecar
    m.observe(event("canary", shadow=True))
    m.observe(
        TelemetryEvent(
            experiment=E,
            assignment=Assignment.ASSIGNMENT_FORCED,
            status=400,
            error=ErrorClass.ERROR_CLASS_CLIENT_ERROR,
        )
    )
    got = await _scrape(url)
    assert (
        got.value(
            "extproc_requests_total",
            experiment=E,
            variant="canary",
            shadow="true",
            assignment="sticky",
            error_class="none",
        )
        == 1
    )
    assert (
        got.value(
            "extproc_requests_total",
            experiment=E,
            variant=UNROUTED,
            shadow="false",
            assignment="forced",
            error_class="client_error",
        )
        == 1
    )
    primary = {"experiment": E, "variant": "canary", "shadow": "false"}
    assert got.get("extproc_request_duration_seconds_count", **primary) is None


async def test_declare_creates_zero_series(
    sidecar: tuple[SidecarMetrics, str, list[int]],
) -> None:
    m, url, _ = sidecar
    m.declare(E, ["stable", "canary"])
    got = await _scrape(url)
    for v in ("stable", "canary"):
        labels = {"experiment": E, "variant": v, "shadow": "false"}
        outcome = {"assignment": "sticky", "error_class": "none"}
        assert got.value("extproc_requests_total", **labels, **outcome) == 0
        assert got.value("extproc_request_duration_seconds_count", **labels) == 0


async def test_series_stay_bounded(sidecar: tuple[SidecarMetrics, str, list[int]]) -> None:
    m, url, _ = sidecar
    m.max_variants = 2
    for i in range(50):
        m.observe(event(f"v{i}"))
    got = await _scrape(url)
    variants = {
        dict(labels)["variant"] for name, labels in got.samples if name == "extproc_requests_total"
    }
    assert variants == {"v0", "v1", OVERFLOW}
    assert (
        got.value(
            "extproc_requests_total",
            experiment=OVERFLOW,
            variant=OVERFLOW,
            shadow="false",
            assignment="sticky",
            error_class="none",
        )
        == 48
    )


async def test_gauges_and_dropped_counter(
    sidecar: tuple[SidecarMetrics, str, list[int]],
) -> None:
    m, url, calls = sidecar
    m.set_telemetry(dropped_total=5, buffered=100)
    m.set_telemetry(dropped_total=12, buffered=7)
    m.set_routing(E, 3, {"stable": 95, "canary": 5})
    m.set_redis_up(False)
    got = await _scrape(url)
    assert got.value("extproc_telemetry_events_dropped_total") == 12
    assert got.value("extproc_telemetry_events_buffered") == 7
    assert got.value("extproc_routing_version", experiment=E) == 3
    assert got.value("extproc_routing_weight_ratio", experiment=E, variant="canary") == 0.05
    assert got.value("extproc_routing_weight_ratio", experiment=E, variant="stable") == 0.95
    assert got.value("extproc_redis_up") == 0

    # A writer restarted with a smaller total never makes the counter go back.
    m.set_telemetry(dropped_total=3, buffered=0)
    m.set_routing(E, 4, {"stable": 100})
    m.set_redis_up(True)
    got = await _scrape(url)
    assert got.value("extproc_telemetry_events_dropped_total") == 12
    assert got.value("extproc_routing_version", experiment=E) == 4
    assert got.get("extproc_routing_weight_ratio", experiment=E, variant="canary") is None
    assert got.value("extproc_redis_up") == 1
    assert len(calls) == 2  # before_scrape ran once per scrape


async def test_tee_observes_and_forwards(sidecar: tuple[SidecarMetrics, str, list[int]]) -> None:
    m, url, _ = sidecar
    sent: list[TelemetryEvent] = []
    emit = m.tee(sent.append)
    ev = event()
    emit(ev)
    assert sent == [ev]
    got = await _scrape(url)
    assert (
        got.value(
            "extproc_requests_total",
            experiment=E,
            variant="canary",
            shadow="false",
            assignment="sticky",
            error_class="none",
        )
        == 1
    )


async def test_instances_have_their_own_registries() -> None:
    a, b = SidecarMetrics(), SidecarMetrics()
    a.observe(event())
    runner_a = await serve_metrics(a.registry, "127.0.0.1", 0)
    runner_b = await serve_metrics(b.registry, "127.0.0.1", 0)
    try:
        got_a = await _scrape(f"http://127.0.0.1:{bound_port(runner_a)}/metrics")
        got_b = await _scrape(f"http://127.0.0.1:{bound_port(runner_b)}/metrics")
    finally:
        await runner_a.cleanup()
        await runner_b.cleanup()
    key = {"experiment": E, "variant": "canary", "shadow": "false"}
    assert got_a.value("extproc_request_duration_seconds_count", **key) == 1
    assert got_b.get("extproc_request_duration_seconds_count", **key) is None


async def test_evaluator_metrics(evaluator: tuple[EvaluatorMetrics, str]) -> None:
    m, url = evaluator
    m.active(E, True)
    m.stage(E, 0, {"stable": 98, "canary": 2})
    m.rollout_status(E, "running")
    m.decision(E, "advance")
    m.stage(E, 1, {"stable": 95, "canary": 5})
    m.decision(E, "hold")
    m.decision(E, "hold")
    m.decision(E, "rollback")
    m.decision(E, "something-new")
    m.rollout_status(E, "rolled_back")
    m.active("other-exp", False)
    got = await _scrape(url)
    assert {k: v for k, v in got.types.items() if k.startswith("extproc_")} == {
        "extproc_evaluator_decisions": "counter",
        "extproc_evaluator_stage": "gauge",
        "extproc_evaluator_weight_ratio": "gauge",
        "extproc_evaluator_active": "gauge",
        "extproc_evaluator_rollout_status": "gauge",
    }
    dec = "extproc_evaluator_decisions_total"
    assert got.value(dec, experiment=E, action="advance") == 1
    assert got.value(dec, experiment=E, action="hold") == 2
    assert got.value(dec, experiment=E, action="rollback") == 1
    assert got.value(dec, experiment=E, action="other") == 1
    for action in DECISION_ACTIONS:  # every action exists from the start, at zero if unused
        assert got.value(dec, experiment="other-exp", action=action) == 0
    assert got.value("extproc_evaluator_stage", experiment=E) == 2  # 1-based
    assert got.value("extproc_evaluator_weight_ratio", experiment=E, variant="canary") == 0.05
    assert got.value("extproc_evaluator_active", experiment=E) == 1
    assert got.value("extproc_evaluator_active", experiment="other-exp") == 0
    status = "extproc_evaluator_rollout_status"
    assert got.value(status, experiment=E, status="rolled_back") == 1
    assert got.value(status, experiment=E, status="running") == 0


async def test_serve_metrics_unknown_path_is_404(
    sidecar: tuple[SidecarMetrics, str, list[int]],
) -> None:
    _, url, calls = sidecar
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(timeout=timeout) as s,
        s.get(url.replace("/metrics", "/nope")) as resp,
    ):
        assert resp.status == 404
    assert calls == []


# --- the Grafana dashboard ---------------------------------------------------------------------

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "extproc-dashboard.json"
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__range": "1h",
    "$experiment": E,
    "$variant": "[^_].*",
}
TARGET_LABELS = {"instance", "job"}  # added by Prometheus at scrape time
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{([^}]*)\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHER = re.compile(r'\s*([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*")\s*')
_IDENT = re.compile(r"(?<![\w.$])[a-zA-Z_:][\w:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "group_left", "group_right"}
_LABEL_VALUES = re.compile(r"^label_values\((?:(.*),\s*)?(\w+)\)$")


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and annotation of the dashboard."""
    doc = json.loads(DASHBOARD.read_text())
    out: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            out.extend((f"panel {p['title']!r}", t["expr"]) for t in p.get("targets", []))
            walk(p.get("panels", []))

    walk(doc["panels"])
    out += [
        (f"annotation {a['name']!r}", a["expr"]) for a in doc["annotations"]["list"] if "expr" in a
    ]
    return out


def variable_queries() -> list[tuple[str, str]]:
    """(variable, selector) for each ``label_values(selector, label)`` template variable."""
    doc = json.loads(DASHBOARD.read_text())
    out = []
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = _LABEL_VALUES.match(query)
            assert m, f"variable {var['name']}: unexpected query {query!r}"
            out.append((var["name"], f"{m.group(1)}", m.group(2)))
    return [(f"variable {name} by {label}", sel) for name, sel, label in out]


def promql_parts(expr: str) -> tuple[set[str], set[str], set[tuple[str, str]]]:
    """Metric names, label names and (label, literal value) equality matchers of an expression.

    A small lexer rather than a full parser: strings, label matchers, range selectors and
    grouping clauses are taken out first, so the identifiers left are metric names, function
    names (followed by a parenthesis) and keywords.
    """
    labels: set[str] = set()
    values: set[tuple[str, str]] = set()
    for body in _MATCHERS.findall(expr):
        for part in _STRING.sub(lambda m: m.group(0).replace(",", "\x00"), body).split(","):
            if not part.strip():
                continue
            m = _MATCHER.fullmatch(part.replace("\x00", ","))
            assert m, f"cannot read matcher {part!r} in {expr!r}"
            labels.add(m.group(1))
            if m.group(2) == "=" and "$" not in m.group(3):
                values.add((m.group(1), json.loads(m.group(3))))
    rest = _RANGE.sub(" ", _MATCHERS.sub(" ", _STRING.sub('""', expr)))
    for group in _GROUPING.findall(rest):
        labels.update(x.strip() for x in group.split(",") if x.strip())
    rest = _GROUPING.sub(" ", rest)
    metrics = set()
    for m in _IDENT.finditer(rest):
        after = rest[m.end() :].lstrip()
        if not after.startswith("(") and m.group(0).lower() not in _KEYWORDS:
            metrics.add(m.group(0))
    return metrics, labels, values


async def _exposed_everything() -> Scrape:
    """A scrape of both components after every method ran: all the series they can expose."""
    side, ev = SidecarMetrics(), EvaluatorMetrics()
    side.observe(event())
    side.observe(event(error=ErrorClass.ERROR_CLASS_UPSTREAM_5XX, status=502))
    side.observe(event(shadow=True))
    side.observe(event(assignment=Assignment.ASSIGNMENT_FORCED))
    side.observe(event(in_flight=True))
    for error in (ErrorClass.ERROR_CLASS_TIMEOUT, ErrorClass.ERROR_CLASS_CLIENT_ERROR):
        side.observe(event(error=error, status=504))
    side.observe(event(error=ErrorClass.ERROR_CLASS_CLIENT_DISCONNECT))
    side.set_telemetry(dropped_total=1, buffered=1)
    side.set_routing(E, 1, {"stable": 95, "canary": 5})
    side.set_redis_up(True)
    ev.decision(E, "rollback")
    ev.stage(E, 0, {"stable": 98, "canary": 2})
    ev.active(E, True)
    ev.rollout_status(E, "running")
    merged = Scrape({}, {}, "")
    for registry in (side.registry, ev.registry):
        runner = await serve_metrics(registry, "127.0.0.1", 0)
        try:
            got = await _scrape(f"http://127.0.0.1:{bound_port(runner)}/metrics")
        finally:
            await runner.cleanup()
        merged.samples.update(got.samples)
        merged.types.update(got.types)
    return merged


def check_queries(
    queries: list[tuple[str, str]],
    exposed: Scrape,
    *,
    extra_metrics: frozenset[str] = frozenset(),
    target_labels: frozenset[str] = frozenset(TARGET_LABELS),
    target_values: dict[str, set[str]] | None = None,
) -> set[str]:
    """Every metric a query names is exposed (or in ``extra_metrics``), every label it reads
    exists on it or on the scrape target, and every label value it compares with appears (in
    the scrape or among ``target_values``). Returns the metric names the queries use."""
    labels_of: dict[str, set[str]] = {name: set() for name in extra_metrics}
    values_of: dict[tuple[str, str], set[str]] = {}
    for name, sample_labels in exposed.samples:
        labels_of.setdefault(name, set()).update(k for k, _ in sample_labels)
        for k, v in sample_labels:
            values_of.setdefault((name, k), set()).add(v)
    used: set[str] = set()
    for where, expr in queries:
        metrics, labels, values = promql_parts(expr)
        assert metrics, f"{where}: no metric in {expr!r}"
        unknown = metrics - set(labels_of)
        assert not unknown, f"{where}: {sorted(unknown)} not exposed (in {expr!r})"
        known_labels = set().union(*(labels_of[m] for m in metrics)) | target_labels
        assert labels <= known_labels, f"{where}: labels {sorted(labels - known_labels)}"
        for label, value in values:
            seen = set().union(*(values_of.get((m, label), set()) for m in metrics))
            seen |= (target_values or {}).get(label, set())
            assert value in seen, f"{where}: {label}={value!r} never appears (have {seen})"
        used |= metrics
    return used


async def test_dashboard_uses_only_exposed_metrics_and_labels() -> None:
    exposed = await _exposed_everything()
    queries = dashboard_queries() + variable_queries()
    assert len(queries) >= 20
    used = check_queries(queries, exposed)
    # Every family of both components has a place on the dashboard.
    families = {n for n in exposed.types if n.startswith("extproc_")}
    shown = {f for f in families if any(u == f or u.startswith(f + "_") for u in used)}
    assert shown == families


def test_dashboard_is_well_formed() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"]
    assert doc["title"]
    assert doc["schemaVersion"] >= 36
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    names = {v["name"] for v in doc["templating"]["list"]}
    assert {"datasource", "experiment", "variant"} <= names
    for p in doc["panels"]:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"])
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}"
            assert p["targets"], p["title"]


def test_dashboard_queries_parse_with_prometheus(tmp_path: Path, promtool: str) -> None:
    """Prometheus's own parser (``promtool check rules``) accepts every dashboard query."""
    rules = []
    for i, (_where, expr) in enumerate(dashboard_queries()):
        for var, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(rules)} rules found" in out.stdout


def test_promql_parts_reads_what_the_dashboard_writes() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (variant, le) (rate(extproc_request_duration_seconds_"
        'bucket{experiment="$experiment", shadow="false", variant=~"a,b"}[$__rate_interval])))'
        " / on (instance) group_left max(x_y and bool z)"
    )
    metrics, labels, values = promql_parts(expr)
    assert metrics == {"extproc_request_duration_seconds_bucket", "x_y", "z"}
    assert labels == {"variant", "le", "experiment", "shadow", "instance"}
    assert values == {("shadow", "false")}


async def test_answer_signals_cost_and_traffic_apart(
    sidecar: tuple[SidecarMetrics, str, list[int]],
) -> None:
    """Counted as `extproc status` and the guardrails count them: forced tester requests only in
    extproc_requests_total, in-flight notices never as requests, answer signals of successes."""
    m, url, _ = sidecar
    m.declare(E, ["stable", "canary"], {"canary": Price(input_per_mtok=1.0, output_per_mtok=2.0)})
    signals = {"tool_calls": True, "empty_answer": False, "refusal": True, "json_valid": False}
    m.observe(event(cached_prompt_tokens=12, **signals))  # 199 tokens after the first, 692 ms
    m.observe(event(empty_answer=True, refusal=False, json_valid=True))
    m.observe(event(status=502, error=ErrorClass.ERROR_CLASS_UPSTREAM_5XX, tool_calls=True))
    m.observe(event(assignment=Assignment.ASSIGNMENT_FORCED, cached_prompt_tokens=99, **signals))
    m.observe(event(in_flight=True, status=0))
    got = await _scrape(url)
    canary = {"experiment": E, "variant": "canary", "shadow": "false"}
    requests = {
        (dict(labels)["assignment"], dict(labels)["error_class"]): v
        for (name, labels), v in got.samples.items()
        if name == "extproc_requests_total" and ("variant", "canary") in labels and v
    }
    assert requests == {("sticky", "none"): 2, ("sticky", "upstream_5xx"): 1, ("forced", "none"): 1}
    assert got.value("extproc_in_flight_notices_total", **canary) == 1
    answers = {
        s: got.value("extproc_answers_total", **canary, signal=s)
        for s in ("tool_call", "inspected", "empty", "refusal", "json_checked", "json_invalid")
    }
    assert answers == {
        "tool_call": 1,  # the failed request's tool call is not an answer's
        "inspected": 2,
        "empty": 1,
        "refusal": 1,
        "json_checked": 2,
        "json_invalid": 1,
    }
    assert got.value("extproc_tokens_total", **canary, type="cached_prompt") == 12
    assert got.value("extproc_request_duration_seconds_count", **canary) == 2
    tps = "extproc_output_tokens_per_second"
    assert got.value(f"{tps}_count", **canary) == 2
    assert got.value(f"{tps}_sum", **canary) == pytest.approx(2 * 199 / 0.692)
    # Two successful assigned requests, at the canary's price; stable has none.
    assert got.value("extproc_cost_total", **canary) == pytest.approx(2 * (30 + 2 * 200) / 1e6)
    assert got.value("extproc_cost_total", **canary | {"variant": "stable"}) == 0
