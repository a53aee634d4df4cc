"""Header names of the routing contract, shared by the sidecar, the Envoy config and the tools."""

VARIANT = "x-llm-variant"
"""Set by the sidecar for Envoy to route on, echoed on the response. Never trusted from clients."""

REQUEST_ID = "x-request-id"
AUTHORITY = ":authority"
SHADOW_SUFFIX = "-shadow"
"""Envoy appends this to :authority on mirrored requests."""
