"""Header names of the routing contract, shared by the sidecar, the Envoy config and the tools."""

VARIANT = "x-llm-variant"
"""Set by the sidecar for Envoy to route on, echoed on the response. Never trusted from clients."""

REQUEST_ID = "x-request-id"
AUTHORITY = ":authority"
SHADOW_SUFFIX = "-shadow"
"""Envoy appends this to the host of :authority on mirrored requests (before any port)."""


def is_shadow(authority: bytes) -> bool:
    """``api-shadow``, ``api-shadow:8000`` and ``127.0.0.1-shadow:10000`` are mirrored copies."""
    host = authority.rsplit(b":", 1)[0] if authority.count(b":") == 1 else authority
    return host.endswith(b"-shadow")


SHADOW = "x-llm-shadow"
"""Set by the sidecar on requests Envoy should mirror; its value names the mirror cluster."""
