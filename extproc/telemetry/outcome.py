"""What one telemetry event says about its request, defined once for every reader.

The evaluator's window, ``extproc status``, ``top``, the dashboard and ``/metrics`` all count
errors, timeouts and answer signals. When each classified events on its own, the page's error
rate (every error class) and the guardrail's (server errors only) disagreed on the same traffic.
Every reader classifies through this module instead.
"""

from __future__ import annotations

from extproc.telemetry.v1.event_pb2 import Assignment, ErrorClass, TelemetryEvent

SERVER_ERRORS = frozenset(
    {
        int(ErrorClass.ERROR_CLASS_UPSTREAM_5XX),
        int(ErrorClass.ERROR_CLASS_TIMEOUT),
        int(ErrorClass.ERROR_CLASS_RESET),
    }
)
"""The variant's failures: counted in the error rate that guardrails, status and the page show."""

CLIENT_ERRORS = frozenset(
    {int(ErrorClass.ERROR_CLASS_CLIENT_DISCONNECT), int(ErrorClass.ERROR_CLASS_CLIENT_ERROR)}
)
"""The caller's doing (a 4xx, a client that hung up): shown apart, never charged to a variant."""

_FORCED = int(Assignment.ASSIGNMENT_FORCED)


def is_notice(ev: TelemetryEvent) -> bool:
    """An in-flight notice (the request is still open), not the request's end."""
    return ev.in_flight


def is_forced(ev: TelemetryEvent) -> bool:
    """Tester traffic (``x-experiment``): counted apart, never in a comparison."""
    return ev.assignment == _FORCED


def is_assigned(ev: TelemetryEvent) -> bool:
    """A live request routed by assignment: what the comparison between variants is made of."""
    return not ev.shadow and ev.assignment != _FORCED
