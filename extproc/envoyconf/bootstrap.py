"""Generate the Envoy bootstrap for an experiment, built from Envoy's typed API messages.

Building from the messages in ``xds-protos`` (rather than templating YAML) means a wrong field name
or type fails here, in Python, before Envoy ever sees the file; tests also run
``envoy --mode validate`` on every config generated or shipped.

The request path, in filter order:

1. early header mutation: drop any client-sent ``x-llm-variant`` before a route is chosen, so a
   client can never pick its own variant, even when the sidecar is down; drop a client-sent
   ``x-llm-shadow-copy`` (the shadow listener's mark of a mirrored copy) and ``x-request-id``:
   Envoy then generates the id, so a client can neither make two requests share one (their
   captures would make one pair) nor aim feedback at someone else's request by guessing it.
   Mirrored copies keep their primary's id, and the shadow listener marks them;
2. ext_proc ``route`` (blocking, request headers only): the sidecar sets ``x-llm-variant`` and
   clears the route cache; on failure or timeout (``failure_mode_allow``) Envoy carries on with the
   default route, which is the stable variant. For the captured sample only, the sidecar's answer
   overrides the processing mode (``mode_override``) so that the request body, the response
   headers and the response body of that request reach it too;
3. Lua ``extproc/data/inspect.lua``: what only the response body shows (first token, the answer's
   first characters, tool calls, usage), as dynamic metadata;
4. router: one route per variant matching ``x-llm-variant`` (and one per forced variant, so the
   access log tells a forced request by its route), a default route to the stable variant; each
   route echoes its variant on the response and strips the forcing header.

Telemetry for every request comes from Envoy's gRPC access log to the sidecar, as with
``dataplane: native``: one batched entry per request on one long-lived stream, instead of a
second, observing ext_proc stream per request, which cost twice the routing itself.

With ``dataplane: native`` (:func:`build_native`) the sidecar leaves the request path: Envoy
routes by itself and the sidecar only feeds it weights (RTDS) and reads its access log.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from envoy.config.accesslog.v3.accesslog_pb2 import AccessLog
from envoy.config.bootstrap.v3.bootstrap_pb2 import Admin, Bootstrap, LayeredRuntime, RuntimeLayer
from envoy.config.cluster.v3.circuit_breaker_pb2 import CircuitBreakers
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.common.mutation_rules.v3.mutation_rules_pb2 import HeaderMutation
from envoy.config.core.v3.address_pb2 import Address, Pipe, SocketAddress
from envoy.config.core.v3.base_pb2 import (
    DataSource,
    HeaderValue,
    HeaderValueOption,
    Node,
    RuntimeFractionalPercent,
    TransportSocket,
)
from envoy.config.core.v3.config_source_pb2 import ApiConfigSource, ApiVersion, ConfigSource
from envoy.config.core.v3.extension_pb2 import TypedExtensionConfig
from envoy.config.core.v3.grpc_service_pb2 import GrpcService
from envoy.config.core.v3.health_check_pb2 import HealthCheck
from envoy.config.core.v3.protocol_pb2 import (
    Http1ProtocolOptions,
    Http2ProtocolOptions,
    KeepaliveSettings,
)
from envoy.config.endpoint.v3.endpoint_components_pb2 import (
    Endpoint,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_components_pb2 import Filter, FilterChain
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.route_components_pb2 import (
    DirectResponseAction,
    HeaderMatcher,
    Route,
    RouteAction,
    RouteMatch,
    VirtualHost,
    WeightedCluster,
)
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.extensions.access_loggers.grpc.v3.als_pb2 import (
    CommonGrpcAccessLogConfig,
    HttpGrpcAccessLogConfig,
)
from envoy.extensions.filters.http.ext_proc.v3.ext_proc_pb2 import (
    ExternalProcessor,
    MetadataOptions,
)
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.extensions.filters.http.lua.v3.lua_pb2 import Lua
from envoy.extensions.filters.http.router.v3.router_pb2 import Router
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import (
    header_mutation_pb2 as early,
)
from envoy.extensions.transport_sockets.tls.v3.common_pb2 import (
    CertificateValidationContext,
    SubjectAltNameMatcher,
    TlsCertificate,
)
from envoy.extensions.transport_sockets.tls.v3.tls_pb2 import CommonTlsContext, UpstreamTlsContext
from envoy.extensions.upstreams.http.v3.http_protocol_options_pb2 import HttpProtocolOptions
from envoy.type.matcher.v3.regex_pb2 import RegexMatchAndSubstitute, RegexMatcher
from envoy.type.matcher.v3.string_pb2 import StringMatcher
from envoy.type.v3.percent_pb2 import FractionalPercent
from google.protobuf import any_pb2, json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.wrappers_pb2 import BoolValue, UInt32Value

from extproc.config import Experiment
from extproc.contract import headers as h
from extproc.contract.envoy import (
    ACCESS_LOG,
    FALLBACK_ROUTE,
    FORCED_ROUTE,
    METADATA_NAMESPACE,
    RUNTIME_LAYER,
    RUNTIME_PREFIX,
    SHADOW_ACCESS_LOG,
    SHADOW_CLUSTER,
    SIDECAR_CLUSTER,
    SIDECAR_SERVICE,
    lane_cluster,
)
from extproc.contract.errors import ForcingNotAllowed, RoutingError, UnknownVariant
from extproc.routing.lanes import cluster_weights

PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


@dataclass(frozen=True)
class SidecarTls:
    """Envoy reaches the sidecar over TLS: files on Envoy's host.

    ``ca`` signed the sidecar's certificate. ``server_name``, when set, is sent as SNI and must be
    a DNS name in the sidecar's certificate; without it Envoy checks only the chain, so use a CA
    that signs nothing but sidecars. ``cert`` and ``key`` are Envoy's own, for mutual TLS (the
    sidecar's ``--tls-client-ca``).
    """

    ca: str
    server_name: str | None = None
    cert: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("Envoy's client certificate and key go together")


@dataclass(frozen=True)
class EnvoyLayout:
    """Where things listen; the defaults are those of the local stack and docker-compose."""

    listen_host: str = "0.0.0.0"
    listen_port: int = 10000
    admin_host: str = "127.0.0.1"
    admin_port: int = 9901
    shadow_host: str = "127.0.0.1"  # the shadow listener takes mirrored copies from Envoy itself
    shadow_port: int = 10001
    # host:port or unix:/path; several (replicas) share the streams and are health-checked
    sidecar: str | tuple[str, ...] = "127.0.0.1:50051"
    sidecar_tls: SidecarTls | None = None
    upstreams: dict[str, str] = field(default_factory=dict)  # variant -> host:port override


def _any(msg: Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def _ms(ms: int) -> Duration:
    return Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def _address(target: str) -> Address:
    if target.startswith("unix:"):
        return Address(pipe=Pipe(path=target.removeprefix("unix:")))
    host, _, port = target.rpartition(":")
    return Address(socket_address=SocketAddress(address=host, port_value=int(port)))


def _is_ip_or_pipe(target: str) -> bool:
    return target.startswith("unix:") or target.rpartition(":")[0].replace(".", "").isdigit()


def _cluster(name: str, targets: str | Sequence[str], *, http2: bool, timeout_ms: int) -> Cluster:
    addresses = [targets] if isinstance(targets, str) else list(targets)
    static = all(_is_ip_or_pipe(t) for t in addresses)
    if not static and any(t.startswith("unix:") for t in addresses):
        raise ValueError(f"{name}: Unix sockets and DNS names cannot share a cluster")
    endpoints = [LbEndpoint(endpoint=Endpoint(address=_address(t))) for t in addresses]
    opts = HttpProtocolOptions()
    if http2:
        opts.explicit_http_config.http2_protocol_options.CopyFrom(
            Http2ProtocolOptions(
                connection_keepalive=KeepaliveSettings(interval=_ms(30_000), timeout=_ms(5_000))
            )
        )
    else:
        opts.explicit_http_config.http_protocol_options.CopyFrom(Http1ProtocolOptions())
    return Cluster(
        name=name,
        type=Cluster.STATIC if static else Cluster.STRICT_DNS,
        connect_timeout=_ms(timeout_ms),
        load_assignment=ClusterLoadAssignment(
            cluster_name=name, endpoints=[LocalityLbEndpoints(lb_endpoints=endpoints)]
        ),
        typed_extension_protocol_options={PROTOCOL_OPTIONS: _any(opts)},
    )


def _upstream_tls(tls: SidecarTls) -> TransportSocket:
    validation = CertificateValidationContext(trusted_ca=DataSource(filename=tls.ca))
    if tls.server_name:
        validation.match_typed_subject_alt_names.append(
            SubjectAltNameMatcher(
                san_type=SubjectAltNameMatcher.DNS,
                matcher=StringMatcher(exact=tls.server_name),
            )
        )
    # gRPC servers expect HTTP/2 to be negotiated by ALPN on a TLS connection.
    common = CommonTlsContext(alpn_protocols=["h2"], validation_context=validation)
    if tls.cert and tls.key:
        common.tls_certificates.append(
            TlsCertificate(
                certificate_chain=DataSource(filename=tls.cert),
                private_key=DataSource(filename=tls.key),
            )
        )
    ctx = UpstreamTlsContext(common_tls_context=common, sni=tls.server_name or "")
    return TransportSocket(name="envoy.transport_sockets.tls", typed_config=_any(ctx))


# Envoy's default circuit breaker (1,024 requests in flight per cluster) counts gRPC streams; past
# it Envoy fails ext_proc streams, routing ones included, and routes those requests to stable
# (stickiness broken, telemetry lost) while every user still sees 200. The sidecar, not Envoy,
# bounds its own backlog, so the breaker is set out of the way.
SIDECAR_STREAM_LIMIT = 100_000


def _sidecar_cluster(layout: EnvoyLayout) -> Cluster:
    cluster = _cluster(SIDECAR_CLUSTER, layout.sidecar, http2=True, timeout_ms=250)
    limit = UInt32Value(value=SIDECAR_STREAM_LIMIT)
    cluster.circuit_breakers.CopyFrom(
        CircuitBreakers(
            thresholds=[
                CircuitBreakers.Thresholds(
                    max_connections=limit, max_pending_requests=limit, max_requests=limit
                )
            ]
        )
    )
    if layout.sidecar_tls is not None:
        cluster.transport_socket.CopyFrom(_upstream_tls(layout.sidecar_tls))
    if len(cluster.load_assignment.endpoints[0].lb_endpoints) > 1:
        # Routing streams are short, a captured request's lasts as long as its response, and
        # each Envoy holds one access-log stream: least request balances the streams actually
        # open, where round robin would count a long one as one short one.
        cluster.lb_policy = Cluster.LEAST_REQUEST
        # A replica that is down, draining or still without its routing (it answers
        # NOT_SERVING) stops getting streams, instead of its share of requests failing open to
        # stable. With one replica there is nothing else to send them to.
        cluster.health_checks.append(
            HealthCheck(
                timeout=_ms(250),
                interval=_ms(1_000),
                no_traffic_interval=_ms(5_000),
                unhealthy_threshold=UInt32Value(value=2),
                healthy_threshold=UInt32Value(value=1),
                grpc_health_check=HealthCheck.GrpcHealthCheck(service_name=SIDECAR_SERVICE),
            )
        )
    return cluster


def _ext_proc(experiment: Experiment) -> ExternalProcessor:
    """The one blocking ext_proc filter: request headers only, unless the sidecar asks for more.

    With captures on, the sidecar answers a sampled request's headers with a ``mode_override``
    (``allow_mode_override``) for its bodies and response headers, and may answer its request
    body with dynamic metadata (whether it asked for JSON) for the access log, in the namespace
    it is allowed to write. Every other request costs one message each way.
    """
    skip = ProcessingMode.SKIP
    proc = ExternalProcessor(
        grpc_service=GrpcService(envoy_grpc=GrpcService.EnvoyGrpc(cluster_name=SIDECAR_CLUSTER)),
        failure_mode_allow=True,
        processing_mode=ProcessingMode(
            request_header_mode=ProcessingMode.SEND,
            response_header_mode=skip,
            request_trailer_mode=skip,
            response_trailer_mode=skip,
        ),
        message_timeout=_ms(experiment.spec.envoy.message_timeout_ms),
    )
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


def _echo(variant: str) -> HeaderValueOption:
    return HeaderValueOption(
        header=HeaderValue(key=h.VARIANT, value=variant),
        append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _routes(experiment: Experiment) -> list[Route]:
    timeout = Duration(seconds=int(experiment.spec.envoy.request_timeout_s))
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
                    response_headers_to_add=[_echo(name)],
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
                response_headers_to_add=[_echo(name)],
                request_headers_to_remove=strip,
            )
        )
    stable = experiment.spec.variants[experiment.stable]
    routes.append(
        Route(
            name=FALLBACK_ROUTE,
            match=RouteMatch(prefix="/"),
            route=RouteAction(cluster=stable.cluster, timeout=timeout),
            response_headers_to_add=[_echo(experiment.stable)],
            request_headers_to_remove=strip,
        )
    )
    return routes


def _shadow_routes(experiment: Experiment) -> list[Route]:
    """The shadow listener sends every mirrored copy to the shadow variant."""
    shadow = experiment.spec.shadow.variant
    assert shadow is not None
    timeout = Duration(seconds=int(experiment.spec.envoy.request_timeout_s))
    return [
        Route(
            name="shadow",
            match=RouteMatch(prefix="/"),
            route=RouteAction(cluster=experiment.spec.variants[shadow].cluster, timeout=timeout),
            request_headers_to_remove=experiment.spec.forced_routing.strip,
        )
    ]


def _early_mutations(*, shadow: bool) -> list[HeaderMutation]:
    """What each listener does to a request's headers before anything else reads them.

    Both drop a client-sent ``x-llm-variant`` and ``x-llm-shadow``. The primary listener also
    drops ``x-llm-shadow-copy`` (only the shadow listener may say a request is a copy),
    ``x-llm-forced`` (only the sidecar may say a tester forced it) and ``x-request-id``, so
    that Envoy generates a fresh one: a client cannot make two requests
    share an id (one pair, the second overwriting the first) nor aim feedback at a request it
    can guess. The shadow listener keeps the id the mirrored copy carries (its primary's: that
    pairs them) and marks the copy.
    """
    out = [HeaderMutation(remove=h.VARIANT), HeaderMutation(remove=h.SHADOW)]
    if not shadow:
        return [
            *out,
            HeaderMutation(remove=h.SHADOW_COPY),
            HeaderMutation(remove=h.FORCED),
            HeaderMutation(remove=h.REQUEST_ID),
        ]
    mark = HeaderValueOption(
        header=HeaderValue(key=h.SHADOW_COPY, value="1"),
        append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )
    return [*out, HeaderMutation(append=mark)]


def _http_connection_manager(
    experiment: Experiment, *, shadow: bool = False
) -> hcm.HttpConnectionManager:
    strip = early.HeaderMutation(mutations=_early_mutations(shadow=shadow))
    # The shadow listener routes nothing; it asks the sidecar only to capture a copy's answer.
    ext_proc = not shadow or experiment.spec.capture.sample > 0
    filters = [
        *(
            [hcm.HttpFilter(name="extproc.route", typed_config=_any(_ext_proc(experiment)))]
            if ext_proc
            else []
        ),
        _inspect_filter(),
        hcm.HttpFilter(name="envoy.filters.http.router", typed_config=_any(Router())),
    ]
    routes = _shadow_routes(experiment) if shadow else _routes(experiment)
    manager = hcm.HttpConnectionManager(
        stat_prefix="llm_shadow" if shadow else "llm",
        codec_type=hcm.HttpConnectionManager.AUTO,
        # Users quote the request id when they send feedback; telemetry and pairs are keyed by
        # it. Envoy generates it on the primary listener (see _early_mutations).
        always_set_request_id_in_response=True,
        early_header_mutation_extensions=[
            TypedExtensionConfig(name="strip-routing-headers", typed_config=_any(strip))
        ],
        route_config=RouteConfiguration(
            name="llm",
            virtual_hosts=[VirtualHost(name="llm", domains=["*"], routes=routes)],
        ),
        http_filters=filters,
    )
    manager.access_log.append(_access_log(experiment, SHADOW_ACCESS_LOG if shadow else ACCESS_LOG))
    # In-flight notices: Envoy logs every request still open once per interval (entries of type
    # DownstreamPeriodic); the sidecar turns a request's first one into its notice.
    manager.access_log_options.access_log_flush_interval.CopyFrom(
        _ms(experiment.spec.inflight.notice_ms)
    )
    return manager


def build_bootstrap(experiment: Experiment, layout: EnvoyLayout) -> Bootstrap:
    clusters = [_sidecar_cluster(layout)]
    for name, v in experiment.spec.variants.items():
        target = layout.upstreams.get(name) or v.address
        if target is None:
            raise ValueError(f"variant {name!r} has no address; pass one in the layout")
        clusters.append(_cluster(v.cluster, target, http2=False, timeout_ms=2_000))
    listeners = [
        _listener(
            "llm",
            f"{layout.listen_host}:{layout.listen_port}",
            _http_connection_manager(experiment),
        )
    ]
    if experiment.spec.shadow.variant:
        shadow_at = f"{layout.shadow_host}:{layout.shadow_port}"
        listeners.append(
            _listener("llm_shadow", shadow_at, _http_connection_manager(experiment, shadow=True))
        )
        clusters.append(_cluster(SHADOW_CLUSTER, shadow_at, http2=False, timeout_ms=250))
    return Bootstrap(
        admin=Admin(address=_address(f"{layout.admin_host}:{layout.admin_port}")),
        static_resources=Bootstrap.StaticResources(listeners=listeners, clusters=clusters),
    )


def _listener(name: str, address: str, manager: hcm.HttpConnectionManager) -> Listener:
    return Listener(
        name=name,
        address=_address(address),
        filter_chains=[
            FilterChain(
                filters=[
                    Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=_any(manager),
                    )
                ]
            )
        ],
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
        _any(hcm_msg)
    )
    return boot


# --- telemetry, shared by both data planes, and dataplane: native -------------------------------
#
# Both planes send every request's telemetry through Envoy's gRPC access log, with what the body
# showed from inspect.lua. With native, Envoy also routes every request by itself and never waits
# for the sidecar; the sidecar feeds Envoy the live weights over RTDS. Measured in
# docs/PERFORMANCE.md: the ext_proc round trip is the floor of the default data path's added
# latency, and native removes it.

INSPECT_LUA = "inspect.lua"
ALS_BUFFER_BYTES = 256 * 1024


def _inspect_lua() -> str:
    return (Path(__file__).parent.parent / "data" / INSPECT_LUA).read_text()


def _inspect_filter() -> hcm.HttpFilter:
    return hcm.HttpFilter(
        name="envoy.filters.http.lua",
        typed_config=_any(Lua(default_source_code=DataSource(inline_string=_inspect_lua()))),
    )


def _access_log(experiment: Experiment, name: str) -> AccessLog:
    spec = experiment.spec
    config = HttpGrpcAccessLogConfig(
        common_config=CommonGrpcAccessLogConfig(
            log_name=name,
            grpc_service=GrpcService(
                envoy_grpc=GrpcService.EnvoyGrpc(cluster_name=SIDECAR_CLUSTER)
            ),
            transport_api_version=ApiVersion.V3,
            # Entries reach the evaluator this much later at most (Envoy's default is 1 s).
            buffer_flush_interval=_ms(100),
            # Larger batches than Envoy's default 16 KiB (about 30 entries): each message costs
            # both sides a fixed gRPC price, so fewer, fuller ones are cheaper per request
            # (docs/PERFORMANCE.md). Per Envoy worker, flushed at the interval above anyway.
            buffer_size_bytes=UInt32Value(value=ALS_BUFFER_BYTES),
        ),
        additional_request_headers_to_log=[*spec.sticky_keys, h.SHADOW_COPY, h.FORCED],
        additional_response_headers_to_log=[h.VARIANT, "content-type"],
    )
    return AccessLog(name="envoy.access_loggers.http_grpc", typed_config=_any(config))


def _refusal(name: str, err: RoutingError, value: str | None, header: str) -> Route:
    """A forced request refused by Envoy itself, with the sidecar's JSON error body."""
    if value is None:
        match = HeaderMatcher(name=header, present_match=True)
    else:
        match = HeaderMatcher(name=header, string_match=StringMatcher(exact=value))
    return Route(
        name=name,
        match=RouteMatch(prefix="/", headers=[match]),
        direct_response=DirectResponseAction(
            status=err.status, body=DataSource(inline_string=err.body().decode())
        ),
        response_headers_to_add=[
            HeaderValueOption(
                header=HeaderValue(key="content-type", value="application/json"),
                append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
        ],
    )


def _native_routes(experiment: Experiment) -> list[Route]:
    spec = experiment.spec
    timeout = Duration(seconds=int(spec.envoy.request_timeout_s))
    strip = spec.forced_routing.strip
    routes: list[Route] = []
    fr = spec.forced_routing
    if fr.enabled:
        names = experiment.variant_names
        allowed = [v for v in names if not fr.allow or v in fr.allow]
        for name in allowed:
            routes.append(
                Route(
                    name=f"{FORCED_ROUTE}{name}",
                    match=RouteMatch(
                        prefix="/",
                        headers=[
                            HeaderMatcher(name=fr.header, string_match=StringMatcher(exact=name))
                        ],
                    ),
                    route=RouteAction(cluster=spec.variants[name].cluster, timeout=timeout),
                    response_headers_to_add=[_echo(name)],
                    request_headers_to_remove=strip,
                )
            )
        for name in names:
            if name not in allowed:
                refused = ForcingNotAllowed(
                    f"variant {name!r} may not be forced here", sorted(fr.allow)
                )
                routes.append(_refusal(f"refused_{name}", refused, name, fr.header))
        unknown = UnknownVariant(f"unknown variant in {fr.header}", list(names))
        routes.append(_refusal("refused_unknown", unknown, None, fr.header))
    # Static weights send everything to stable until the sidecar's RTDS layer arrives, so an
    # Envoy that starts without a sidecar never guesses at a candidate's share.
    stable_only = {experiment.stable: 100.0} | {
        v: 0.0 for v in experiment.variant_names if v != experiment.stable
    }
    by_cluster = {v.cluster: name for name, v in spec.variants.items()}
    weighted = WeightedCluster(
        runtime_key_prefix=RUNTIME_PREFIX,
        use_hash_policy=BoolValue(value=True),
        clusters=[
            WeightedCluster.ClusterWeight(
                name=cluster,
                weight=UInt32Value(value=bp),
                response_headers_to_add=[_echo(by_cluster.get(cluster, experiment.stable))],
            )
            for cluster, bp in cluster_weights(experiment, stable_only)
        ],
    )
    salt = spec.salt.replace("\\", "\\\\")  # RE2 substitutions treat backslashes as escapes
    action = RouteAction(
        weighted_clusters=weighted,
        timeout=timeout,
        # The first sticky key present decides (terminal), salted per experiment as the
        # sidecar salts its buckets; a request without one gets no hash, so a random cluster.
        hash_policy=[
            RouteAction.HashPolicy(
                header=RouteAction.HashPolicy.Header(
                    header_name=key,
                    regex_rewrite=RegexMatchAndSubstitute(
                        pattern=RegexMatcher(regex="^"), substitution=salt + ":"
                    ),
                ),
                terminal=True,
            )
            for key in spec.sticky_keys
        ],
    )
    if spec.shadow.variant and spec.shadow.share > 0:
        action.request_mirror_policies.append(
            RouteAction.RequestMirrorPolicy(
                cluster=SHADOW_CLUSTER,
                runtime_fraction=RuntimeFractionalPercent(
                    default_value=FractionalPercent(
                        numerator=round(spec.shadow.share * 10_000),
                        denominator=FractionalPercent.MILLION,
                    ),
                ),
            )
        )
    routes.append(
        Route(
            name="weighted",
            match=RouteMatch(prefix="/"),
            route=action,
            request_headers_to_remove=strip,
        )
    )
    return routes


def _native_manager(experiment: Experiment, *, shadow: bool) -> hcm.HttpConnectionManager:
    manager = _http_connection_manager(experiment, shadow=shadow)
    kept = [f for f in manager.http_filters if not f.name.startswith("extproc.")]
    del manager.http_filters[:]  # the ext_proc filter: Envoy routes by itself
    manager.http_filters.extend(kept)
    if not shadow:
        del manager.route_config.virtual_hosts[0].routes[:]
        manager.route_config.virtual_hosts[0].routes.extend(_native_routes(experiment))
    else:
        variant = experiment.spec.shadow.variant
        assert variant is not None
        manager.route_config.virtual_hosts[0].routes[0].response_headers_to_add.append(
            _echo(variant)
        )
    return manager


def build_native(experiment: Experiment, layout: EnvoyLayout) -> Bootstrap:
    """The ``dataplane: native`` bootstrap: Envoy's own sticky weighted routing, weights from the
    sidecar's RTDS layer, telemetry through the gRPC access log and a Lua filter."""
    boot = build_bootstrap(experiment, layout)
    res = boot.static_resources
    for listener in res.listeners:
        shadow = listener.name == "llm_shadow"
        listener.filter_chains[0].filters[0].typed_config.CopyFrom(
            _any(_native_manager(experiment, shadow=shadow))
        )
    stable = experiment.spec.variants[experiment.stable]
    target = layout.upstreams.get(experiment.stable) or stable.address
    assert target is not None  # build_bootstrap checked it
    # The last candidate's filler is the stable cluster itself.
    for name in experiment.candidates[:-1]:
        res.clusters.append(
            _cluster(lane_cluster(stable.cluster, name), target, http2=False, timeout_ms=2_000)
        )
    sidecar = ConfigSource(
        resource_api_version=ApiVersion.V3,
        api_config_source=ApiConfigSource(
            api_type=ApiConfigSource.GRPC,
            transport_api_version=ApiVersion.V3,
            grpc_services=[
                GrpcService(envoy_grpc=GrpcService.EnvoyGrpc(cluster_name=SIDECAR_CLUSTER))
            ],
        ),
        # Envoy starts serving (all on stable) without waiting long for a missing sidecar.
        initial_fetch_timeout=_ms(2_000),
    )
    # xDS requests name their node; one name for every gateway Envoy, as they all get one layer.
    boot.node.CopyFrom(Node(id="llm-gateway", cluster="llm-gateway"))
    boot.layered_runtime.CopyFrom(
        LayeredRuntime(
            layers=[
                RuntimeLayer(
                    name=RUNTIME_LAYER,
                    rtds_layer=RuntimeLayer.RtdsLayer(name=RUNTIME_LAYER, rtds_config=sidecar),
                )
            ]
        )
    )
    return boot


def build(experiment: Experiment, layout: EnvoyLayout) -> Bootstrap:
    """The bootstrap of the experiment's data plane."""
    if experiment.spec.dataplane == "native":
        return build_native(experiment, layout)
    return build_bootstrap(experiment, layout)


def to_yaml(bootstrap: Bootstrap, header: str = "") -> str:
    doc = json.loads(json_format.MessageToJson(bootstrap, preserving_proto_field_name=True))
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def render(experiment: Experiment, layout: EnvoyLayout) -> str:
    head = (
        f"# Generated by `extproc envoy-config` for experiment {experiment.name!r}.\n"
        "# Edit the experiment file and regenerate rather than editing this file.\n"
    )
    return to_yaml(build(experiment, layout), head)
