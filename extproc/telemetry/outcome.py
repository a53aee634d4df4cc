"""What one telemetry event says about its request, defined once for every reader.

The evaluator's window, ``extproc status``, ``top``, the dashboard and ``/metrics`` all count
errors, timeouts and answer signals. When each classified events on its own, the page's error
rate (every error class) and the guardrail's (server errors only) disagreed on the same traffic.
Every reader classifies through this module instead.
"""

from __future__ import annotations

from typing import Protocol

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

_PINNED = frozenset({int(Assignment.ASSIGNMENT_FORCED), int(Assignment.ASSIGNMENT_OVERRIDE)})
_NONE = int(ErrorClass.ERROR_CLASS_NONE)
_TIMEOUT = int(ErrorClass.ERROR_CLASS_TIMEOUT)


class TokenPrice(Protocol):
    """What a variant's price (``extproc.config.Price``) offers: the cost of one usage."""

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float: ...


def is_notice(ev: TelemetryEvent) -> bool:
    """An in-flight notice (the request is still open), not the request's end."""
    return ev.in_flight


def started_ms(ev: TelemetryEvent) -> int:
    """When the request began: a final event carries its start, a notice the time it was sent
    and the request's age then. The stage a request belongs to is the one it started in."""
    if ev.in_flight:
        return ev.time_unix_ms - int(ev.duration_ms)
    return ev.time_unix_ms


def is_forced(ev: TelemetryEvent) -> bool:
    """Traffic pinned to a variant rather than assigned by the hash: a tester's (``x-experiment``)
    or a category override's. Counted apart, never in a comparison: what it measures is not a
    random sample of users."""
    return ev.assignment in _PINNED


def is_assigned(ev: TelemetryEvent) -> bool:
    """A live request routed by assignment: what the comparison between variants is made of."""
    return not ev.shadow and ev.assignment not in _PINNED


TRAFFIC = ("assigned", "forced", "shadow")
"""Kinds of traffic, counted apart: assigned live requests (what variants are compared on),
forced requests (a tester's, or a category override's), and mirrored shadow copies."""


def traffic(ev: TelemetryEvent) -> str:
    """Which kind of traffic an event is (see :data:`TRAFFIC`)."""
    if ev.shadow:
        return "shadow"
    return "forced" if is_forced(ev) else "assigned"


def is_success(ev: TelemetryEvent) -> bool:
    """A complete answer: only then do its timings, tokens and answer signals count (a fast
    5xx would otherwise make a failing variant look quick and cheap)."""
    return ev.error == _NONE


def is_timeout(ev: TelemetryEvent) -> bool:
    """The model server did not answer in time (one of the server errors)."""
    return ev.error == _TIMEOUT


def called_tool(ev: TelemetryEvent) -> bool:
    """A complete answer that called a tool: the tool-call rate is these over successes."""
    return ev.error == _NONE and ev.tool_calls


def output_tokens_per_s(ev: TelemetryEvent) -> float | None:
    """Generation speed of one streamed answer: tokens after the first over the time after it.

    Unknown (None) for a non-streamed answer (its first byte is its last), a failed request, or
    an answer of fewer than two tokens: the time to first token is a separate figure.
    """
    if ev.error != _NONE or not ev.streamed or ev.completion_tokens < 2:
        return None
    if not (ev.HasField("first_token_ms") and ev.HasField("duration_ms")):
        return None
    generation_ms = ev.duration_ms - ev.first_token_ms
    if generation_ms <= 0:
        return None
    return (ev.completion_tokens - 1) / generation_ms * 1000


def cost(ev: TelemetryEvent, price: TokenPrice | None) -> float | None:
    """What one request cost at its variant's price; None without a price or a reported usage
    (an unknown usage is not a free request)."""
    if price is None or not (ev.HasField("prompt_tokens") or ev.HasField("completion_tokens")):
        return None
    return price.cost(ev.prompt_tokens, ev.completion_tokens)


def cached_prompt_tokens(ev: TelemetryEvent) -> int | None:
    """Prompt tokens served from the model server's prompt cache; None when not reported."""
    return ev.cached_prompt_tokens if ev.HasField("cached_prompt_tokens") else None
