"""What one telemetry event says about its request, defined once for every reader.

The evaluator's window, ``extproc status``, ``top``, the dashboard and ``/metrics`` all count
errors, timeouts and answer signals. When each classified events on its own, the page's error
rate (every error class) and the guardrail's (server errors only) disagreed on the same traffic.
Every reader classifies through this module instead.
"""

from __future__ import annotations

from extproc.config import Price
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


def started_ms(ev: TelemetryEvent) -> int:
    """When the request began: a final event carries its start, a notice the time it was sent
    and the request's age then. The stage a request belongs to is the one it started in."""
    if ev.in_flight:
        return ev.time_unix_ms - int(ev.duration_ms)
    return ev.time_unix_ms


def output_tokens_per_s(ev: TelemetryEvent) -> float | None:
    """The answer's generation speed: completion tokens per second of generating them.

    Streamed answers are timed from the first token to the end (the decode speed users watch);
    an unstreamed answer arrives in one piece, so its whole duration is the only time there is.
    None when the tokens or the times are unknown, or the time is zero.
    """
    if not ev.HasField("completion_tokens") or not ev.HasField("duration_ms"):
        return None
    seconds = ev.duration_ms / 1000
    if ev.streamed and ev.HasField("first_token_ms"):
        seconds -= ev.first_token_ms / 1000
    return ev.completion_tokens / seconds if seconds > 0 else None


def request_cost(ev: TelemetryEvent, price: Price) -> float | None:
    """What the request cost at the variant's token prices; None without both token counts."""
    if not ev.HasField("prompt_tokens") or not ev.HasField("completion_tokens"):
        return None
    return price.cost(ev.prompt_tokens, ev.completion_tokens)
