"""The bootstrap of ``dataplane: ext_proc`` (the default): the sidecar routes each request.

The request path, in filter order:

1. early header mutation (``common.early_mutations``): drop client-sent routing headers;
2. ext_proc ``route`` (blocking, request headers only): the sidecar sets ``x-llm-variant`` and
   clears the route cache; on failure or timeout (``failure_mode_allow``) Envoy carries on with the
   default route, which is the stable variant. For the captured sample only, the sidecar's answer
   overrides the processing mode (``mode_override``) so that the request body, the response
   headers and the response body of that request reach it too;
3. Lua ``extproc/data/inspect.lua``: what only the response body shows, as dynamic metadata;
4. router: one route per variant matching ``x-llm-variant`` (and one per forced variant, so the
   access log tells a forced request by its route), a default route to the stable variant; each
   route echoes its variant on the response and strips the forcing header.

Telemetry for every request comes from Envoy's gRPC access log to the sidecar, as with
``dataplane: native``: one batched entry per request on one long-lived stream.
"""

from __future__ import annotations

from envoy.config.bootstrap.v3.bootstrap_pb2 import Admin, Bootstrap
from envoy.config.core.v3.base_pb2 import (
    HeaderValue,
    HeaderValueOption,
)
from envoy.config.core.v3.extension_pb2 import TypedExtensionConfig
from envoy.config.route.v3.route_components_pb2 import (
    HeaderMatcher,
    Route,
    RouteAction,
    RouteMatch,
    VirtualHost,
    WeightedCluster,
)
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.extensions.filters.http.ext_proc.v3.ext_proc_pb2 import (
    ExternalProcessor,
    MetadataOptions,
)
from envoy.extensions.filters.http.router.v3.router_pb2 import Router
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import (
    header_mutation_pb2 as early,
)
from envoy.type.matcher.v3.string_pb2 import StringMatcher
from google.protobuf.wrappers_pb2 import UInt32Value

from extproc.config import Experiment
from extproc.contract import headers as h
from extproc.contract.clusters import millis, socket_address, static_cluster, typed
from extproc.contract.envoy import (
    ACCESS_LOG,
    FALLBACK_ROUTE,
    FORCED_ROUTE,
    METADATA_NAMESPACE,
    SHADOW_ACCESS_LOG,
    SHADOW_CLUSTER,
)
from extproc.envoyconf.common import (
    EnvoyLayout,
    access_log_to_sidecar,
    early_mutations,
    http_listener,
    request_timeout,
    routing_processor,
    sidecar_cluster,
)
from extproc.envoyconf.inspector import Inspector, inspect_filter

ROUTE_FILTER = "extproc.route"  # the ext_proc filter, the one native drops


def _ext_proc(experiment: Experiment) -> ExternalProcessor:
    """The one blocking ext_proc filter: request headers only, unless the sidecar asks for more.

    With captures on, the sidecar answers a sampled request's headers with a ``mode_override``
    (``allow_mode_override``) for its bodies and response headers, and may answer its request
    body with dynamic metadata (whether it asked for JSON) for the access log, in the namespace
    it is allowed to write. Every other request costs one message each way.
    """
    proc = routing_processor(experiment.spec.envoy.message_timeout_ms)
    if experiment.spec.capture.sample > 0:
        proc.allow_mode_override = True
        proc.metadata_options.CopyFrom(
            MetadataOptions(
                receiving_namespaces=MetadataOptions.MetadataNamespaces(
                    untyped=[METADATA_NAMESPACE]
                )
            )
        )
        proc.response_attributes.append("response.code_details")
    return proc


def echo(variant: str) -> HeaderValueOption:
    return HeaderValueOption(
        header=HeaderValue(key=h.VARIANT, value=variant),
        append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _routes(experiment: Experiment) -> list[Route]:
    timeout = request_timeout(experiment)
    strip = experiment.spec.forced_routing.strip
    # Mirror only requests the sidecar marked (x-llm-shadow names the shadow listener's cluster).
    mirror = (
        [RouteAction.RequestMirrorPolicy(cluster_header=h.SHADOW)]
        if experiment.spec.shadow.variant
        else []
    )
    routes = []
    fr = experiment.spec.forced_routing
    if fr.enabled:
        # The sidecar set the variant a request forces (a forcing header it refuses gets an
        # immediate answer), so a request with both is forced: its route says so in the access
        # log, where the forcing header, stripped on the way upstream, no longer shows.
        for name, v in experiment.spec.variants.items():
            routes.append(
                Route(
                    name=f"{FORCED_ROUTE}{name}",
                    match=RouteMatch(
                        prefix="/",
                        headers=[
                            HeaderMatcher(name=h.VARIANT, string_match=StringMatcher(exact=name)),
                            HeaderMatcher(name=fr.header, string_match=StringMatcher(exact=name)),
                        ],
                    ),
                    route=RouteAction(cluster=v.cluster, timeout=timeout),
                    response_headers_to_add=[echo(name)],
                    request_headers_to_remove=strip,
                )
            )
    for name, v in experiment.spec.variants.items():
        routes.append(
            Route(
                name=f"variant_{name}",
                match=RouteMatch(
                    prefix="/",
                    headers=[HeaderMatcher(name=h.VARIANT, string_match=StringMatcher(exact=name))],
                ),
                route=RouteAction(
                    cluster=v.cluster, timeout=timeout, request_mirror_policies=mirror
                ),
                response_headers_to_add=[echo(name)],
                request_headers_to_remove=strip,
            )
        )
    stable = experiment.spec.variants[experiment.stable]
    routes.append(
        Route(
            name=FALLBACK_ROUTE,
            match=RouteMatch(prefix="/"),
            route=RouteAction(cluster=stable.cluster, timeout=timeout),
            response_headers_to_add=[echo(experiment.stable)],
            request_headers_to_remove=strip,
        )
    )
    return routes


def _shadow_routes(experiment: Experiment) -> list[Route]:
    """The shadow listener sends every mirrored copy to the shadow variant."""
    shadow = experiment.spec.shadow.variant
    assert shadow is not None
    timeout = request_timeout(experiment)
    return [
        Route(
            name="shadow",
            match=RouteMatch(prefix="/"),
            route=RouteAction(cluster=experiment.spec.variants[shadow].cluster, timeout=timeout),
            request_headers_to_remove=experiment.spec.forced_routing.strip,
        )
    ]


def http_connection_manager(
    experiment: Experiment, *, shadow: bool = False, inspector: Inspector = "lua"
) -> hcm.HttpConnectionManager:
    strip = early.HeaderMutation(mutations=early_mutations(shadow=shadow))
    # The shadow listener routes nothing; it asks the sidecar only to capture a copy's answer.
    ext_proc = not shadow or experiment.spec.capture.sample > 0
    filters = [
        *(
            [hcm.HttpFilter(name=ROUTE_FILTER, typed_config=typed(_ext_proc(experiment)))]
            if ext_proc
            else []
        ),
        inspect_filter(inspector),
        hcm.HttpFilter(name="envoy.filters.http.router", typed_config=typed(Router())),
    ]
    routes = _shadow_routes(experiment) if shadow else _routes(experiment)
    manager = hcm.HttpConnectionManager(
        stat_prefix="llm_shadow" if shadow else "llm",
        codec_type=hcm.HttpConnectionManager.AUTO,
        # Users quote the request id when they send feedback; telemetry and pairs are keyed by
        # it. Envoy generates it on the primary listener (see early_mutations).
        always_set_request_id_in_response=True,
        early_header_mutation_extensions=[
            TypedExtensionConfig(name="strip-routing-headers", typed_config=typed(strip))
        ],
        route_config=RouteConfiguration(
            name="llm",
            virtual_hosts=[VirtualHost(name="llm", domains=["*"], routes=routes)],
        ),
        http_filters=filters,
    )
    manager.access_log.append(
        access_log_to_sidecar(experiment, SHADOW_ACCESS_LOG if shadow else ACCESS_LOG)
    )
    # In-flight notices: Envoy logs every request still open once per interval (entries of type
    # DownstreamPeriodic); the sidecar turns a request's first one into its notice.
    manager.access_log_options.access_log_flush_interval.CopyFrom(
        millis(experiment.spec.inflight.notice_ms)
    )
    return manager


def build_bootstrap(experiment: Experiment, layout: EnvoyLayout) -> Bootstrap:
    clusters = [sidecar_cluster(layout)]
    for name, v in experiment.spec.variants.items():
        target = layout.upstreams.get(name) or v.address
        if target is None:
            raise ValueError(f"variant {name!r} has no address; pass one in the layout")
        clusters.append(static_cluster(v.cluster, target, http2=False, timeout_ms=2_000))
    listeners = [
        http_listener(
            "llm",
            f"{layout.listen_host}:{layout.listen_port}",
            http_connection_manager(experiment, inspector=layout.inspector),
        )
    ]
    if experiment.spec.shadow.variant:
        shadow_at = f"{layout.shadow_host}:{layout.shadow_port}"
        listeners.append(
            http_listener(
                "llm_shadow",
                shadow_at,
                http_connection_manager(experiment, shadow=True, inspector=layout.inspector),
            )
        )
        clusters.append(static_cluster(SHADOW_CLUSTER, shadow_at, http2=False, timeout_ms=250))
    return Bootstrap(
        admin=Admin(address=socket_address(f"{layout.admin_host}:{layout.admin_port}")),
        static_resources=Bootstrap.StaticResources(listeners=listeners, clusters=clusters),
    )


def build_baseline(experiment: Experiment, layout: EnvoyLayout) -> Bootstrap:
    """Bare Envoy weighted routing at the file's weights: no sidecar, no telemetry.

    The reference point for benchmarks: what routing costs when Envoy alone splits traffic.
    """
    boot = build_bootstrap(experiment, layout)
    boot.static_resources.clusters.pop(0)  # the sidecar cluster
    hcm_msg = hcm.HttpConnectionManager()
    boot.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.Unpack(hcm_msg)
    weighted = RouteAction(
        weighted_clusters=WeightedCluster(
            clusters=[
                WeightedCluster.ClusterWeight(
                    name=v.cluster, weight=UInt32Value(value=int(v.weight))
                )
                for v in experiment.spec.variants.values()
                if v.weight > 0
            ]
        )
    )
    vhost = hcm_msg.route_config.virtual_hosts[0]
    del vhost.routes[:]
    vhost.routes.append(Route(name="weighted", match=RouteMatch(prefix="/"), route=weighted))
    del hcm_msg.http_filters[:-1]  # the router only
    hcm_msg.ClearField("early_header_mutation_extensions")
    hcm_msg.ClearField("access_log")
    hcm_msg.ClearField("access_log_options")
    boot.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.CopyFrom(
        typed(hcm_msg)
    )
    return boot
