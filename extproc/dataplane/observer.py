"""The observing phase: turn one observability-mode ext_proc stream into one telemetry event.

Envoy sends these messages without waiting for an answer (``observability_mode``), so nothing
here is on the user's path: request headers (with the ``x-llm-variant`` the router set), response
headers and every response body chunk. Times are taken when each message arrives, against the
request start Envoy reports (the ``request.time`` attribute) when it does.

One stream is one request; the event is emitted exactly once: when the response ends, or, for a
stream that closes first (client gone, upstream reset), when the stream closes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from extproc.contract import headers as h
from extproc.dataplane.event import EventBuilder, Observed
from extproc.quality.rules import CAPTURE_LOOKAHEAD, SIGNAL_CHARS
from extproc.routing.decide import read_headers
from extproc.telemetry.inspect import ResponseInspector
from extproc.telemetry.v1.event_pb2 import Assignment, TelemetryEvent
from extproc.telemetry.writer import Capture

_RESPONSE_HEADERS = frozenset({":status", "content-type"})
_FORCED = Assignment.ASSIGNMENT_FORCED


@dataclass(frozen=True)
class ObserverContext:
    """What every observation of one sidecar needs; built once. The event itself is the
    builder's, shared with the native plane; the rest is what only this plane does."""

    events: EventBuilder
    emit: Callable[[TelemetryEvent], None]
    capture: Callable[[Capture], None] | None = None
    capture_ttl_s: int = 86_400
    capture_max_pairs: int = 10_000
    notices: InflightNotices | None = None  # None: no in-flight notices


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
        if ctx.notices is not None and seen.variant and seen.assignment != _FORCED:
            ctx.notices.opened(self)

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
        if self.ctx.notices is not None:
            self.ctx.notices.closed(self)
        seen = self.seen
        seen.start_unix_ms = self.start_ns // 1_000_000
        seen.completed = completed
        seen.duration_ms = (now - self.start_ns) / 1e6
        if self.inspector is not None:
            s = self.inspector.finish()
            seen.streamed = s.streamed
            seen.response_bytes = s.response_bytes
            if s.first_token_ns is not None:
                seen.first_token_ms = (s.first_token_ns - self.start_ns) / 1e6
            seen.prompt_tokens = s.prompt_tokens
            seen.completion_tokens = s.completion_tokens
            seen.cached_prompt_tokens = s.cached_prompt_tokens
            seen.finish_reason = s.finish_reason or ""
            seen.tool_calls = s.tool_calls
            seen.answer = s.text
            seen.json_asked = self._asked_for_json()
        ev = self.ctx.events.event(seen)
        if self.inspector is not None and ev.captured:
            self._capture(ev, seen.answer)
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
        """Whether the request (if its body was seen) set a JSON response_format."""
        if self.request_body is None:
            return False
        try:
            doc = json.loads(b"".join(self.request_body))
        except (ValueError, RecursionError):
            return False
        fmt = doc.get("response_format") if isinstance(doc, dict) else None
        return isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")

    def close(self) -> None:
        """The stream ended; emit now if the response never completed."""
        self._finish(time.time_ns(), completed=False)

    def notice(self, now_ns: int) -> None:
        """Emit the in-flight notice of this still-open request (see :class:`InflightNotices`)."""
        if self.emitted:
            return
        age_ms = (now_ns - self.start_ns) / 1e6
        self.ctx.emit(self.ctx.events.notice(self.seen, now_ns // 1_000_000, age_ms))


# --- in-flight notices ---------------------------------------------------------------------------


class InflightNotices:
    """One notice for every observed request still open ``notice_ms`` after it started.

    Why: a request that hangs until the upstream timeout is otherwise seen only when it ends,
    minutes later; the evaluator counts a request as hung while it is still open from its notice
    (docs/EVALUATOR.md, "Hangs"). Why this shape: a timer per stream costs a timer handle and a
    heap push and cancel per request; here each request costs one insertion and one removal in an
    ordered dict (requests arrive in start order, so the oldest open request is always first),
    and one timer per process is armed for the oldest one's deadline. When it fires, every
    request past its deadline gets its notice and leaves the dict; the timer is re-armed for the
    new oldest. Nothing waits on this: notices go to the same non-blocking telemetry buffer as
    every event. Requests whose start Envoy reported slightly out of order are noticed at most
    that much late.
    """

    def __init__(self, notice_ms: int) -> None:
        self.notice_ns = notice_ms * 1_000_000
        self.open: OrderedDict[Observation, None] = OrderedDict()
        self._timer: asyncio.TimerHandle | None = None
        self.sent = 0

    def opened(self, obs: Observation) -> None:
        self.open[obs] = None
        if self._timer is None:
            self._arm()

    def closed(self, obs: Observation) -> None:
        self.open.pop(obs, None)

    def _arm(self) -> None:
        oldest = next(iter(self.open))
        delay_ns = oldest.start_ns + self.notice_ns - time.time_ns()
        self._timer = asyncio.get_running_loop().call_later(max(delay_ns, 0) / 1e9, self.sweep)

    def sweep(self) -> None:
        """Notice every request past its deadline, then wait for the next oldest."""
        self._timer = None
        now = time.time_ns()
        deadline = now - self.notice_ns
        while self.open:
            oldest = next(iter(self.open))
            if oldest.start_ns > deadline:
                break
            del self.open[oldest]
            oldest.notice(now)
            self.sent += 1
        if self.open:
            self._arm()


# --- helpers ---------------------------------------------------------------------------------


def _prompt(body: bytes) -> str:
    """The conversation a chat request sent, as ``role: content`` lines (uncut: the caller
    redacts, then cuts)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")
    lines = []
    messages = doc.get("messages") if isinstance(doc, dict) else None
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
