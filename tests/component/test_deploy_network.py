"""The production overlay's network policy does what deploy/components/network-policy says.

No cluster and no CNI here: the rendered NetworkPolicies are evaluated with the semantics of the
Kubernetes API (a pod selected by a policy of a type accepts only what some rule of that type
allows; a rule admits a peer when one of its peers and one of its ports match; namespaceSelector
and podSelector in one peer must both match) for the connections that matter: Envoy to the
sidecar, Prometheus to the metrics ports, anyone to the dashboard, the extproc parts to Redis.
Istio's PeerAuthentication and AuthorizationPolicy are checked against the pods and ports they
protect; their schemas are checked with Istio's models in tests/component/test_deploy.py.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.component.test_deploy import (
    ISTIO_ROOT_NAMESPACE,
    NAMESPACE,
    objects,
    one,
    workloads,
)

pytestmark = pytest.mark.timeout(60)

PRODUCTION = "external-redis"
MONITORING_NAMESPACE = "monitoring"
SIDECAR_GRPC = 50051
METRICS = 9090
EXTERNAL_REDIS_IP = "10.20.30.40"
NS_LABEL = "kubernetes.io/metadata.name"  # every namespace carries its name as this label


@dataclass(frozen=True)
class Peer:
    """One end of a connection: a pod (namespace, labels) or an address outside the cluster."""

    namespace: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    ip: str = ""

    def namespace_labels(self) -> dict[str, str]:
        return {NS_LABEL: self.namespace}


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions; {} selects everything)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def peer_matches(rule_peer: dict[str, Any], policy_ns: str, peer: Peer) -> bool:
    if "ipBlock" in rule_peer:
        if not peer.ip:
            return False
        block = rule_peer["ipBlock"]
        ip = ipaddress.ip_address(peer.ip)
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(x) for x in block.get("except", [])
        )
    if not peer.namespace:  # an address outside the cluster matches ipBlocks only
        return False
    if "namespaceSelector" in rule_peer:
        if not matches(rule_peer["namespaceSelector"], peer.namespace_labels()):
            return False
    elif peer.namespace != policy_ns:
        return False
    return matches(rule_peer.get("podSelector", {}), peer.labels)


def allowed(
    policies: list[dict[str, Any]], direction: str, pod: Peer, other: Peer, port: int, proto: str
) -> bool:
    """Whether `pod` accepts (Ingress) or may open (Egress) a connection with `other` on port."""
    kind, peers_key = ("Ingress", "from") if direction == "ingress" else ("Egress", "to")
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == pod.namespace
        and kind in p["spec"].get("policyTypes", ["Ingress"])
        and matches(p["spec"]["podSelector"], pod.labels)
    ]
    if not selecting:
        return True
    for p in selecting:
        for rule in p["spec"].get(direction, []):
            peers = rule.get(peers_key)
            if peers is not None and not any(
                peer_matches(x, p["metadata"]["namespace"], other) for x in peers
            ):
                continue
            ports = rule.get("ports")
            if ports is None or any(
                x["port"] == port and x.get("protocol", "TCP") == proto for x in ports
            ):
                return True
    return False


def pod(overlay: str, name: str) -> Peer:
    (w,) = [x for x in workloads(overlay) if x["metadata"]["name"] == name]
    return Peer(NAMESPACE, dict(w["spec"]["template"]["metadata"]["labels"]))


def ingress_gateway(overlay: str) -> Peer:
    """An Istio ingress gateway pod: the labels the Gateway and the EnvoyFilter select."""
    (gateway,) = objects(overlay, "Gateway")
    return Peer(ISTIO_ROOT_NAMESPACE, dict(gateway["spec"]["selector"]))


STRANGER = Peer(NAMESPACE, {"app.kubernetes.io/name": "something-else"})
ELSEWHERE = Peer("default", {"app": "web"})
PROMETHEUS = Peer(MONITORING_NAMESPACE, {"app.kubernetes.io/name": "prometheus"})
DNS = Peer("kube-system", {"k8s-app": "kube-dns"})
REDIS = Peer(ip=EXTERNAL_REDIS_IP)
INTERNET = Peer(ip="203.0.113.9")


def mesh_client_labels() -> dict[str, str]:
    """The labels of in-mesh callers, as the istio-sidecar topology's EnvoyFilter selects them."""
    (ef,) = objects("istio-sidecar", "EnvoyFilter")
    return dict(ef["spec"]["workloadSelector"]["labels"])


def test_only_envoy_reaches_the_sidecar() -> None:
    """The sidecar's gRPC port admits the Istio ingress gateway and in-mesh callers (the pods
    the EnvoyFilters patch), nobody else; its metrics port admits the monitoring namespace."""
    policies = objects(PRODUCTION, "NetworkPolicy")
    sidecar = pod(PRODUCTION, "extproc-sidecar")
    gateway = ingress_gateway(PRODUCTION)
    caller = Peer("default", mesh_client_labels())

    def ingress(other: Peer, port: int) -> bool:
        return allowed(policies, "ingress", sidecar, other, port, "TCP")

    assert ingress(gateway, SIDECAR_GRPC)
    assert ingress(caller, SIDECAR_GRPC)
    for other in (STRANGER, ELSEWHERE, PROMETHEUS, Peer(ISTIO_ROOT_NAMESPACE, {"app": "istiod"})):
        assert not ingress(other, SIDECAR_GRPC), other
    assert ingress(PROMETHEUS, METRICS)
    assert not ingress(STRANGER, METRICS)
    assert not ingress(gateway, 6379)


def test_metrics_only_from_the_monitoring_namespace() -> None:
    """Every extproc part with a metrics port accepts scrapes from the monitoring namespace and
    from no other pod."""
    policies = objects(PRODUCTION, "NetworkPolicy")
    checked = 0
    for w in workloads(PRODUCTION):
        (c, *_) = w["spec"]["template"]["spec"]["containers"]
        if not any(p["name"] == "metrics" for p in c.get("ports", [])):
            continue
        checked += 1
        target = pod(PRODUCTION, w["metadata"]["name"])
        assert allowed(policies, "ingress", target, PROMETHEUS, METRICS, "TCP")
        assert not allowed(policies, "ingress", target, STRANGER, METRICS, "TCP")
        assert not allowed(policies, "ingress", target, ELSEWHERE, METRICS, "TCP")
    assert checked == 2


def test_dashboard_reads_and_feedback_only_from_labelled_clients() -> None:
    """The dashboard shows figures and captured texts: not only its actions but its pages are
    closed to the cluster, open to pods labelled extproc/dashboard-client (your authenticating
    proxy). Feedback likewise for extproc/feedback-client."""
    policies = objects(PRODUCTION, "NetworkPolicy")
    for name, port, label in (
        ("extproc-dashboard", 8080, "extproc/dashboard-client"),
        ("extproc-quality", 8090, "extproc/feedback-client"),
    ):
        target = pod(PRODUCTION, name)
        client = Peer("default", {label: "true"})
        assert allowed(policies, "ingress", target, client, port, "TCP"), name
        for other in (STRANGER, ELSEWHERE, PROMETHEUS, ingress_gateway(PRODUCTION)):
            assert not allowed(policies, "ingress", target, other, port, "TCP"), (name, other)


def test_egress_is_dns_redis_and_istiod() -> None:
    """Every extproc part may resolve names, reach Redis (plain and TLS port) and istiod, and
    nothing else by default; the quality worker also the model listener and HTTPS (judge), the
    evaluator HTTPS (webhook)."""
    policies = objects(PRODUCTION, "NetworkPolicy")
    istiod = Peer(ISTIO_ROOT_NAMESPACE, {"app": "istiod"})
    extra = {"extproc-quality": {80, 443, 8000, 8080, 10000}, "extproc-evaluator": {443}}
    for name in ("extproc-sidecar", "extproc-evaluator", "extproc-quality", "extproc-dashboard"):
        source = pod(PRODUCTION, name)
        assert allowed(policies, "egress", source, DNS, 53, "UDP"), name
        assert allowed(policies, "egress", source, REDIS, 6379, "TCP"), name
        assert allowed(policies, "egress", source, REDIS, 6380, "TCP"), name
        assert allowed(policies, "egress", source, istiod, 15012, "TCP"), name
        assert not allowed(policies, "egress", source, STRANGER, 53, "UDP"), name
        for port in (80, 443, 8000, 8080, 10000, 25):
            want = port in extra.get(name, set())
            assert allowed(policies, "egress", source, INTERNET, port, "TCP") == want, (name, port)


def test_every_extproc_part_is_isolated() -> None:
    """No extproc workload of the production overlay is left open: each is selected by an
    ingress and an egress policy."""
    policies = objects(PRODUCTION, "NetworkPolicy")
    for w in workloads(PRODUCTION):
        labels = w["spec"]["template"]["metadata"]["labels"]
        for kind in ("Ingress", "Egress"):
            assert any(
                kind in p["spec"].get("policyTypes", ["Ingress"])
                and matches(p["spec"]["podSelector"], labels)
                for p in policies
            ), f"{w['metadata']['name']} has no {kind} policy"


def test_the_evaluator_of_these_checks_rejects_what_it_should() -> None:
    """The policy evaluation above is only worth something if it tells rules apart."""
    policy = {
        "metadata": {"namespace": "n"},
        "spec": {
            "podSelector": {"matchLabels": {"a": "1"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": "m"}
                            },
                            "podSelector": {"matchLabels": {"b": "2"}},
                        }
                    ],
                    "ports": [{"port": 1}],
                }
            ],
        },
    }
    target = Peer("n", {"a": "1"})
    assert allowed([policy], "ingress", target, Peer("m", {"b": "2"}), 1, "TCP")
    assert not allowed([policy], "ingress", target, Peer("m", {"b": "3"}), 1, "TCP")
    assert not allowed([policy], "ingress", target, Peer("n", {"b": "2"}), 1, "TCP")
    assert not allowed([policy], "ingress", target, Peer("m", {"b": "2"}), 2, "TCP")
    assert allowed([policy], "ingress", Peer("n", {"a": "9"}), STRANGER, 2, "TCP")
    in_two = {"matchExpressions": [{"key": "a", "operator": "In", "values": ["2"]}]}
    assert not matches(in_two, {"a": "1"})


def test_istio_requires_mtls_and_lets_only_the_gateway_call_the_sidecar() -> None:
    """Mutual TLS is STRICT for the namespace; only the metrics port is PERMISSIVE (a Prometheus
    outside the mesh scrapes it), on the pods that serve metrics there. The sidecar's gRPC port
    answers the ingress gateway's identity only; the evaluator serves metrics only."""
    peer_auths = {p["metadata"]["name"]: p for p in objects(PRODUCTION, "PeerAuthentication")}
    default = peer_auths.pop("default")
    assert default["metadata"]["namespace"] == NAMESPACE
    assert "selector" not in default["spec"]
    assert default["spec"]["mtls"]["mode"] == "STRICT"
    for pa in peer_auths.values():
        assert pa["spec"]["mtls"]["mode"] == "STRICT"
        assert pa["spec"]["portLevelMtls"] == {str(METRICS): {"mode": "PERMISSIVE"}}
        selected = [
            w
            for w in workloads(PRODUCTION)
            if matches(pa["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        ]
        for w in selected:
            for c in w["spec"]["template"]["spec"]["containers"]:
                for p in c.get("ports", []):
                    if p["containerPort"] == METRICS:
                        assert p["name"] == "metrics"

    policies = {p["metadata"]["name"]: p for p in objects(PRODUCTION, "AuthorizationPolicy")}
    sidecar = policies["extproc-sidecar"]["spec"]
    labels = one(PRODUCTION, "Deployment", "extproc-sidecar")["spec"]["template"]["metadata"][
        "labels"
    ]
    assert matches(sidecar["selector"], labels)
    assert sidecar["action"] == "ALLOW"
    grpc_rules = [
        r for r in sidecar["rules"] if r["to"][0]["operation"]["ports"] == [str(SIDECAR_GRPC)]
    ]
    (grpc_rule,) = grpc_rules
    (source,) = grpc_rule["from"]
    for principal in source["source"]["principals"]:
        assert principal.startswith(f"cluster.local/ns/{ISTIO_ROOT_NAMESPACE}/sa/"), principal
    for r in sidecar["rules"]:
        if r is not grpc_rule:
            assert r["to"][0]["operation"]["ports"] == [str(METRICS)]
    evaluator = policies["extproc-evaluator"]["spec"]
    assert [r["to"][0]["operation"]["ports"] for r in evaluator["rules"]] == [[str(METRICS)]]
