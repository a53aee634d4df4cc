"""The fleet bootstrap: one Envoy in front of many models, every experiment in Redis.

The request path, in filter order:

1. early header mutation: what the single-experiment listener drops, and the fleet's own
   headers (``x-llm-experiment``, ``x-llm-cluster``, ``x-llm-shadow-target``): no client picks
   an experiment's cluster;
2. JSON-to-metadata: the body's ``model`` into the dynamic metadata namespace ``extproc``. Envoy
   holds the body until it parsed it; the sidecar never sees it;
3. ext_proc ``route`` (blocking, request headers only): the model and the name of the route the
   request matched go with the headers; a fleet sidecar files the request under an experiment
   and answers with the variant, its cluster and the experiment, or passes it through. On
   failure or timeout Envoy carries on with the gateway's own route;
4. on-demand CDS: a cluster the sidecar named that Envoy does not know yet is asked of the
   sidecar (delta CDS), the request held until it arrives or ``discovery_timeout_ms``;
5. Lua ``inspect.lua`` (what only the response body shows), then the router.

Routes: first the experiment route (``x-llm-cluster`` present: ``cluster_header``, mirroring
what the sidecar marked, echoing variant and experiment), then the gateway file's routes. The
only clusters in the file are the sidecar's, the shadow listener's and the gateway's own.
"""

from __future__ import annotations

from envoy.config.bootstrap.v3.bootstrap_pb2 import Admin, Bootstrap
from envoy.config.common.mutation_rules.v3.mutation_rules_pb2 import HeaderMutation
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption, Node
from envoy.config.core.v3.config_source_pb2 import ApiConfigSource, ApiVersion, ConfigSource
from envoy.config.core.v3.extension_pb2 import TypedExtensionConfig
from envoy.config.core.v3.grpc_service_pb2 import GrpcService
from envoy.config.route.v3.route_components_pb2 import (
    HeaderMatcher,
    Route,
    RouteAction,
    RouteMatch,
    VirtualHost,
)
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.extensions.filters.http.ext_proc.v3.ext_proc_pb2 import (
    MetadataOptions,
)
from envoy.extensions.filters.http.json_to_metadata.v3.json_to_metadata_pb2 import JsonToMetadata
from envoy.extensions.filters.http.on_demand.v3.on_demand_pb2 import OnDemand, OnDemandCds
from envoy.extensions.filters.http.router.v3.router_pb2 import Router
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import (
    header_mutation_pb2 as early,
)
from envoy.type.matcher.v3.metadata_pb2 import MetadataMatcher
from envoy.type.matcher.v3.regex_pb2 import RegexMatcher
from envoy.type.matcher.v3.string_pb2 import StringMatcher
from envoy.type.matcher.v3.value_pb2 import OrMatcher, ValueMatcher

from extproc.contract import headers as h
from extproc.contract.clusters import millis, socket_address, static_cluster, typed
from extproc.contract.envoy import (
    ACCESS_LOG,
    EXPERIMENT_ROUTE,
    METADATA_NAMESPACE,
    MODEL_KEY,
    ROUTE_ATTRIBUTE,
    SHADOW_ACCESS_LOG,
    SHADOW_CLUSTER,
    SIDECAR_CLUSTER,
)
from extproc.envoyconf.common import (
    EnvoyLayout,
    early_mutations,
    grpc_access_log,
    http_listener,
    routing_processor,
    sidecar_cluster,
)
from extproc.envoyconf.gateway import Gateway, GatewayRoute
from extproc.envoyconf.inspector import Inspector, inspect_filter

FLEET_HEADERS = (h.EXPERIMENT, h.CLUSTER, h.SHADOW_TARGET)
JSON_CONTENT_TYPE = r"(?i)application/json\s*(;.*)?"


def _model_to_metadata() -> hcm.HttpFilter:
    """The body's ``model`` as dynamic metadata; a body without one (or not JSON) adds
    nothing and goes on unchanged."""
    rule = JsonToMetadata.Rule(
        selectors=[JsonToMetadata.Selector(key=MODEL_KEY)],
        on_present=JsonToMetadata.KeyValuePair(
            metadata_namespace=METADATA_NAMESPACE, key=MODEL_KEY, type=JsonToMetadata.STRING
        ),
    )
    # By default the filter reads only a body whose content type is exactly application/json;
    # clients that add a parameter (``; charset=utf-8``) would reach no model route and no
    # experiment chosen by model.
    rules = JsonToMetadata.MatchRules(
        rules=[rule],
        allow_content_types_regex=RegexMatcher(regex=JSON_CONTENT_TYPE),
    )
    config = JsonToMetadata(request_rules=rules)
    return hcm.HttpFilter(name="envoy.filters.http.json_to_metadata", typed_config=typed(config))


def _ext_proc(gateway: Gateway) -> hcm.HttpFilter:
    """Request headers only, with the model and the route name; bodies only for a request the
    sidecar captures (``mode_override``), as on the single-experiment listener."""
    namespaces = MetadataOptions.MetadataNamespaces(untyped=[METADATA_NAMESPACE])
    proc = routing_processor(gateway.message_timeout_ms)
    proc.allow_mode_override = True
    proc.metadata_options.CopyFrom(
        MetadataOptions(forwarding_namespaces=namespaces, receiving_namespaces=namespaces)
    )
    proc.request_attributes.append(ROUTE_ATTRIBUTE)
    proc.response_attributes.append("response.code_details")
    return hcm.HttpFilter(name="extproc.route", typed_config=typed(proc))


def _on_demand_clusters(gateway: Gateway) -> hcm.HttpFilter:
    source = ConfigSource(
        resource_api_version=ApiVersion.V3,
        api_config_source=ApiConfigSource(
            api_type=ApiConfigSource.DELTA_GRPC,
            transport_api_version=ApiVersion.V3,
            grpc_services=[
                GrpcService(envoy_grpc=GrpcService.EnvoyGrpc(cluster_name=SIDECAR_CLUSTER))
            ],
        ),
    )
    config = OnDemand(
        odcds=OnDemandCds(source=source, timeout=millis(gateway.discovery_timeout_ms))
    )
    return hcm.HttpFilter(name="envoy.filters.http.on_demand", typed_config=typed(config))


def _echo(header: str) -> HeaderValueOption:
    return HeaderValueOption(
        header=HeaderValue(key=header, value=f"%REQ({header})%"),
        append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _experiment_route(gateway: Gateway) -> Route:
    return Route(
        name=EXPERIMENT_ROUTE,
        match=RouteMatch(prefix="/", headers=[HeaderMatcher(name=h.CLUSTER, present_match=True)]),
        route=RouteAction(
            cluster_header=h.CLUSTER,
            timeout=millis(round(gateway.request_timeout_s * 1000)),
            # Only a request the sidecar marked carries x-llm-shadow: the others are not mirrored.
            request_mirror_policies=[RouteAction.RequestMirrorPolicy(cluster_header=h.SHADOW)],
        ),
        response_headers_to_add=[_echo(h.VARIANT), _echo(h.EXPERIMENT)],
    )


def _one_of(values: list[str]) -> ValueMatcher:
    each = [ValueMatcher(string_match=StringMatcher(exact=v)) for v in values]
    return each[0] if len(each) == 1 else ValueMatcher(or_match=OrMatcher(value_matchers=each))


def _gateway_route(route: GatewayRoute, gateway: Gateway) -> Route:
    match = RouteMatch(prefix=route.prefix)
    if route.models:
        match.dynamic_metadata.append(
            MetadataMatcher(
                filter=METADATA_NAMESPACE,
                path=[MetadataMatcher.PathSegment(key=MODEL_KEY)],
                value=_one_of(route.models),
            )
        )
    return Route(
        name=route.name,
        match=match,
        route=RouteAction(
            cluster=route.cluster, timeout=millis(round(gateway.request_timeout_s * 1000))
        ),
    )


def _manager(gateway: Gateway, *, shadow: bool, inspector: Inspector) -> hcm.HttpConnectionManager:
    mutations = early_mutations(shadow=shadow)
    if not shadow:
        mutations += [HeaderMutation(remove=name) for name in FLEET_HEADERS]
    timeout = millis(round(gateway.request_timeout_s * 1000))
    if shadow:
        routes = [
            Route(
                name="shadow",
                match=RouteMatch(prefix="/"),
                route=RouteAction(cluster_header=h.SHADOW_TARGET, timeout=timeout),
            )
        ]
        filters = [_ext_proc(gateway)]
    else:
        routes = [_experiment_route(gateway), *(_gateway_route(r, gateway) for r in gateway.routes)]
        filters = [_model_to_metadata(), _ext_proc(gateway)]
    filters += [
        _on_demand_clusters(gateway),
        inspect_filter(inspector),
        hcm.HttpFilter(name="envoy.filters.http.router", typed_config=typed(Router())),
    ]
    manager = hcm.HttpConnectionManager(
        stat_prefix="llm_shadow" if shadow else "llm",
        codec_type=hcm.HttpConnectionManager.AUTO,
        always_set_request_id_in_response=True,
        early_header_mutation_extensions=[
            TypedExtensionConfig(
                name="strip-routing-headers",
                typed_config=typed(early.HeaderMutation(mutations=mutations)),
            )
        ],
        route_config=RouteConfiguration(
            name="llm", virtual_hosts=[VirtualHost(name="llm", domains=["*"], routes=routes)]
        ),
        http_filters=filters,
    )
    logged = [*gateway.sticky_headers, h.SHADOW_COPY, h.FORCED, h.EXPERIMENT]
    manager.access_log.append(grpc_access_log(SHADOW_ACCESS_LOG if shadow else ACCESS_LOG, logged))
    manager.access_log_options.access_log_flush_interval.CopyFrom(
        millis(gateway.inflight_notice_ms)
    )
    return manager


def build_fleet(gateway: Gateway, layout: EnvoyLayout) -> Bootstrap:
    clusters = [sidecar_cluster(layout)]
    seen: set[str] = set()
    for r in gateway.routes:
        if r.cluster not in seen:
            seen.add(r.cluster)
            clusters.append(static_cluster(r.cluster, r.address, http2=False, timeout_ms=2_000))
    listeners = [
        http_listener(
            "llm",
            f"{layout.listen_host}:{layout.listen_port}",
            _manager(gateway, shadow=False, inspector=layout.inspector),
        )
    ]
    if gateway.shadow:
        shadow_at = f"{layout.shadow_host}:{layout.shadow_port}"
        listeners.append(
            http_listener(
                "llm_shadow", shadow_at, _manager(gateway, shadow=True, inspector=layout.inspector)
            )
        )
        clusters.append(static_cluster(SHADOW_CLUSTER, shadow_at, http2=False, timeout_ms=250))
    return Bootstrap(
        # xDS (the on-demand clusters) needs a node; `envoy --service-node` overrides the id.
        node=Node(id="llm-gateway", cluster="llm-gateway"),
        admin=Admin(address=socket_address(f"{layout.admin_host}:{layout.admin_port}")),
        static_resources=Bootstrap.StaticResources(listeners=listeners, clusters=clusters),
    )
