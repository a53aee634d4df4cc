"""What both data planes' Envoy bootstraps share: the layout a deployment gives (listen
addresses, the sidecar's replicas and TLS, the model servers), clusters, the sidecar's gRPC
cluster, the listeners' early header mutations, the gRPC access log that carries every request's
telemetry to the sidecar. The filter that reads what only the response body shows is in
``inspector.py``.

Built from Envoy's typed API messages (``xds-protos``) rather than templated YAML: a wrong field
name or type fails here, in Python, before Envoy sees the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from envoy.config.accesslog.v3.accesslog_pb2 import AccessLog
from envoy.config.cluster.v3.circuit_breaker_pb2 import CircuitBreakers
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.common.mutation_rules.v3.mutation_rules_pb2 import HeaderMutation
from envoy.config.core.v3.base_pb2 import (
    DataSource,
    HeaderValue,
    HeaderValueOption,
    TransportSocket,
)
from envoy.config.core.v3.config_source_pb2 import ApiVersion
from envoy.config.core.v3.grpc_service_pb2 import GrpcService
from envoy.config.core.v3.health_check_pb2 import HealthCheck
from envoy.config.listener.v3.listener_components_pb2 import Filter, FilterChain
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.extensions.access_loggers.grpc.v3.als_pb2 import (
    CommonGrpcAccessLogConfig,
    HttpGrpcAccessLogConfig,
)
from envoy.extensions.filters.http.ext_proc.v3.ext_proc_pb2 import ExternalProcessor
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.transport_sockets.tls.v3.common_pb2 import (
    CertificateValidationContext,
    SubjectAltNameMatcher,
    TlsCertificate,
)
from envoy.extensions.transport_sockets.tls.v3.tls_pb2 import CommonTlsContext, UpstreamTlsContext
from envoy.type.matcher.v3.string_pb2 import StringMatcher
from google.protobuf.duration_pb2 import Duration
from google.protobuf.wrappers_pb2 import UInt32Value

from extproc.config import Experiment
from extproc.contract import headers as h
from extproc.contract.clusters import millis, socket_address, static_cluster, typed
from extproc.contract.envoy import (
    SIDECAR_CLUSTER,
    SIDECAR_SERVICE,
)
from extproc.envoyconf.inspector import Inspector


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
    inspector: Inspector = "lua"  # the response-body reader: envoyconf/inspector.py


def request_timeout(experiment: Experiment) -> Duration:
    """The routes' upstream timeout, ``envoy.request_timeout_s`` to the millisecond: whole
    seconds alone made 0.5 s a 0, which Envoy reads as no timeout at all."""
    return millis(max(1, round(experiment.spec.envoy.request_timeout_s * 1000)))


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
    return TransportSocket(name="envoy.transport_sockets.tls", typed_config=typed(ctx))


# Envoy's default circuit breaker (1,024 requests in flight per cluster) counts gRPC streams; past
# it Envoy fails ext_proc streams, routing ones included, and routes those requests to stable
# (stickiness broken, telemetry lost) while every user still sees 200. The sidecar, not Envoy,
# bounds its own backlog, so the breaker is set out of the way.
SIDECAR_STREAM_LIMIT = 100_000


def sidecar_cluster(layout: EnvoyLayout) -> Cluster:
    cluster = static_cluster(SIDECAR_CLUSTER, layout.sidecar, http2=True, timeout_ms=250)
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
                timeout=millis(250),
                interval=millis(1_000),
                no_traffic_interval=millis(5_000),
                unhealthy_threshold=UInt32Value(value=2),
                healthy_threshold=UInt32Value(value=1),
                grpc_health_check=HealthCheck.GrpcHealthCheck(service_name=SIDECAR_SERVICE),
            )
        )
    return cluster


def routing_processor(message_timeout_ms: int) -> ExternalProcessor:
    """The blocking ext_proc filter both ext_proc listeners start from: request headers only,
    failing open to the default route; what a listener adds (captures, metadata) it sets."""
    skip = ProcessingMode.SKIP
    return ExternalProcessor(
        grpc_service=GrpcService(envoy_grpc=GrpcService.EnvoyGrpc(cluster_name=SIDECAR_CLUSTER)),
        failure_mode_allow=True,
        processing_mode=ProcessingMode(
            request_header_mode=ProcessingMode.SEND,
            response_header_mode=skip,
            request_trailer_mode=skip,
            response_trailer_mode=skip,
        ),
        message_timeout=millis(message_timeout_ms),
    )


def early_mutations(*, shadow: bool) -> list[HeaderMutation]:
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


def http_listener(name: str, address: str, manager: hcm.HttpConnectionManager) -> Listener:
    return Listener(
        name=name,
        address=socket_address(address),
        filter_chains=[
            FilterChain(
                filters=[
                    Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=typed(manager),
                    )
                ]
            )
        ],
    )


# --- telemetry, shared by both data planes, and dataplane: native -------------------------------
#
# Both planes send every request's telemetry through Envoy's gRPC access log, with what the body
# showed the inspector (inspect.lua, or its compiled twin: inspector.py). With native, Envoy also
# routes every request by itself and never waits for the sidecar; the sidecar feeds Envoy the
# live weights over RTDS. Measured in docs/PERFORMANCE.md: the ext_proc round trip is the floor
# of the default data path's added latency, and native removes it.
ALS_BUFFER_BYTES = 256 * 1024


def access_log_to_sidecar(experiment: Experiment, name: str) -> AccessLog:
    return grpc_access_log(name, [*experiment.spec.sticky_keys, h.SHADOW_COPY, h.FORCED])


def grpc_access_log(name: str, request_headers: Sequence[str]) -> AccessLog:
    """The gRPC access log to the sidecar, logging these request headers (the sticky keys the
    sidecar hashes, and the marks it reads)."""
    config = HttpGrpcAccessLogConfig(
        common_config=CommonGrpcAccessLogConfig(
            log_name=name,
            grpc_service=GrpcService(
                envoy_grpc=GrpcService.EnvoyGrpc(cluster_name=SIDECAR_CLUSTER)
            ),
            transport_api_version=ApiVersion.V3,
            # Entries reach the evaluator this much later at most (Envoy's default is 1 s).
            buffer_flush_interval=millis(100),
            # Larger batches than Envoy's default 16 KiB (about 30 entries): each message costs
            # both sides a fixed gRPC price, so fewer, fuller ones are cheaper per request
            # (docs/PERFORMANCE.md). Per Envoy worker, flushed at the interval above anyway.
            buffer_size_bytes=UInt32Value(value=ALS_BUFFER_BYTES),
        ),
        additional_request_headers_to_log=list(request_headers),
        additional_response_headers_to_log=[h.VARIANT, "content-type"],
    )
    return AccessLog(name="envoy.access_loggers.http_grpc", typed_config=typed(config))
