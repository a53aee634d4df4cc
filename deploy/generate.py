"""Write the generated files that docker-compose.yml and deploy/ ship; rerun after edits.

Why a script: the Envoy bootstraps for docker-compose and for the Kubernetes Envoy pod differ from
envoy/envoy.yaml only in addresses (service names, the pod's loopback), and `extproc envoy-config`
has no flag for per-variant upstream addresses, so they are rendered here with
``extproc.envoyconf.bootstrap.render``; the Kubernetes one also gets a readiness listener for the
kubelet. The Istio EnvoyFilters carry the very filter configs that render produces (early header
mutation, ext_proc route and observe), pointed at Istio's cluster for the sidecar Service. The
Kubernetes ConfigMap of the experiment is a copy of the bundled example, because Kustomize cannot
read files outside deploy/. tests/component/test_deploy.py checks that every file below is exactly
what this script writes, so nothing drifts from the local stack:

    .venv/bin/python deploy/generate.py
"""

from __future__ import annotations

import copy
import itertools
import sys
from pathlib import Path
from typing import Any

import yaml

from extproc.config import EXAMPLE_EXPERIMENT, Experiment, load_experiment
from extproc.contract.envoy import FALLBACK_ROUTE
from extproc.contract.headers import VARIANT
from extproc.envoyconf.bootstrap import render
from extproc.envoyconf.common import EnvoyLayout

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "llm-rollout"
MODEL_PORT = 8000
SIDECAR_PORT = 50051
ADMIN_PORT = 9901
# The Envoy pod's readiness listener: Envoy's admin `/ready` for the kubelet, nothing else of the
# admin API (which can stop Envoy) and nothing on the pod's network but that one path.
READY_PORT = 9902
COMMAND = "# Regenerate with: .venv/bin/python deploy/generate.py (do not edit by hand).\n"
# Istio's name for the cluster of the extproc-sidecar Service's gRPC port (mTLS, per-pod balancing).
ISTIO_SIDECAR_CLUSTER = f"outbound|{SIDECAR_PORT}||extproc-sidecar.{NAMESPACE}.svc.cluster.local"
HCM = "envoy.filters.network.http_connection_manager"
ROUTER = "envoy.filters.http.router"
MODEL_HOST = f"llm.{NAMESPACE}.svc.cluster.local"
INGRESS_HOST = "llm.example.com"
INGRESS_PORT = 80


def compose_layout(variants: list[str]) -> EnvoyLayout:
    """docker-compose: one service per part, reached by its service name on the compose network."""
    return EnvoyLayout(
        listen_host="0.0.0.0",
        listen_port=10000,
        # The container's own loopback: the admin API can stop Envoy, so no other container of
        # the compose network reaches it (compose's health check runs inside the container).
        admin_host="127.0.0.1",
        admin_port=ADMIN_PORT,
        sidecar=f"sidecar:{SIDECAR_PORT}",
        upstreams={v: f"model-{v}:{MODEL_PORT}" for v in variants},
    )


def kubernetes_layout(variants: list[str]) -> EnvoyLayout:
    """The Envoy pod of deploy/components/envoy: the sidecar is a container of the same pod,
    reached on the pod's loopback. It listens on TCP (not a Unix socket) so that the kubelet's
    native gRPC probes can reach its health service; the pod's NetworkPolicy keeps other pods
    off that port."""
    return EnvoyLayout(
        listen_host="0.0.0.0",
        listen_port=10000,
        admin_host="127.0.0.1",
        admin_port=ADMIN_PORT,
        sidecar=f"127.0.0.1:{SIDECAR_PORT}",
        upstreams={v: f"model-{v}.{NAMESPACE}.svc.cluster.local:{MODEL_PORT}" for v in variants},
    )


READY_DOC = """\
# Added by deploy/generate.py: the listener `ready` on the pod's network answers GET /ready from
# the admin API on 127.0.0.1 (the kubelet cannot reach a pod's loopback) and 404 to every other
# request, so the probes see Envoy's own readiness without exposing the admin API.
"""


def ready_listener() -> dict[str, Any]:
    """A listener for the kubelet's HTTP probes: GET /ready forwarded to the admin API."""
    hcm_type = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    return {
        "name": "ready",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": READY_PORT}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": HCM,
                        "typed_config": {
                            "@type": hcm_type + "HttpConnectionManager",
                            "stat_prefix": "ready",
                            "route_config": {
                                "name": "ready",
                                "virtual_hosts": [
                                    {
                                        "name": "ready",
                                        "domains": ["*"],
                                        "routes": [
                                            {
                                                "match": {
                                                    "path": "/ready",
                                                    "headers": [
                                                        {
                                                            "name": ":method",
                                                            "string_match": {"exact": "GET"},
                                                        }
                                                    ],
                                                },
                                                "route": {"cluster": "admin"},
                                            },
                                            {
                                                "match": {"prefix": "/"},
                                                "direct_response": {"status": 404},
                                            },
                                        ],
                                    }
                                ],
                            },
                            "http_filters": [
                                {
                                    "name": ROUTER,
                                    "typed_config": {
                                        "@type": "type.googleapis.com/"
                                        "envoy.extensions.filters.http.router.v3.Router"
                                    },
                                }
                            ],
                        },
                    }
                ]
            }
        ],
    }


def admin_cluster() -> dict[str, Any]:
    address = {"socket_address": {"address": "127.0.0.1", "port_value": ADMIN_PORT}}
    return {
        "name": "admin",
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "load_assignment": {
            "cluster_name": "admin",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }


def kubernetes_envoy(experiment: Experiment) -> str:
    """The Envoy pod's bootstrap: what `extproc envoy-config` renders for the pod's layout, plus
    the readiness listener (a Kubernetes concern the local stack does not have)."""
    text = render(experiment, kubernetes_layout(list(experiment.variant_names)))
    header = "".join(itertools.takewhile(lambda x: x.startswith("#"), text.splitlines(True)))
    boot = yaml.safe_load(text)
    boot["static_resources"]["listeners"].append(ready_listener())
    boot["static_resources"]["clusters"].append(admin_cluster())
    return COMMAND + header + READY_DOC + yaml.safe_dump(boot, sort_keys=False)


def generated_filters(
    experiment: Experiment,
) -> tuple[list[Any], list[dict[str, Any]], dict[str, Any]]:
    """The early header mutations, the HTTP filters and the access log (with its options) of the
    generated main listener, each gRPC service pointed at Istio's cluster for the sidecar."""
    boot = yaml.safe_load(render(experiment, EnvoyLayout()))
    (listener,) = [x for x in boot["static_resources"]["listeners"] if x["name"] == "llm"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    filters = []
    for f in hcm["http_filters"]:
        if f["name"] == ROUTER:
            continue
        if "grpc_service" in f["typed_config"]:
            f["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = ISTIO_SIDECAR_CLUSTER
        # Disabled by default, enabled on the model's virtual host only: other hosts on the
        # same proxy never pay for the sidecar nor appear in the experiment's telemetry.
        filters.append({"name": f["name"], "disabled": True, "typed_config": f["typed_config"]})
    logs = hcm["access_log"]
    for log in logs:
        common = log["typed_config"]["common_config"]
        common["grpc_service"]["envoy_grpc"]["cluster_name"] = ISTIO_SIDECAR_CLUSTER
        # The access log belongs to the whole connection manager, other hosts included: only
        # requests with x-llm-variant set are the experiment's (the sidecar sets it; so does
        # the fallback route, for the requests the sidecar did not route).
        log["filter"] = {"header_filter": {"header": {"name": VARIANT, "present_match": True}}}
    telemetry = {"access_log": logs, "access_log_options": hcm["access_log_options"]}
    return hcm["early_header_mutation_extensions"], filters, telemetry


def envoy_filter(
    experiment: Experiment,
    name: str,
    context: str,
    selector: dict[str, str],
    vhost: str,
    port: int | None,
) -> dict[str, Any]:
    early, filters, telemetry = generated_filters(experiment)
    listener: dict[str, Any] = {} if port is None else {"portNumber": port}
    hcm_match = {
        "context": context,
        "listener": {**listener, "filterChain": {"filter": {"name": HCM}}},
    }
    router_match = {
        "context": context,
        "listener": {
            **listener,
            "filterChain": {"filter": {"name": HCM, "subFilter": {"name": ROUTER}}},
        },
    }
    hcm_type = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    patches: list[dict[str, Any]] = [
        {
            "applyTo": "NETWORK_FILTER",
            "match": hcm_match,
            "patch": {
                "operation": "MERGE",
                "value": {
                    "typed_config": {
                        "@type": hcm_type + "HttpConnectionManager",
                        "early_header_mutation_extensions": early,
                        **telemetry,
                    }
                },
            },
        },
        *(
            {
                "applyTo": "HTTP_FILTER",
                "match": copy.deepcopy(router_match),
                "patch": {"operation": "INSERT_BEFORE", "value": f},
            }
            for f in filters
        ),
        {
            "applyTo": "VIRTUAL_HOST",
            "match": {"context": context, "routeConfiguration": {"vhost": {"name": vhost}}},
            "patch": {
                "operation": "MERGE",
                "value": {
                    "typed_per_filter_config": {
                        f["name"]: {
                            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                            "config": {},
                        }
                        for f in filters
                    }
                },
            },
        },
    ]
    return {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        # Istio's root namespace: the filter applies to matching workloads in every namespace.
        "metadata": {"name": name, "namespace": "istio-system"},
        "spec": {"workloadSelector": {"labels": selector}, "configPatches": patches},
    }


ENVOY_FILTER_DOC = """\
# The filter chain of envoy/envoy.yaml, inserted by patches into Istio's proxies:
#  1. NETWORK_FILTER merge: Envoy's early header mutation drops client-sent routing headers
#     (x-llm-variant) before a route is chosen. A filter later in the chain would be too late: the
#     route is picked when the request headers arrive, and with the sidecar down nothing clears
#     it, so a client could pick its own variant. The same merge adds the gRPC access log to the
#     sidecar (telemetry of every request the sidecar routed) and its in-flight flush interval.
#  2. extproc.route (blocking, request headers only; the captured sample's bodies too): the
#     sidecar sets x-llm-variant and clears the route cache. Sidecar down or slower than
#     message_timeout: failure_mode_allow, Envoy goes on with the catch-all route, the stable
#     subset.
#  3. envoy.filters.http.lua (inspect.lua): what the response body shows, for the access log.
#  4. VIRTUAL_HOST merge: 2 and 3 are inserted disabled and enabled on the model's virtual host
#     only (Istio names it host:port).
# The filter configs are those `extproc envoy-config` generates, pointed at Istio's cluster for
# the extproc-sidecar Service (mTLS, per-pod balancing). tests/component/test_deploy.py applies
# the patches to a bootstrap and runs `envoy --mode validate` on it.
"""


def http_routes(experiment: Experiment) -> list[dict[str, Any]]:
    """The routes of envoy/envoy.yaml as Istio routes: one per variant on x-llm-variant to that
    variant's subset, then a catch-all to stable; the forcing header stripped, the variant echoed,
    the experiment's upstream timeout."""

    def route(name: str, variant: str) -> dict[str, Any]:
        return {
            "name": name,
            "route": [
                {
                    "destination": {
                        "host": MODEL_HOST,
                        "subset": variant,
                        "port": {"number": MODEL_PORT},
                    }
                }
            ],
            "timeout": f"{int(experiment.spec.envoy.request_timeout_s)}s",
            "headers": {
                "request": {"remove": [experiment.spec.forced_routing.header]},
                "response": {"set": {"x-llm-variant": variant}},
            },
        }

    routes = []
    for variant in experiment.variant_names:
        r = route(f"variant-{variant}", variant)
        routes.append(
            {
                "name": r.pop("name"),
                "match": [{"headers": {"x-llm-variant": {"exact": variant}}}],
                **r,
            }
        )
    # The sidecar did not route it (down, slow, or not run): stable. Named as the access log
    # knows a fallback (Istio names the Envoy route after it), and marked with the variant
    # header the access log's filter keeps (headers a route sets reach the access log).
    fallback = route(FALLBACK_ROUTE, experiment.stable)
    fallback["headers"]["request"]["set"] = {VARIANT: experiment.stable}
    routes.append(fallback)
    return routes


def virtual_service(
    experiment: Experiment, name: str, hosts: list[str], gateways: list[str]
) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"hosts": hosts, "gateways": gateways, "http": http_routes(experiment)},
    }


def destination_rule(experiment: Experiment) -> dict[str, Any]:
    """One subset per variant, selecting the model pods by their `version` label."""
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "llm", "namespace": NAMESPACE},
        "spec": {
            "host": MODEL_HOST,
            "subsets": [{"name": v, "labels": {"version": v}} for v in experiment.variant_names],
        },
    }


ROUTES_DOC = """\
# Routes on the sidecar's decision as envoy/envoy.yaml does: one route per variant on
# x-llm-variant to that variant's subset, everything else (sidecar down, slow, or the filter not
# run) to stable; the forcing header stripped, the variant echoed on the response.
"""


def dump(header: str, doc: dict[str, Any]) -> str:
    return COMMAND + header + yaml.safe_dump(doc, sort_keys=False, width=100)


def outputs() -> dict[Path, str]:
    """Every generated file and its exact content."""
    experiment = load_experiment(EXAMPLE_EXPERIMENT)
    variants = list(experiment.variant_names)
    return {
        ROOT / "envoy" / "envoy-compose.yaml": COMMAND
        + render(experiment, compose_layout(variants)),
        ROOT / "deploy" / "components" / "envoy" / "envoy.yaml": kubernetes_envoy(experiment),
        ROOT / "deploy" / "base" / "experiment.yaml": EXAMPLE_EXPERIMENT.read_text(),
        ROOT / "deploy" / "components" / "istio-routing" / "destinationrule.yaml": dump(
            "# The subsets the VirtualServices route to: the model pods of each variant, by their\n"
            "# `version` label, behind the one Service `llm`.\n",
            destination_rule(experiment),
        ),
        ROOT / "deploy" / "components" / "istio-ingress" / "virtualservice.yaml": dump(
            f"# Model traffic entering through the ingress gateway on {INGRESS_HOST}.\n"
            + ROUTES_DOC,
            virtual_service(experiment, "llm-ingress", [INGRESS_HOST], ["llm-gateway"]),
        ),
        ROOT / "deploy" / "components" / "istio-sidecar" / "virtualservice.yaml": dump(
            "# In-mesh calls to the `llm` Service, routed in the caller's sidecar.\n" + ROUTES_DOC,
            virtual_service(experiment, "llm-mesh", [MODEL_HOST], ["mesh"]),
        ),
        ROOT / "deploy" / "components" / "istio-ingress" / "envoyfilter.yaml": dump(
            "# On the Istio ingress gateway (a gateway of its own for model traffic is better).\n"
            + ENVOY_FILTER_DOC,
            envoy_filter(
                experiment,
                "extproc-ingress",
                "GATEWAY",
                {"istio": "ingressgateway"},
                f"{INGRESS_HOST}:{INGRESS_PORT}",
                None,
            ),
        ),
        ROOT / "deploy" / "components" / "istio-sidecar" / "envoyfilter.yaml": dump(
            "# In the Istio sidecars of the model's callers (pods labelled\n"
            '# extproc/llm-client: "true"), on their outbound listener for the model\'s port: the\n'
            "# decision is made client-side, where the VirtualService llm-mesh picks the subset.\n"
            + ENVOY_FILTER_DOC,
            envoy_filter(
                experiment,
                "extproc-mesh",
                "SIDECAR_OUTBOUND",
                {"extproc/llm-client": "true"},
                f"{MODEL_HOST}:{MODEL_PORT}",
                MODEL_PORT,
            ),
        ),
    }


def main() -> int:
    for path, text in outputs().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
