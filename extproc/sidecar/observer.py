"""The observing phase: turn one observability-mode ext_proc stream into one telemetry event.

Envoy sends these messages without waiting for an answer (``observability_mode``), so nothing
here is on the user's path: request headers (with the ``x-llm-variant`` the router set), response
headers and every response body chunk. Times are taken when each message arrives, against the
request start Envoy reports (the ``request.time`` attribute) when it does.

One stream is one request; the event is emitted exactly once: when the response ends, or, for a
stream that closes first (client gone, upstream reset), when the stream closes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from extproc import headers as h
from extproc.sidecar.decide import Policy, attribute, read_headers
from extproc.telemetry.inspect import ResponseInspector
from extproc.telemetry.v1.event_pb2 import ErrorClass, TelemetryEvent

_RESPONSE_HEADERS = frozenset({":status", "content-type"})


@dataclass(frozen=True)
class ObserverContext:
    """What every observation of one sidecar needs; built once."""

    experiment: str
    stable: str
    variants: tuple[str, ...]
    policy: Policy
    recorder: str
    emit: Callable[[TelemetryEvent], None]


def _attr(attributes: Mapping[str, Struct], name: str) -> object | None:
    for s in attributes.values():
        if name in s.fields:
            v = s.fields[name]
            kind = v.WhichOneof("kind")
            return getattr(v, kind) if kind else None
    return None


def classify(status: int, code_details: str, completed: bool, got_headers: bool) -> int:
    """Map what Envoy told us to an error class (see ErrorClass in proto/)."""
    if not got_headers:
        return ErrorClass.ERROR_CLASS_CLIENT_DISCONNECT
    if "timeout" in code_details:
        return ErrorClass.ERROR_CLASS_TIMEOUT
    if code_details.startswith(("upstream_reset", "upstream_connect")) or "reset" in code_details:
        return ErrorClass.ERROR_CLASS_RESET
    if status >= 500:
        return ErrorClass.ERROR_CLASS_UPSTREAM_5XX
    if not completed:
        return ErrorClass.ERROR_CLASS_CLIENT_DISCONNECT
    if status >= 400:
        return ErrorClass.ERROR_CLASS_CLIENT_ERROR
    return ErrorClass.ERROR_CLASS_NONE


class Observation:
    """Per-stream state of one observed request."""

    def __init__(self, ctx: ObserverContext) -> None:
        self.ctx = ctx
        self.event = TelemetryEvent(experiment=ctx.experiment, recorder=ctx.recorder)
        self.start_ns = time.time_ns()
        self.inspector: ResponseInspector | None = None
        self.code_details = ""
        self.emitted = False

    def on_message(self, req: pb.ProcessingRequest) -> None:
        phase = req.WhichOneof("request")
        now = time.time_ns()
        if phase == "request_headers":
            started = _attr(req.attributes, "request.time")
            if started is not None:
                self.start_ns = _timestamp_ns(started, self.start_ns)
            self._request_headers(req.request_headers)
        elif phase == "response_headers":
            self._response_headers(req, now)
        elif phase == "response_body":
            self._response_body(req.response_body, now)

    def _request_headers(self, msg: pb.HttpHeaders) -> None:
        ctx = self.ctx
        hdrs = read_headers(msg.headers, ctx.policy.wanted)
        who = attribute(ctx.policy, ctx.stable, hdrs, ctx.variants)
        ev = self.event
        ev.variant = who.variant
        ev.assignment = who.assignment
        ev.key_hash = who.key_hash
        ev.request_id = hdrs.get(h.REQUEST_ID, b"").decode("utf-8", "replace")
        ev.shadow = hdrs.get(h.AUTHORITY, b"").endswith(h.SHADOW_SUFFIX.encode())

    def _response_headers(self, req: pb.ProcessingRequest, now: int) -> None:
        self.code_details = str(_attr(req.attributes, "response.code_details") or "")
        msg = req.response_headers
        hdrs = read_headers(msg.headers, _RESPONSE_HEADERS)
        try:
            self.event.status = int(hdrs.get(":status", b"0"))
        except ValueError:
            self.event.status = 0
        self.event.headers_ms = (now - self.start_ns) / 1e6
        self.inspector = ResponseInspector(hdrs.get("content-type", b"").decode("latin-1"))
        if msg.end_of_stream:
            self._finish(now, completed=True)

    def _response_body(self, msg: pb.HttpBody, now: int) -> None:
        if self.inspector is None:
            return
        if msg.body:
            self.inspector.feed(msg.body, now)
        if msg.end_of_stream:
            self._finish(now, completed=True)

    def _finish(self, now: int, *, completed: bool) -> None:
        if self.emitted:
            return
        self.emitted = True
        ev = self.event
        ev.time_unix_ms = self.start_ns // 1_000_000
        got_headers = self.inspector is not None
        ev.error = classify(ev.status, self.code_details, completed, got_headers)  # type: ignore[assignment]
        if completed or got_headers:
            ev.duration_ms = (now - self.start_ns) / 1e6
        if self.inspector is not None:
            s = self.inspector.finish()
            ev.streamed = s.streamed
            ev.response_bytes = s.response_bytes
            if s.first_token_ns is not None:
                ev.first_token_ms = (s.first_token_ns - self.start_ns) / 1e6
            if s.prompt_tokens is not None:
                ev.prompt_tokens = s.prompt_tokens
            if s.completion_tokens is not None:
                ev.completion_tokens = s.completion_tokens
            if s.finish_reason:
                ev.finish_reason = s.finish_reason
        self.ctx.emit(ev)

    def close(self) -> None:
        """The stream ended; emit now if the response never completed."""
        self._finish(time.time_ns(), completed=False)


def _timestamp_ns(value: object, default: int) -> int:
    """Envoy's ``request.time`` arrives as an RFC 3339 string in a Struct."""
    if not isinstance(value, str):
        return default
    ts = Timestamp()
    try:
        ts.FromJsonString(value)
    except ValueError:
        return default
    return ts.seconds * 1_000_000_000 + ts.nanos
