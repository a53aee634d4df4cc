"""Names the generated Envoy config and the sidecar must agree on.

The config generator writes them into Envoy's bootstrap; the data plane reads them back (a route
name in an access-log entry, a cluster in a mirror header, the RTDS layer it serves). They live here
so that the request path never has to load the generator to know them.
"""

from __future__ import annotations

SIDECAR_CLUSTER = "extproc_sidecar"
SHADOW_CLUSTER = "extproc_shadow"
"""The shadow listener's cluster: the sidecar names it in ``x-llm-shadow`` to mirror a request."""
SIDECAR_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
"""The name the sidecar reports health under (gRPC health protocol), as Envoy asks for it."""
RUNTIME_LAYER = "extproc"
"""The RTDS layer the sidecar serves: ``extproc.routing.<cluster>`` = weight in basis points."""
RUNTIME_PREFIX = "extproc.routing"
ACCESS_LOG = "extproc"
SHADOW_ACCESS_LOG = "extproc.shadow"
"""Access-log names, one per listener (the shadow listener's entries also carry its mark,
``x-llm-shadow-copy``, which is what the sidecar goes by)."""
FORCED_ROUTE = "forced_"
"""Route names ``forced_<variant>``: the access log tells a forced request by its route."""
FALLBACK_ROUTE = "fallback_stable"
"""The ext_proc plane's route for a request the sidecar did not route (it was down or late): the
access log tells such a request by its route, as the variant the route echoes is stable's."""
METADATA_NAMESPACE = "extproc"
"""The dynamic-metadata namespace the access log carries to the sidecar: written by inspect.lua
(what the response body showed) and, on the ext_proc plane, by the sidecar's answers (whether a
captured request asked for JSON)."""


def lane_cluster(stable_cluster: str, candidate: str) -> str:
    """The stable variant's cluster under another name, holding the unused part of a lane."""
    return f"{stable_cluster}_lane_{candidate}"


# --- fleet mode: one Envoy, one sidecar fleet, every experiment in Redis ---------------------
MODEL_KEY = "model"
"""The request body's ``model``, written by Envoy's JSON-to-metadata filter into the
``extproc`` namespace and forwarded to the sidecar with the request headers."""
ROUTE_ATTRIBUTE = "xds.route_name"
"""The ext_proc request attribute naming the gateway route a request matched before the sidecar
routed it; experiments select by it."""
ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"
"""The key of ``ProcessingRequest.attributes`` under which Envoy sends the request attributes."""
PASSED_KEY = "passed"
"""Dynamic metadata a fleet sidecar sets on a request no experiment took, so that the access log
tells it from a request the sidecar never answered (which it files as a fallback)."""
EXPERIMENT_ROUTE = "experiment"
"""The fleet listener's route for requests the sidecar routed (``cluster_header``)."""
