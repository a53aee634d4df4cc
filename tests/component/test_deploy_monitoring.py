"""Metrics are wired end to end: every sidecar and evaluator serves /metrics on a named port, the
optional monitoring component's PodMonitor scrapes exactly those ports, and its alert rules (like
the shipped Grafana dashboard) name only series extproc really exposes.

The PodMonitor and PrometheusRule are validated against the Prometheus Operator's models in
tests/component/test_deploy.py (every overlay with the component). Here: that they fit the pods and
the metrics. The metric names are taken from a real scrape of both components after every method ran
(tests/component/test_metrics.py), not from a list kept by hand.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.component.test_deploy import (
    OPTIONAL_COMPONENTS,
    OVERLAYS,
    containers,
    extproc_args,
    one_of,
    rendered,
    selects,
    workloads_of,
)
from tests.component.test_metrics import (
    _exposed_everything,
    check_queries,
    dashboard_queries,
    promql_parts,
)

pytestmark = pytest.mark.timeout(60)

MONITORING = ("monitoring",)
# Labels Prometheus (the Prometheus Operator's scrape config for a PodMonitor) puts on every
# series of a target.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "endpoint"}
# Series Prometheus makes itself for every target.
SYNTHETIC = {"up"}
# What the rules must cover (by alert name).
REQUIRED_ALERTS = {
    "ExtprocSidecarDown",
    "ExtprocNoSidecar",
    "ExtprocSidecarRoutingBehind",
    "ExtprocRedisErrors",
    "ExtprocTelemetryDropped",
    "ExtprocEvaluatorDown",
    "ExtprocNoActiveEvaluator",
    "ExtprocRolledBack",
}


def alert_rules() -> list[dict[str, Any]]:
    rule = one_of(rendered("dev", MONITORING), "PrometheusRule", "extproc")
    return [r for g in rule["spec"]["groups"] for r in g["rules"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_and_evaluate_serve_metrics_on_a_named_port(overlay: str) -> None:
    """Without --metrics the shipped Grafana dashboard would be empty: every `serve` and
    `evaluate` container serves /metrics beyond the pod's loopback, on its port named
    `metrics`."""
    seen = set()
    for w, c in containers(overlay):
        ns = extproc_args(c)
        if ns is None or ns.verb not in ("serve", "evaluate"):
            continue
        seen.add(ns.verb)
        name = f"{w['metadata']['name']}/{c['name']}"
        assert ns.metrics, f"{name} has no --metrics"
        host, _, port = ns.metrics.rpartition(":")
        assert host == "0.0.0.0", name
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports.get("metrics") == int(port), name
    assert seen == {"serve", "evaluate"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_podmonitor_scrapes_every_metrics_port(overlay: str) -> None:
    """The PodMonitor selects every pod with a `metrics` port, in its own namespace, and scrapes
    that port's /metrics."""
    docs = rendered(overlay, MONITORING)
    monitor = one_of(docs, "PodMonitor", "extproc")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")
    assert "namespaceSelector" not in monitor["spec"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    with_metrics = [
        w
        for w in workloads_of(docs)
        if any(
            p["name"] == "metrics"
            for c in w["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        )
    ]
    assert with_metrics
    for w in with_metrics:
        assert w["metadata"]["namespace"] == monitor["metadata"]["namespace"]
        assert selects(selector, w["spec"]["template"]["metadata"]["labels"]), w["metadata"]


def test_optional_components_stay_out_of_the_overlays() -> None:
    """Clusters without the Prometheus Operator still apply every overlay: no overlay renders a
    monitoring.coreos.com object unless the component is added."""
    for overlay in OVERLAYS:
        assert not [d for d in rendered(overlay) if "monitoring.coreos.com" in d["apiVersion"]]
    assert OPTIONAL_COMPONENTS == MONITORING


async def test_rules_and_dashboard_name_only_exposed_metrics() -> None:
    """Every metric an alert rule or a Grafana panel names is exposed by extproc (or is
    Prometheus's own `up`), every label it reads exists on it or on the target, and every label
    value it compares with is one that appears: a renamed metric or label would otherwise leave
    an alert that can never fire."""
    exposed = await _exposed_everything()
    docs = rendered("dev", MONITORING)
    monitor = one_of(docs, "PodMonitor", "extproc")
    job = f"{monitor['metadata']['namespace']}/{monitor['metadata']['name']}"
    scraped_containers = {
        c["name"]
        for w in workloads_of(docs)
        for c in w["spec"]["template"]["spec"]["containers"]
        if any(p["name"] == "metrics" for p in c.get("ports", []))
    }
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= REQUIRED_ALERTS
    queries = [(f"alert {r['alert']}", r["expr"]) for r in rules] + dashboard_queries()
    check_queries(
        queries,
        exposed,
        extra_metrics=frozenset(SYNTHETIC),
        target_labels=frozenset(TARGET_LABELS),
        target_values={"job": {job}, "container": scraped_containers},
    )
    for r in rules:
        # An annotation's $labels.X must survive the expression: an aggregation keeps only the
        # labels of its `by (...)`.
        groups = re.findall(r"\bby\s*\(([^)]*)\)", r["expr"])
        for label in re.findall(r"\{\{ \$labels\.(\w+) \}\}", json.dumps(r["annotations"])):
            for group in groups:
                kept = {x.strip() for x in group.split(",")}
                assert label in kept, f"alert {r['alert']}: $labels.{label} is aggregated away"


def test_rule_check_catches_an_unknown_metric() -> None:
    """The lexer the rule check relies on finds metric names inside the rules' syntax."""
    metrics, labels, values = promql_parts(
        'sum by (pod) (rate(extproc_telemetry_events_droped_total[5m])) > 0 or up{job="a/b"} == 0'
    )
    assert metrics == {"extproc_telemetry_events_droped_total", "up"}
    assert labels == {"pod", "job"}
    assert values == {("job", "a/b")}


def test_rules_parse_with_prometheus(tmp_path: Path, promtool: str) -> None:
    """Prometheus's own parser (`promtool check rules`) accepts the rule groups as shipped."""
    rule = one_of(rendered("dev", MONITORING), "PrometheusRule", "extproc")
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps({"groups": rule["spec"]["groups"]}))
    out = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def promtool_rule_test(
    promtool: str,
    tmp_path: Path,
    series: dict[str, str],
    firing: dict[str, list[dict[str, str]]],
) -> None:
    """`promtool test rules`: feed series (one sample a minute), expect exactly these alerts
    (by name, with their labels) firing at minute 10. Annotations are left out of the check:
    the expressions and their `for` are what is tested."""
    rule = one_of(rendered("dev", MONITORING), "PrometheusRule", "extproc")
    groups = [
        {**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]}
        for g in rule["spec"]["groups"]
    ]
    (tmp_path / "rules.yml").write_text(json.dumps({"groups": groups}))
    severities = {r["alert"]: r["labels"]["severity"] for r in alert_rules()}
    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "alert_rule_test": [
                    {
                        "eval_time": "10m",
                        "alertname": name,
                        "exp_alerts": [
                            {"exp_labels": {**labels, "severity": severities[name]}}
                            for labels in firing.get(name, [])
                        ],
                    }
                    for name in severities
                ],
            }
        ],
    }
    (tmp_path / "test.yml").write_text(json.dumps(tests))
    out = subprocess.run(
        [promtool, "test", "rules", "test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


JOB = 'job="llm-rollout/extproc"'


def healthy_series() -> dict[str, str]:
    return {
        f'up{{{JOB}, container="extproc", pod="gw-a"}}': "1x12",
        f'up{{{JOB}, container="extproc", pod="gw-b"}}': "1x12",
        f'up{{{JOB}, container="evaluator", pod="ev-a"}}': "1x12",
        f'up{{{JOB}, container="evaluator", pod="ev-b"}}': "1x12",
        'extproc_routing_version{experiment="e", pod="gw-a"}': "7x12",
        'extproc_routing_version{experiment="e", pod="gw-b"}': "7x12",
        'extproc_redis_up{pod="gw-a"}': "1x12",
        'extproc_redis_up{pod="gw-b"}': "1x12",
        'extproc_telemetry_events_dropped_total{pod="gw-a"}': "0x12",
        'extproc_evaluator_active{experiment="e", pod="ev-a"}': "1x12",
        'extproc_evaluator_active{experiment="e", pod="ev-b"}': "0x12",
        'extproc_evaluator_decisions_total{experiment="e", action="rollback", pod="ev-a"}': "0x12",
    }


def test_no_alert_fires_on_a_healthy_install(tmp_path: Path, promtool: str) -> None:
    promtool_rule_test(promtool, tmp_path, healthy_series(), {})


def test_each_alert_fires_on_its_failure(tmp_path: Path, promtool: str) -> None:
    """One failure of each kind at once, each raising its own alert and no other."""
    series = healthy_series()
    series[f'up{{{JOB}, container="extproc", pod="gw-b"}}'] = "1 1 1 0x9"
    series['extproc_routing_version{experiment="e", pod="gw-a"}'] = "7 7 8x10"
    series['extproc_redis_up{pod="gw-a"}'] = "1 1 0x10"
    series['extproc_telemetry_events_dropped_total{pod="gw-a"}'] = "0 0 0 0+10x9"
    series['extproc_evaluator_active{experiment="e", pod="ev-a"}'] = "1 1 1 0x9"
    series[f'up{{{JOB}, container="evaluator", pod="ev-b"}}'] = "1 1 1 0x9"
    series['extproc_evaluator_decisions_total{experiment="e", action="rollback", pod="ev-a"}'] = (
        "0x7 1x5"
    )
    promtool_rule_test(
        promtool,
        tmp_path,
        series,
        {
            "ExtprocSidecarDown": [
                {"job": "llm-rollout/extproc", "container": "extproc", "pod": "gw-b"}
            ],
            "ExtprocSidecarRoutingBehind": [{"experiment": "e"}],
            "ExtprocRedisErrors": [{"pod": "gw-a"}],
            "ExtprocTelemetryDropped": [{"pod": "gw-a"}],
            "ExtprocEvaluatorDown": [
                {"job": "llm-rollout/extproc", "container": "evaluator", "pod": "ev-b"}
            ],
            "ExtprocNoActiveEvaluator": [{"experiment": "e"}, {}],
            "ExtprocRolledBack": [{"experiment": "e"}],
        },
    )


def test_no_sidecar_at_all_is_critical(tmp_path: Path, promtool: str) -> None:
    series = {k: v for k, v in healthy_series().items() if 'container="extproc"' not in k}
    promtool_rule_test(promtool, tmp_path, series, {"ExtprocNoSidecar": [{}]})
