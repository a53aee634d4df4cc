"""Incremental inspection of a model server's response as Envoy streams it to the sidecar.

Envoy hands the body over in whatever pieces arrived from the network: a piece can end in the
middle of an SSE event, of a line terminator or of a UTF-8 character, so nothing here trusts chunk
boundaries. The parser works on bytes, decodes only whole events, and keeps only the unfinished
tail of the stream between chunks.

This runs for every inspected response, on the path that also forwards tokens, so the per-chunk
work is kept small: a line terminator is never searched for twice, and an event is JSON-decoded
only when a cheap substring test says it can change the summary (until the API format is known:
every event, within the first ``MAX_PROBE_BYTES``; then, before the first token: anything that may
carry answer text; after it: only events with a non-null ``usage`` or finish reason, unless the
answer text is being captured). The price is that ``malformed`` can only report what was looked
at: an undecoded event is checked for looking like a JSON object, no more.

Which API a response speaks, and where each keeps what is read, is ``formats.py``'s; a response
in none of them gets timing only (for a stream, not even a first token).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Final

from extproc.telemetry.formats import Format, detect
from extproc.telemetry.v1.event_pb2 import ApiFormat

__all__ = [
    "MAX_EVENT_BYTES",
    "MAX_JSON_BYTES",
    "MAX_PROBE_BYTES",
    "ResponseInspector",
    "ResponseSummary",
    "cached_tokens",
]

MAX_JSON_BYTES: Final = 4 * 1024 * 1024
"""A non-streamed body larger than this is not parsed: its token counts stay unknown rather than
holding megabytes per request in the sidecar."""

MAX_EVENT_BYTES: Final = 1024 * 1024
"""A single SSE event larger than this is dropped (and the summary marked malformed), which bounds
the memory one response can pin."""

MAX_PROBE_BYTES: Final = 65536
"""A stream whose events name no API format within this much data is of a format not read (as
inspect.lua gives up after its HEAD_BYTES)."""

# Module-level bindings: one global lookup instead of an attribute lookup per event, and a seam
# for the tests that count how often we decode.
_loads = json.loads
_EOL: Final = re.compile(rb"[\r\n]")
_LATE_FIELDS: Final = re.compile(rb'"(?:usage|finish_reason|stop_reason)"\s*:(?!\s*null)')
_OBJECT_START: Final = re.compile(rb"[ \t\r\n]*\{")
_BOM: Final = b"\xef\xbb\xbf"
_CR: Final = 13
_LF: Final = 10
_COLON: Final = 58
_SPACE: Final = 32


@dataclasses.dataclass(frozen=True, slots=True)
class ResponseSummary:
    """What one response told us; ``None`` means unknown, never zero."""

    streamed: bool
    first_token_ns: int | None
    prompt_tokens: int | None
    completion_tokens: int | None
    response_bytes: int
    finish_reason: str | None
    event_count: int
    malformed: bool
    text: str | None
    tool_calls: bool = False
    cached_prompt_tokens: int | None = None
    api_format: ApiFormat.ValueType = ApiFormat.API_FORMAT_UNKNOWN


def _token_count(value: object) -> int | None:
    # A uint32 in the event: a larger count is not believable, and would not fit.
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32:
        return value
    return None


def cached_tokens(usage: dict[str, Any]) -> int | None:
    """Prompt tokens served from the prompt cache, as each API reports them in ``usage``: OpenAI
    chat ``prompt_tokens_details.cached_tokens``, OpenAI Responses
    ``input_tokens_details.cached_tokens``, Anthropic ``cache_read_input_tokens``; None when the
    server says nothing (a server without prompt caching), which is not zero."""
    for name in ("prompt_tokens_details", "input_tokens_details"):
        details = usage.get(name)
        if isinstance(details, dict):
            count = _token_count(details.get("cached_tokens"))
            if count is not None:
                return count
    return _token_count(usage.get("cache_read_input_tokens"))


def _clip(text: str, limit: int) -> str:
    # A UTF-8 character is at most 4 bytes: short texts skip the encode.
    if len(text) * 4 <= limit:
        return text
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore")


class ResponseInspector:
    """Feed it the body chunks of one response, then call :meth:`finish` once.

    It never raises on bad input: whatever the upstream sends, the sidecar must keep forwarding,
    so bad data becomes ``malformed=True`` and unknown fields stay ``None``.
    """

    __slots__ = (
        "_body",
        "_bom_checked",
        "_buf",
        "_cached_tokens",
        "_capture",
        "_completion_tokens",
        "_data",
        "_data_len",
        "_discarding",
        "_done",
        "_events",
        "_finish_reason",
        "_first_ns",
        "_format",
        "_in_dropped_line",
        "_json",
        "_malformed",
        "_now_ns",
        "_probed",
        "_prompt_tokens",
        "_response_bytes",
        "_scanned",
        "_skip_lf",
        "_streamed",
        "_summary",
        "_text_chars",
        "_text_known",
        "_text_parts",
        "_tool_calls",
    )

    def __init__(self, content_type: str, max_capture_bytes: int = 0) -> None:
        media = content_type.split(";", 1)[0].strip().lower()
        self._streamed = media == "text/event-stream"
        self._json = media == "application/json" or media.endswith("+json")
        self._capture = max(0, max_capture_bytes)
        self._summary: ResponseSummary | None = None
        self._response_bytes = 0
        self._first_ns: int | None = None
        self._prompt_tokens: int | None = None
        self._completion_tokens: int | None = None
        self._cached_tokens: int | None = None
        self._finish_reason: str | None = None
        self._malformed = False
        self._events = 0
        self._text_parts: list[str] = []
        self._text_chars = 0
        self._tool_calls = False
        self._format: Format | None = None
        self._probed = 0  # event bytes looked at for the format
        # An SSE stream's text is whatever its deltas said; a JSON body's only if it parsed.
        self._text_known = self._streamed
        # Non-streamed bodies: chunks kept by reference and joined once at the end.
        self._body: list[bytes] | None = [] if not self._streamed else None
        # SSE state: the unfinished tail of the stream, and the event being assembled.
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already known to hold no line terminator
        self._skip_lf = False  # the last chunk ended in CR: a leading LF belongs to it
        self._bom_checked = False
        self._data: list[bytes] = []
        self._data_len = 0
        self._discarding = False  # inside an event too large to keep
        self._in_dropped_line = False  # the start of the current line was thrown away
        self._done = False
        self._now_ns = 0

    # ----------------------------------------------------------------------------------------

    def feed(self, chunk: bytes, now_ns: int) -> None:
        """Account for one body chunk received at ``now_ns`` (any monotonic clock)."""
        if self._summary is not None or not chunk:
            return
        self._response_bytes += len(chunk)
        if not self._streamed:
            if self._first_ns is None:
                self._first_ns = now_ns
            body = self._body
            if body is not None:
                if self._response_bytes > MAX_JSON_BYTES:
                    self._body = None
                else:
                    body.append(chunk)
            return
        if self._done:
            return
        self._now_ns = now_ns
        self._buf += chunk
        self._parse()

    def finish(self) -> ResponseSummary:
        """Close the response; safe to call more than once (the first summary is kept)."""
        if self._summary is not None:
            return self._summary
        if not self._streamed:
            self._finish_body()
        # An SSE event cut off by the end of the stream is not dispatched (WHATWG).
        text: str | None = None
        fmt = self._format
        if self._capture and self._text_known and fmt is not None:
            text = _clip("".join(self._text_parts), self._capture)
        self._summary = ResponseSummary(
            streamed=self._streamed,
            first_token_ns=self._first_ns,
            prompt_tokens=self._prompt_tokens,
            completion_tokens=self._completion_tokens,
            response_bytes=self._response_bytes,
            finish_reason=self._finish_reason,
            event_count=self._events,
            malformed=self._malformed,
            text=text,
            tool_calls=self._tool_calls,
            cached_prompt_tokens=self._cached_tokens,
            api_format=ApiFormat.API_FORMAT_UNKNOWN if fmt is None else fmt.api,
        )
        self._body = None
        self._buf = bytearray()
        self._data = []
        self._text_parts = []
        return self._summary

    # ----------------------------------------------------------------------------------------
    # SSE

    def _parse(self) -> None:
        buf = self._buf
        pos = 0
        if self._skip_lf:
            self._skip_lf = False
            if buf[0] == _LF:
                pos = 1
        if not self._bom_checked:
            if len(buf) < len(_BOM) and _BOM.startswith(buf):
                return  # too short to tell; a BOM prefix holds no line terminator anyway
            self._bom_checked = True
            if buf.startswith(_BOM):
                pos = len(_BOM)
        search = max(pos, self._scanned)
        size = len(buf)
        while (match := _EOL.search(buf, search)) is not None:
            end = match.start()
            nxt = end + 1
            if buf[end] == _CR:
                if nxt < size:
                    if buf[nxt] == _LF:
                        nxt += 1
                else:
                    self._skip_lf = True
            self._line(buf, pos, end)
            if self._done:
                buf.clear()
                self._scanned = 0
                self._skip_lf = False
                return
            pos = search = nxt
        if pos < size and self._partial_line_too_long(buf, pos, size):
            # The rest of this line will be ignored; keep none of it.
            self._in_dropped_line = True
            buf.clear()
            self._scanned = 0
            return
        if pos:
            del buf[:pos]
        self._scanned = len(buf)

    def _partial_line_too_long(self, buf: bytearray, start: int, size: int) -> bool:
        """Decide early what :meth:`_line` would decide once the line ends, so the decision does
        not depend on where the chunks were cut, and an endless line cannot grow the buffer."""
        if self._discarding or self._in_dropped_line:
            return True  # the rest of a line already dropped is dropped too, whatever it holds
        if buf.startswith(b"data:", start):
            value = start + 5
            if value < size and buf[value] == _SPACE:
                value += 1
            # Same accounting as _line; the value can only grow, so the verdict holds.
            if size - value + 1 + self._data_len > MAX_EVENT_BYTES:
                self._drop_event()
                return True
            return False
        # Not a data line (or not one yet): a line this long is ignored when it ends anyway.
        return size - start > MAX_EVENT_BYTES

    def _line(self, buf: bytearray, start: int, end: int) -> None:
        if self._in_dropped_line:
            # The rest of a line whose head was dropped: not a blank line, whatever it looks like.
            self._in_dropped_line = False
            return
        if start == end:
            if self._discarding:
                self._discarding = False
            elif self._data:
                self._dispatch()
            return
        if self._discarding or buf[start] == _COLON:
            return
        if not buf.startswith(b"data", start, end):
            return  # event, id, retry and unknown fields do not matter here
        value = start + 4
        if value < end:
            if buf[value] != _COLON:
                return  # a field such as "datum", not "data"
            value += 1
            if value < end and buf[value] == _SPACE:
                value += 1
        self._data.append(bytes(buf[value:end]))
        self._data_len += end - value + 1
        if self._data_len > MAX_EVENT_BYTES:
            self._drop_event()

    def _drop_event(self) -> None:
        self._data.clear()
        self._data_len = 0
        self._discarding = True
        self._malformed = True

    def _dispatch(self) -> None:
        parts = self._data
        data = parts[0] if len(parts) == 1 else b"\n".join(parts)
        parts.clear()
        self._data_len = 0
        self._events += 1
        if data.startswith(b"[DONE]"):
            self._done = True
            return
        if not data:
            return
        fmt = self._format
        if fmt is None:
            # Until the format is known every event is decoded: its first event says which.
            if self._probed > MAX_PROBE_BYTES:
                return
            self._probed += len(data)
            obj = self._decode(data)
            if obj is None:
                return
            fmt = self._format = detect(obj)
            if fmt is None:
                return
        else:
            obj = None
        if not self._tool_calls and fmt.tool is not None and fmt.tool.search(data) is not None:
            self._tool_calls = True
            if self._first_ns is None:
                self._first_ns = self._now_ns
        if obj is None:
            wanted = (
                self._first_ns is None or (self._capture and self._text_chars < self._capture)
            ) and fmt.text_mark.search(data) is not None
            if not wanted and _LATE_FIELDS.search(data) is None:
                if _OBJECT_START.match(data) is None:
                    self._malformed = True
                return
            obj = self._decode(data)
            if obj is None:
                return
        fmt.event(obj, self)

    def _decode(self, data: bytes) -> dict[str, Any] | None:
        """The event's JSON object; None (and malformed) when it is not one."""
        try:
            obj = _loads(data)
        except (ValueError, RecursionError):
            self._malformed = True
            return None
        if not isinstance(obj, dict):
            self._malformed = True
            return None
        return obj

    # ----------------------------------------------------------------------------------------
    # What a format reads (formats.Sink)

    def on_text(self, piece: str, keep: bool) -> None:
        if piece and self._first_ns is None:
            self._first_ns = self._now_ns
        if keep and self._capture and self._text_chars < self._capture:
            self._text_parts.append(piece)
            self._text_chars += len(piece)

    def on_usage(self, usage: dict[str, Any], prompt: str, completion: str) -> None:
        # A count reported replaces the one before; one not reported (Anthropic's message_delta
        # has no prompt, nor the prompt cache) keeps it.
        count = _token_count(usage.get(prompt))
        if count is not None:
            self._prompt_tokens = count
        count = _token_count(usage.get(completion))
        if count is not None:
            self._completion_tokens = count
        count = cached_tokens(usage)
        if count is not None:
            self._cached_tokens = count

    def on_finish(self, reason: object) -> None:
        if isinstance(reason, str):
            self._finish_reason = reason

    # ----------------------------------------------------------------------------------------
    # Non-streamed bodies

    def _finish_body(self) -> None:
        body = self._body
        if not body:
            return  # empty, or over MAX_JSON_BYTES: unknown, not malformed
        # bytes() of a bytes object is that object: no copy, but a safe type for json.loads.
        raw = bytes(body[0]) if len(body) == 1 else b"".join(body)
        if not self._json and _OBJECT_START.match(raw) is None:
            return  # a text/plain error page from a proxy is not ours to judge
        obj = self._decode(raw)
        if obj is None:
            return
        fmt = self._format = detect(obj)
        if fmt is None:
            return  # an error body, or an API not read: timing only
        self._text_known = True
        if fmt.tool is not None and fmt.tool.search(raw) is not None:
            self._tool_calls = True
        fmt.body(obj, self)
