"""Envoy clusters and the small message helpers every config builder shares.

Here rather than with the bootstrap builders because the data plane builds clusters too: a fleet
sidecar serves each experiment variant's cluster to Envoy on demand, made exactly as a
generated bootstrap makes a variant's cluster.
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.address_pb2 import Address, Pipe, SocketAddress
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
from envoy.extensions.upstreams.http.v3.http_protocol_options_pb2 import HttpProtocolOptions
from google.protobuf import any_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
VARIANT_CONNECT_TIMEOUT_MS = 2_000


def typed(msg: Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def millis(ms: int) -> Duration:
    return Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def socket_address(target: str) -> Address:
    if target.startswith("unix:"):
        return Address(pipe=Pipe(path=target.removeprefix("unix:")))
    host, _, port = target.rpartition(":")
    return Address(socket_address=SocketAddress(address=host, port_value=int(port)))


def _is_ip_or_pipe(target: str) -> bool:
    return target.startswith("unix:") or target.rpartition(":")[0].replace(".", "").isdigit()


def static_cluster(
    name: str, targets: str | Sequence[str], *, http2: bool, timeout_ms: int
) -> Cluster:
    addresses = [targets] if isinstance(targets, str) else list(targets)
    static = all(_is_ip_or_pipe(t) for t in addresses)
    if not static and any(t.startswith("unix:") for t in addresses):
        raise ValueError(f"{name}: Unix sockets and DNS names cannot share a cluster")
    endpoints = [LbEndpoint(endpoint=Endpoint(address=socket_address(t))) for t in addresses]
    opts = HttpProtocolOptions()
    if http2:
        opts.explicit_http_config.http2_protocol_options.CopyFrom(
            Http2ProtocolOptions(
                connection_keepalive=KeepaliveSettings(
                    interval=millis(30_000), timeout=millis(5_000)
                )
            )
        )
    else:
        opts.explicit_http_config.http_protocol_options.CopyFrom(Http1ProtocolOptions())
    return Cluster(
        name=name,
        type=Cluster.STATIC if static else Cluster.STRICT_DNS,
        connect_timeout=millis(timeout_ms),
        load_assignment=ClusterLoadAssignment(
            cluster_name=name, endpoints=[LocalityLbEndpoints(lb_endpoints=endpoints)]
        ),
        typed_extension_protocol_options={PROTOCOL_OPTIONS: typed(opts)},
    )


def variant_cluster(name: str, address: str) -> Cluster:
    """A model server's cluster: plain HTTP/1.1, as a variant's in a generated bootstrap."""
    return static_cluster(name, address, http2=False, timeout_ms=VARIANT_CONNECT_TIMEOUT_MS)
