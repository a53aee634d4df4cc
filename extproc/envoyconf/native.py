"""The bootstrap of ``dataplane: native``: Envoy routes every request by itself.

The sidecar leaves the request path: Envoy splits traffic by buckets of the sticky key with the
live weights the sidecar serves over RTDS, forced routing and refusals are routes of their own,
and telemetry comes from the access log as on the ext_proc plane.
"""

from __future__ import annotations

from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap, LayeredRuntime, RuntimeLayer
from envoy.config.core.v3.base_pb2 import (
    DataSource,
    HeaderValue,
    HeaderValueOption,
    Node,
    RuntimeFractionalPercent,
)
from envoy.config.core.v3.config_source_pb2 import ApiConfigSource, ApiVersion, ConfigSource
from envoy.config.core.v3.grpc_service_pb2 import GrpcService
from envoy.config.route.v3.route_components_pb2 import (
    DirectResponseAction,
    HeaderMatcher,
    Route,
    RouteAction,
    RouteMatch,
    WeightedCluster,
)
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.type.matcher.v3.regex_pb2 import RegexMatchAndSubstitute, RegexMatcher
from envoy.type.matcher.v3.string_pb2 import StringMatcher
from envoy.type.v3.percent_pb2 import FractionalPercent
from google.protobuf.wrappers_pb2 import BoolValue, UInt32Value

from extproc.config import Experiment
from extproc.contract.clusters import millis, static_cluster, typed
from extproc.contract.envoy import (
    FORCED_ROUTE,
    RUNTIME_LAYER,
    RUNTIME_PREFIX,
    SHADOW_CLUSTER,
    SIDECAR_CLUSTER,
    lane_cluster,
)
from extproc.contract.errors import ForcingNotAllowed, RoutingError, UnknownVariant
from extproc.envoyconf.common import (
    EnvoyLayout,
    request_timeout,
)
from extproc.envoyconf.ext_proc import (
    ROUTE_FILTER,
    build_bootstrap,
    echo,
    http_connection_manager,
)
from extproc.envoyconf.inspector import Inspector
from extproc.routing.lanes import cluster_weights


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
    timeout = request_timeout(experiment)
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
                    response_headers_to_add=[echo(name)],
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
                response_headers_to_add=[echo(by_cluster.get(cluster, experiment.stable))],
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


def _native_manager(
    experiment: Experiment, *, shadow: bool, inspector: Inspector
) -> hcm.HttpConnectionManager:
    manager = http_connection_manager(experiment, shadow=shadow, inspector=inspector)
    kept = [f for f in manager.http_filters if f.name != ROUTE_FILTER]
    del manager.http_filters[:]  # the ext_proc filter: Envoy routes by itself
    manager.http_filters.extend(kept)
    if not shadow:
        del manager.route_config.virtual_hosts[0].routes[:]
        manager.route_config.virtual_hosts[0].routes.extend(_native_routes(experiment))
    else:
        variant = experiment.spec.shadow.variant
        assert variant is not None
        manager.route_config.virtual_hosts[0].routes[0].response_headers_to_add.append(
            echo(variant)
        )
    return manager


def build_native(experiment: Experiment, layout: EnvoyLayout) -> Bootstrap:
    """The ``dataplane: native`` bootstrap: Envoy's own sticky weighted routing, weights from the
    sidecar's RTDS layer, telemetry through the gRPC access log and the inspector."""
    boot = build_bootstrap(experiment, layout)
    res = boot.static_resources
    for listener in res.listeners:
        shadow = listener.name == "llm_shadow"
        listener.filter_chains[0].filters[0].typed_config.CopyFrom(
            typed(_native_manager(experiment, shadow=shadow, inspector=layout.inspector))
        )
    stable = experiment.spec.variants[experiment.stable]
    target = layout.upstreams.get(experiment.stable) or stable.address
    assert target is not None  # build_bootstrap checked it
    # The last candidate's filler is the stable cluster itself.
    for name in experiment.candidates[:-1]:
        res.clusters.append(
            static_cluster(
                lane_cluster(stable.cluster, name), target, http2=False, timeout_ms=2_000
            )
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
        initial_fetch_timeout=millis(2_000),
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
