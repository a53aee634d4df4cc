"""The capture of a sampled request: its ext_proc stream read to the end of its response.

The router answers a captured request's headers with a ``mode_override``, so Envoy goes on to send
its request body, response headers and every response body chunk on the same stream; each waits
for its answer (:meth:`Observation.answer`), sent as soon as the message is read. Times are taken
when each message arrives, against the request start Envoy reports (the ``request.time``
attribute) when it does.

The observation builds the request's event with the builder the access log uses, for the capture
(its variant, status, tokens, refusal) and, where ``emit`` is given, to emit it (tests compare it
with the access log's). In the sidecar the event comes from the access log, as for every request,
so a capture stream that fails loses no event; the answer to the request body tells the access log
whether the request asked for JSON (dynamic metadata), which only the body shows.

One stream is one request; the observation finishes exactly once: when the response ends, or, for
a stream that closes first (client gone, upstream reset), when the stream closes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.struct_pb2 import Struct, Value
from google.protobuf.timestamp_pb2 import Timestamp

from extproc.contract import headers as h
from extproc.contract.envoy import METADATA_NAMESPACE
from extproc.dataplane.event import EventBuilder, Observed
from extproc.quality.rules import CAPTURE_LOOKAHEAD, SIGNAL_CHARS
from extproc.routing.decide import read_headers
from extproc.telemetry.inspect import ResponseInspector
from extproc.telemetry.v1.event_pb2 import TelemetryEvent
from extproc.telemetry.writer import Capture

_RESPONSE_HEADERS = frozenset({":status", "content-type"})
JSON_ASKED = "json_asked"
"""The access log's metadata key: the captured request asked for a JSON answer."""
JSON_VALID = "json_valid"
"""The access log's metadata key: whether a captured request's JSON answer parsed, judged on all
the stream kept (the access log's own text stops at SIGNAL_CHARS)."""
_CONTINUE = {
    "request_headers": pb.ProcessingResponse(request_headers=pb.HeadersResponse()),
    "response_headers": pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
    "request_body": pb.ProcessingResponse(request_body=pb.BodyResponse()),
    "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
    "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
    "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
}


def _metadata(key: str, value: bool) -> Struct:
    """Dynamic metadata for the access log: ``key`` in the namespace the sidecar may write."""
    inner = Struct(fields={key: Value(bool_value=value)})
    return Struct(fields={METADATA_NAMESPACE: Value(struct_value=inner)})


_ASKED_JSON = pb.ProcessingResponse(
    request_body=pb.BodyResponse(), dynamic_metadata=_metadata(JSON_ASKED, True)
)


@dataclass(frozen=True)
class ObserverContext:
    """What every observation of one sidecar needs; built once. The event itself is the
    builder's, shared with the native plane; the rest is what only this plane does."""

    events: EventBuilder
    emit: Callable[[TelemetryEvent], None] | None = None  # None: the access log emits events
    capture: Callable[[Capture], None] | None = None
    capture_ttl_s: int = 86_400
    capture_max_pairs: int = 10_000


def _attr(attributes: Mapping[str, Struct], name: str) -> object | None:
    for s in attributes.values():
        if name in s.fields:
            v = s.fields[name]
            kind = v.WhichOneof("kind")
            return getattr(v, kind) if kind else None
    return None


def _status(raw: bytes) -> int:
    """The ``:status`` Envoy sent; 0 for one that is no number a uint32 holds."""
    try:
        status = int(raw)
    except ValueError:
        return 0
    return status if 0 <= status < 2**32 else 0


class Observation:
    """Per-stream state of one observed request: what was seen so far, for the builder."""

    def __init__(self, ctx: ObserverContext) -> None:
        self.ctx = ctx
        self.seen = Observed()
        self.start_ns = time.time_ns()
        self.inspector: ResponseInspector | None = None
        self.emitted = False
        self.event: TelemetryEvent | None = None  # once emitted
        self.request_body: list[bytes] | None = None
        self.request_bytes = 0

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
        elif phase == "request_body" and self.request_body is not None:
            body = req.request_body.body
            if self.request_bytes < self.ctx.events.rules.capture_bytes * 4:
                self.request_body.append(body)
            self.request_bytes += len(body)

    def _request_headers(self, msg: pb.HttpHeaders) -> None:
        ctx, seen = self.ctx, self.seen
        hdrs = read_headers(msg.headers, ctx.events.policy.wanted)
        who = ctx.events.attribute(hdrs)
        seen.variant, seen.assignment, seen.key_hash = who.variant, who.assignment, who.key_hash
        seen.request_id = hdrs.get(h.REQUEST_ID, b"").decode("utf-8", "replace")
        # Only the shadow listener's own marker says so: the primary listener strips it from
        # client requests, and the client's Host says nothing.
        seen.shadow = h.SHADOW_COPY in hdrs
        seen.captured = ctx.capture is not None and ctx.events.rules.captures(seen.request_id)
        if seen.captured:
            # Kept for the shadow copy too: its prompt is not stored twice, but whether it asked
            # for JSON decides the json_valid signal of the candidate's answer.
            self.request_body = []

    def answer(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        """What Envoy waits for after ``req``: carry on unchanged; at the end of a request body
        that asked for JSON, say so to the access log."""
        phase = req.WhichOneof("request") or "request_headers"
        if phase == "request_body" and req.request_body.end_of_stream and self._asked_for_json():
            return _ASKED_JSON
        ev = self.event
        if phase.startswith("response_") and ev is not None and ev.HasField("json_valid"):
            out = pb.ProcessingResponse(dynamic_metadata=_metadata(JSON_VALID, ev.json_valid))
            out.MergeFrom(_CONTINUE[phase])
            return out
        return _CONTINUE[phase]

    def _response_headers(self, req: pb.ProcessingRequest, now: int) -> None:
        seen = self.seen
        seen.code_details = str(_attr(req.attributes, "response.code_details") or "")
        msg = req.response_headers
        hdrs = read_headers(msg.headers, _RESPONSE_HEADERS)
        seen.status = _status(hdrs.get(":status", b"0"))
        seen.headers_ms = (now - self.start_ns) / 1e6
        keep = self._capture_keep() if seen.captured else SIGNAL_CHARS
        seen.answer_kept_bytes = keep
        self.inspector = ResponseInspector(hdrs.get("content-type", b"").decode("latin-1"), keep)
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
        seen = self.seen
        seen.start_unix_ms = self.start_ns // 1_000_000
        seen.completed = completed
        seen.duration_ms = (now - self.start_ns) / 1e6
        if self.inspector is not None:
            s = self.inspector.finish()
            seen.streamed = s.streamed
            seen.response_bytes = s.response_bytes
            seen.api_format = s.api_format
            if s.first_token_ns is not None:
                seen.first_token_ms = (s.first_token_ns - self.start_ns) / 1e6
            seen.prompt_tokens = s.prompt_tokens
            seen.completion_tokens = s.completion_tokens
            seen.cached_prompt_tokens = s.cached_prompt_tokens
            seen.finish_reason = s.finish_reason or ""
            seen.tool_calls = s.tool_calls
            seen.answer = s.text
            seen.json_asked = self._asked_for_json()
        ev = self.event = self.ctx.events.event(seen)
        if self.inspector is not None and ev.captured:
            self._capture(ev, seen.answer)
        if self.ctx.emit is not None:
            self.ctx.emit(ev)

    def _capture(self, ev: TelemetryEvent, text: str | None) -> None:
        ctx, rules = self.ctx, self.ctx.events.rules
        if ctx.capture is None:
            return
        doc: dict[str, object] = {
            "variant": ev.variant,
            "status": ev.status,
            "time": ev.time_unix_ms / 1000,
            "duration_ms": round(ev.duration_ms, 2) if ev.HasField("duration_ms") else None,
            "completion_tokens": ev.completion_tokens if ev.HasField("completion_tokens") else None,
            "finish_reason": ev.finish_reason,
            "refusal": ev.refusal if ev.HasField("refusal") else None,
            "answer": None if text is None else rules.captured(text),
        }
        if self.request_body is not None and not ev.shadow:
            doc["prompt"] = rules.captured(_prompt(b"".join(self.request_body)))
        ctx.capture(
            Capture(
                experiment=ev.experiment,
                request_id=ev.request_id,
                role="shadow" if ev.shadow else "primary",
                doc=json.dumps(doc),
                ttl_s=ctx.capture_ttl_s,
                max_pairs=ctx.capture_max_pairs,
                time=ev.time_unix_ms / 1000,
            )
        )

    def _capture_keep(self) -> int:
        """Answer bytes kept for a captured request: past the stored limit, for redaction."""
        return self.ctx.events.rules.capture_bytes * CAPTURE_LOOKAHEAD

    def _asked_for_json(self) -> bool:
        """Whether the request (if its body was seen) asked for a JSON answer: a JSON
        ``response_format`` (chat completions), or ``text.format`` (Responses)."""
        if self.request_body is None:
            return False
        try:
            doc = json.loads(b"".join(self.request_body))
        except (ValueError, RecursionError):
            return False
        if not isinstance(doc, dict):
            return False
        fmt = doc.get("response_format")
        text = doc.get("text")
        if fmt is None and isinstance(text, dict):
            fmt = text.get("format")
        return isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")

    def close(self) -> None:
        """The stream ended; emit now if the response never completed."""
        self._finish(time.time_ns(), completed=False)


# --- helpers ---------------------------------------------------------------------------------


def _prompt(body: bytes) -> str:
    """What the request asked, as ``role: content`` lines (uncut: the caller redacts, then
    cuts): the conversation of chat completions and Anthropic Messages (``system`` first), the
    ``input`` of Responses (``instructions`` first), the ``prompt`` of legacy completions."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")
    if not isinstance(doc, dict):
        return ""
    lines = []
    for key in ("system", "instructions", "prompt"):
        if isinstance(doc.get(key), str):
            lines.append(f"{'user' if key == 'prompt' else 'system'}: {doc[key]}")
    messages = doc.get("messages", doc.get("input"))
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    for m in messages if isinstance(messages, list) else []:
        if isinstance(m, dict):
            content = m.get("content")
            text = content if isinstance(content, str) else json.dumps(content)
            lines.append(f"{m.get('role', '?')}: {text}")
    return "\n".join(lines)


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
