"""The Envoy configurations bench/run.py compares, built from the package's own config builders.

Why derive them rather than write YAML: each variant must differ from what ``extproc
envoy-config`` ships in exactly one respect, so the figures measure that respect and nothing else.
Every variant starts from ``envoyconf.ext_proc.build_bootstrap`` (the shipped ext_proc
config), ``envoyconf.native.build_native`` (the shipped ``dataplane: native`` config) or
``envoyconf.ext_proc.build_baseline`` (bare weighted routing) and edits the typed messages;
Envoy checks them when it starts, as ``envoy --mode validate`` would.

Variants (``PROXIES``):

``bare``
    Envoy alone, ``weighted_clusters`` at the file's weights: the reference.
``minimal``
    the shipped ext_proc config without its telemetry (no Lua filter, no access log), its
    ``route`` filter served by ``bench/minimal_extproc.py``: the least a Python ext_proc server
    can do to route (a prebuilt answer per stream). The reference the ext_proc plane is held to.
``minimal-uvloop``
    ``minimal`` on uvloop's event loop, the one the sidecar runs on: what the loop alone changes.
``ext_proc``
    what ships as ``dataplane: ext_proc`` (the default), unedited but for the filter's stat
    prefix: ext_proc ``route`` (blocking, request headers only; bodies only for the captured
    sample, none here), the inspector (``extproc/envoyconf/inspector.py``) and a gRPC access log
    to the sidecar, which turns each entry into an event (``extproc/dataplane/accesslog.py``).
``native``
    what ships as ``dataplane: native``, unedited (``envoyconf.native.build_native``): Envoy's own
    sticky weighted routing with weights from the sidecar's RTDS layer, forced-routing routes,
    the same inspector and access log. The sidecar is off the request path;
    ``bench/run.py`` starts measuring once Envoy holds the weights.
``native-lua``
    ``native`` with the Lua inspector, what a stock Envoy image runs. Every other configuration
    with telemetry uses the inspector the local stack picks (``EXTPROC_INSPECTOR``, by default
    the compiled module when a C compiler is there; the run prints which).
``native-16k``
    ``native`` with Envoy's default access-log buffer (16 KiB) instead of the shipped 256 KiB:
    what batching the access log into fewer, fuller messages saves.
``native-lua-empty``
    ``native`` with an empty ``envoy_on_response`` instead of ``inspect.lua``: what running any
    Lua per response costs, apart from what the script does (events then lack body fields).
``native-noinspect``
    ``native`` without its inspector: entries have no body fields (tokens, first token, answer
    signals), so what the body's telemetry costs Envoy and the sidecar shows against ``native``.
``route``
    ``ext_proc`` without its telemetry (no Lua filter, no access log): the price of the
    package's routing decision alone, next to ``minimal``.
``hash-als``
    no ext_proc at all: Envoy's own sticky weighted routing (``use_hash_policy`` with a salted
    hash of the sticky header, static weights) + the access logger to ``bench/als_sink.py``, no
    Lua filter: ``native`` without its body telemetry, forced routes and RTDS.

The ext_proc filter gets a ``stat_prefix`` (``route``) so Envoy counts its messages apart; a stat
prefix changes nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.request import urlopen

from envoy.config.accesslog.v3.accesslog_pb2 import AccessLog
from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.config.core.v3.config_source_pb2 import ApiVersion
from envoy.config.core.v3.grpc_service_pb2 import GrpcService
from envoy.config.route.v3.route_components_pb2 import RouteAction
from envoy.extensions.access_loggers.file.v3.file_pb2 import FileAccessLog
from envoy.extensions.access_loggers.grpc.v3.als_pb2 import (
    CommonGrpcAccessLogConfig,
    HttpGrpcAccessLogConfig,
)
from envoy.extensions.filters.http.ext_proc.v3.ext_proc_pb2 import ExternalProcessor
from envoy.extensions.filters.http.lua.v3.lua_pb2 import Lua
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.type.matcher.v3.regex_pb2 import RegexMatchAndSubstitute, RegexMatcher
from google.protobuf import any_pb2, json_format
from google.protobuf.wrappers_pb2 import BoolValue

from extproc.config import Experiment
from extproc.contract import headers as h
from extproc.contract.envoy import SIDECAR_CLUSTER
from extproc.envoyconf.common import EnvoyLayout
from extproc.envoyconf.ext_proc import build_baseline, build_bootstrap
from extproc.envoyconf.inspector import INSPECTORS, Inspector, inspect_filter
from extproc.envoyconf.native import build_native
from extproc.routing.lanes import runtime_weights

ALS_CLUSTER = "extproc_als"


@dataclass(frozen=True)
class Proxy:
    """One configuration under test and what it needs running besides Envoy."""

    name: str
    summary: str
    build: Callable[[Experiment, EnvoyLayout, str], Bootstrap]  # (exp, layout, als address)
    sidecar: bool  # the package's sidecar (``extproc serve``) serves it
    helper: str | None  # a bench/ script that serves it: als_sink.py, minimal_extproc.py
    telemetry: bool  # an event per request is expected in Redis
    dataplane: str = "ext_proc"  # the experiment's ``dataplane`` (what the sidecar serves)
    inspector: Inspector | None = None  # None: what the local stack picks (module when it builds)
    helper_args: tuple[str, ...] = ()  # the helper's own flags


def _pack(msg: Any) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def _manager(boot: Bootstrap) -> hcm.HttpConnectionManager:
    msg = hcm.HttpConnectionManager()
    boot.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.Unpack(msg)
    return msg


def _store(boot: Bootstrap, msg: hcm.HttpConnectionManager) -> Bootstrap:
    boot.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.CopyFrom(_pack(msg))
    return boot


def _edit_ext_proc(
    manager: hcm.HttpConnectionManager, name: str, edit: Callable[[ExternalProcessor], None]
) -> None:
    for f in manager.http_filters:
        if f.name == name:
            proc = ExternalProcessor()
            f.typed_config.Unpack(proc)
            edit(proc)
            f.typed_config.CopyFrom(_pack(proc))
            return
    raise KeyError(name)


def _prefixed(exp: Experiment, layout: EnvoyLayout) -> tuple[Bootstrap, hcm.HttpConnectionManager]:
    boot = build_bootstrap(exp, layout)
    manager = _manager(boot)

    def route(p: ExternalProcessor) -> None:
        p.stat_prefix = "route"

    _edit_ext_proc(manager, "extproc.route", route)
    return boot, manager


def _without_telemetry(manager: hcm.HttpConnectionManager) -> None:
    """No Lua filter, no access log: routing alone."""
    keep = [f for f in manager.http_filters if f.name != "envoy.filters.http.lua"]
    del manager.http_filters[:]
    manager.http_filters.extend(keep)
    manager.ClearField("access_log")
    manager.ClearField("access_log_options")


def _access_log(exp: Experiment) -> AccessLog:
    spec = exp.spec
    wanted = list(spec.sticky_keys)
    if spec.forced_routing.enabled:
        wanted.append(spec.forced_routing.header)
    config = HttpGrpcAccessLogConfig(
        common_config=CommonGrpcAccessLogConfig(
            log_name="extproc",
            grpc_service=GrpcService(envoy_grpc=GrpcService.EnvoyGrpc(cluster_name=ALS_CLUSTER)),
            transport_api_version=ApiVersion.V3,
        ),
        additional_request_headers_to_log=wanted,
        # content-type as the shipped access log has it: the shared mapper marks SSE as streamed
        additional_response_headers_to_log=[h.VARIANT, "content-type"],
    )
    return AccessLog(name="envoy.access_loggers.http_grpc", typed_config=_pack(config))


def _als_cluster(exp: Experiment, als: str) -> Cluster:
    """An HTTP/2 cluster like the sidecar's, pointing at the access-log sink."""
    boot = build_bootstrap(exp, EnvoyLayout(sidecar=als))
    cluster = Cluster()
    cluster.CopyFrom(boot.static_resources.clusters[0])
    assert cluster.name == SIDECAR_CLUSTER
    cluster.name = ALS_CLUSTER
    cluster.load_assignment.cluster_name = ALS_CLUSTER
    return cluster


def bare(exp: Experiment, layout: EnvoyLayout, als: str) -> Bootstrap:
    return build_baseline(exp, layout)


def ext_proc(exp: Experiment, layout: EnvoyLayout, als: str) -> Bootstrap:
    boot, manager = _prefixed(exp, layout)
    return _store(boot, manager)


def native(exp: Experiment, layout: EnvoyLayout, als: str) -> Bootstrap:
    """The shipped ``dataplane: native`` bootstrap as ``extproc envoy-config`` renders it."""
    return build_native(exp, layout)


def native_16k(exp: Experiment, layout: EnvoyLayout, als: str) -> Bootstrap:
    boot = build_native(exp, layout)
    manager = _manager(boot)
    for log in manager.access_log:
        config = HttpGrpcAccessLogConfig()
        log.typed_config.Unpack(config)
        config.common_config.ClearField("buffer_size_bytes")
        log.typed_config.CopyFrom(_pack(config))
    return _store(boot, manager)


def native_lua_empty(exp: Experiment, layout: EnvoyLayout, als: str) -> Bootstrap:
    boot = build_native(exp, layout)
    manager = _manager(boot)
    for f in manager.http_filters:
        if f.name == "envoy.filters.http.lua":
            lua = Lua()
            f.typed_config.Unpack(lua)
            lua.default_source_code.inline_string = "function envoy_on_response(handle) end\n"
            f.typed_config.CopyFrom(_pack(lua))
    return _store(boot, manager)


def route_only(exp: Experiment, layout: EnvoyLayout, als: str) -> Bootstrap:
    boot, manager = _prefixed(exp, layout)
    _without_telemetry(manager)
    return _store(boot, manager)


def minimal(exp: Experiment, layout: EnvoyLayout, helper: str) -> Bootstrap:
    """``route`` with its ext_proc filter pointed at the minimal server instead of the sidecar."""
    return route_only(exp, replace(layout, sidecar=helper), helper)


def hash_als(exp: Experiment, layout: EnvoyLayout, als: str) -> Bootstrap:
    """Sticky weighted routing inside Envoy: the route hashes the first sticky header present
    (salted by a regex rewrite, ``terminal`` so later keys are ignored) and ``use_hash_policy``
    picks the weighted cluster from that hash; each cluster echoes its variant."""
    boot = build_baseline(exp, layout)
    manager = _manager(boot)
    action = manager.route_config.virtual_hosts[0].routes[0].route
    action.weighted_clusters.use_hash_policy.CopyFrom(BoolValue(value=True))
    by_cluster = {v.cluster: name for name, v in exp.spec.variants.items()}
    for cw in action.weighted_clusters.clusters:
        cw.response_headers_to_add.append(
            HeaderValueOption(
                header=HeaderValue(key=h.VARIANT, value=by_cluster[cw.name]),
                append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
        )
    for key in exp.spec.sticky_keys:
        action.hash_policy.append(
            RouteAction.HashPolicy(
                header=RouteAction.HashPolicy.Header(
                    header_name=key,
                    regex_rewrite=RegexMatchAndSubstitute(
                        pattern=RegexMatcher(regex="^"), substitution=exp.spec.salt + ":"
                    ),
                ),
                terminal=True,
            )
        )
    manager.access_log.append(_access_log(exp))
    boot.static_resources.clusters.append(_als_cluster(exp, als))
    return _store(boot, manager)


# --- where native's cost goes: the shipped config with its access log taken apart -------------


def native_sink(exp: Experiment, layout: EnvoyLayout, als: str) -> Bootstrap:
    """The shipped native config, its access log sent to a sink that maps nothing (the sidecar
    still serves the weights): the ceiling of any Python sidecar behind this access log."""
    boot = build_native(exp, layout)
    manager = _manager(boot)
    for log in manager.access_log:
        config = HttpGrpcAccessLogConfig()
        log.typed_config.Unpack(config)
        config.common_config.grpc_service.envoy_grpc.cluster_name = ALS_CLUSTER
        log.typed_config.CopyFrom(_pack(config))
    boot.static_resources.clusters.append(_als_cluster(exp, als))
    return _store(boot, manager)


def native_nolog(exp: Experiment, layout: EnvoyLayout, als: str) -> Bootstrap:
    """The shipped native config without its access log: routing and the inspector alone."""
    boot = build_native(exp, layout)
    manager = _manager(boot)
    manager.ClearField("access_log")
    return _store(boot, manager)


_INSPECTOR_FILTERS = {inspect_filter(kind).name for kind in INSPECTORS}


def native_noinspect(exp: Experiment, layout: EnvoyLayout, als: str) -> Bootstrap:
    """The shipped native config without its inspector: no body fields reach the access log (no
    tokens, first token or answer signals), so neither Envoy nor the sidecar spends anything on
    the body. What the body's telemetry costs the native plane, on both sides."""
    boot = build_native(exp, layout)
    manager = _manager(boot)
    kept = [f for f in manager.http_filters if f.name not in _INSPECTOR_FILTERS]
    del manager.http_filters[:]
    manager.http_filters.extend(kept)
    return _store(boot, manager)


def _compact_line(exp: Experiment) -> str:
    """The fields the sidecar takes from an access-log entry, as one line of Envoy's text
    formatter (tab-separated)."""
    fields = [
        "%START_TIME(%s%6f)%",
        "%REQ(x-request-id)%",
        *(f"%REQ({key})%" for key in exp.spec.sticky_keys),
        f"%REQ({h.SHADOW_COPY})%",
        f"%REQ({h.FORCED})%",
        f"%RESP({h.VARIANT})%",
        "%RESP(content-type)%",
        "%RESPONSE_CODE%",
        "%RESPONSE_CODE_DETAILS%",
        "%RESPONSE_FLAGS%",
        "%BYTES_SENT%",
        "%ROUTE_NAME%",
        "%UPSTREAM_CLUSTER%",
        "%RESPONSE_DURATION%",
        "%DURATION%",
        "%DYNAMIC_METADATA(extproc)%",
    ]
    return "\t".join(fields) + "\n"


def native_filelog(exp: Experiment, layout: EnvoyLayout, als: str) -> Bootstrap:
    """The shipped native config with its gRPC access log replaced by the same fields formatted
    as one text line into /dev/null: what Envoy's formatting costs apart from the gRPC log."""
    boot = build_native(exp, layout)
    manager = _manager(boot)
    config = FileAccessLog(path="/dev/null")
    config.log_format.text_format_source.inline_string = _compact_line(exp)
    manager.ClearField("access_log")
    manager.access_log.append(
        AccessLog(name="envoy.access_loggers.file", typed_config=_pack(config))
    )
    return _store(boot, manager)


PROXIES: dict[str, Proxy] = {
    p.name: p
    for p in (
        Proxy("bare", "bare Envoy weighted_clusters", bare, False, None, False),
        Proxy(
            "minimal",
            "reference: a minimal Python ext_proc (request headers only, no telemetry)",
            minimal,
            sidecar=False,
            helper="minimal_extproc.py",
            telemetry=False,
        ),
        Proxy(
            "minimal-uvloop",
            "reference: the minimal Python ext_proc on uvloop's event loop (the sidecar's)",
            minimal,
            sidecar=False,
            helper="minimal_extproc.py",
            telemetry=False,
            helper_args=("--uvloop",),
        ),
        Proxy(
            "ext_proc",
            "shipped dataplane ext_proc: route stream + inspector + access log",
            ext_proc,
            sidecar=True,
            helper=None,
            telemetry=True,
        ),
        Proxy(
            "native",
            "shipped dataplane native: Envoy routes, RTDS + inspector + access log",
            native,
            sidecar=True,
            helper=None,
            telemetry=True,
            dataplane="native",
        ),
        Proxy(
            "native-lua",
            "shipped dataplane native with the Lua inspector (a stock Envoy image)",
            native,
            sidecar=True,
            helper=None,
            telemetry=True,
            dataplane="native",
            inspector="lua",
        ),
        Proxy(
            "native-16k",
            "native with Envoy's default 16 KiB access-log buffer",
            native_16k,
            sidecar=True,
            helper=None,
            telemetry=True,
            dataplane="native",
        ),
        Proxy(
            "native-lua-empty",
            "native with an empty Lua script",
            native_lua_empty,
            sidecar=True,
            helper=None,
            telemetry=True,
            dataplane="native",
            inspector="lua",
        ),
        Proxy(
            "native-sink",
            "native, its access log to a sink that decodes the entries and maps nothing",
            native_sink,
            sidecar=True,
            helper="als_sink.py",
            telemetry=False,
            dataplane="native",
            helper_args=("--discard",),
        ),
        Proxy(
            "native-nolog",
            "native without its access log (routing and inspector only)",
            native_nolog,
            sidecar=True,
            helper=None,
            telemetry=False,
            dataplane="native",
        ),
        Proxy(
            "native-noinspect",
            "native without its inspector (no body fields: tokens, first token, answer signals)",
            native_noinspect,
            sidecar=True,
            helper=None,
            telemetry=True,
            dataplane="native",
        ),
        Proxy(
            "native-filelog",
            "native, the access log's fields as one text line to /dev/null instead of gRPC",
            native_filelog,
            sidecar=True,
            helper=None,
            telemetry=False,
            dataplane="native",
        ),
        Proxy("route", "ext_proc route filter only (no telemetry)", route_only, True, None, False),
        Proxy(
            "hash-als",
            "Envoy hash routing + gRPC access log, no Lua",
            hash_als,
            sidecar=False,
            helper="als_sink.py",
            telemetry=True,
        ),
    )
}


def upstream_config(listen_port: int, admin_port: int, stream_port: int | None) -> dict[str, Any]:
    """A model-server stand-in that costs next to nothing: Envoy answering ``direct_response``
    with a fixed chat completion (with ``usage``, so the observer parses a realistic body).
    Requests carrying ``x-bench-stream`` go on to the streaming mock model instead."""
    body = (
        '{"id":"chatcmpl-bench","object":"chat.completion","created":1767225600,"model":"m",'
        '"choices":[{"index":0,"message":{"role":"assistant","content":"Lorem ipsum dolor sit '
        'amet consectetur adipiscing elit sed do eiusmod tempor."},"finish_reason":"stop"}],'
        '"usage":{"prompt_tokens":1,"completion_tokens":12,"total_tokens":13}}'
    )
    routes: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    if stream_port is not None:
        routes.append(
            {
                "match": {
                    "prefix": "/",
                    "headers": [{"name": "x-bench-stream", "present_match": True}],
                },
                "route": {"cluster": "stream", "timeout": "0s"},
            }
        )
        clusters.append(
            {
                "name": "stream",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": "stream",
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {
                                    "endpoint": {
                                        "address": {
                                            "socket_address": {
                                                "address": "127.0.0.1",
                                                "port_value": stream_port,
                                            }
                                        }
                                    }
                                }
                            ]
                        }
                    ],
                },
            }
        )
    routes.append(
        {
            "match": {"prefix": "/"},
            "direct_response": {"status": 200, "body": {"inline_string": body}},
            "response_headers_to_add": [
                {
                    "header": {"key": "content-type", "value": "application/json"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
        }
    )
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
        ".v3.HttpConnectionManager",
        "stat_prefix": "upstream",
        "route_config": {"virtual_hosts": [{"name": "up", "domains": ["*"], "routes": routes}]},
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "upstream",
                    "address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": listen_port}
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }


def native_layer(exp: Experiment) -> dict[str, int]:
    """The RTDS layer the sidecar serves for the experiment file's weights (a fresh Redis holds
    those): runtime key -> basis points."""
    return runtime_weights(exp, exp.file_weights())


def envoy_runtime(admin_port: int) -> dict[str, int]:
    """The numeric runtime values Envoy routes with now, from its admin ``/runtime`` page."""
    with urlopen(f"http://127.0.0.1:{admin_port}/runtime", timeout=5) as resp:
        doc = json.loads(resp.read())
    out = {}
    for key, v in doc.get("entries", {}).items():
        try:
            out[key] = int(float(v["final_value"]))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def to_json(boot: Bootstrap) -> dict[str, Any]:
    doc: dict[str, Any] = json_format.MessageToDict(boot, preserving_proto_field_name=True)
    return doc
