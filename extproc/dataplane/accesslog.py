"""Telemetry of both data planes: Envoy's gRPC access log turned into telemetry events.

Envoy sends one access-log entry per finished request, many to a message on one long-lived stream,
so the sidecar's cost is a fraction of an ext_proc stream per request and nothing waits for it.
The entry has what the observer measures on a stream: the variant (the header the route echoed),
the sticky key (hashed here, never stored raw), status, timings, bytes and the reason Envoy ended
the request; ``extproc/data/inspect.lua`` adds what only the body shows (first token, the answer's
first characters, tool calls, the usage counts and the finish reason) as dynamic metadata.

On the ext_proc plane the route names a request the sidecar did not route (fallback) or that was
forced, and for a captured request the sidecar's own answer added whether it asked for JSON. What
differs from the observer: the request starts when Envoy received its headers, first token is
when that chunk left the Lua filter, and with ``dataplane: native`` request bodies are never seen
(no capture, no JSON-mode check).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.struct_pb2 import Struct

from extproc.config import Experiment
from extproc.contract import headers as h
from extproc.contract.envoy import (
    FALLBACK_ROUTE,
    FORCED_ROUTE,
    METADATA_NAMESPACE,
    MODEL_KEY,
    lane_cluster,
)
from extproc.dataplane.event import EventBuilder, Observed
from extproc.dataplane.observer import JSON_ASKED, JSON_VALID
from extproc.dataplane.router import FORCED_MARK, OVERRIDE_MARK
from extproc.quality.rules import SIGNAL_CHARS
from extproc.telemetry.v1.event_pb2 import ApiFormat, Assignment, ErrorClass, TelemetryEvent

log = logging.getLogger(__name__)

# The usage and finish reason of each format inspect.lua names, read from the body's tail when an
# earlier release's inspector sent it (the inspectors now send the counts; the rules are theirs):
# OpenAI's chat and legacy completions count prompt_tokens/completion_tokens and end in
# finish_reason; Responses and Anthropic count input_tokens/output_tokens, Anthropic ends in
# stop_reason. A format it did not name gets none of them (timing only).
_OPENAI_USAGE = re.compile(r'"(prompt_tokens|completion_tokens)"\s*:\s*(\d+)')
_IO_USAGE = re.compile(r'"(input_tokens|output_tokens)"\s*:\s*(\d+)')
_PROMPT = frozenset({"prompt_tokens", "input_tokens"})
_FINISH = re.compile(r'"finish_reason"\s*:\s*"([a-z_]{1,32})"')
_STOP = re.compile(r'"stop_reason"\s*:\s*"([a-z_]{1,32})"')
_FORMATS: dict[str, tuple[ApiFormat.ValueType, re.Pattern[str], re.Pattern[str] | None]] = {
    "chat": (ApiFormat.API_FORMAT_CHAT_COMPLETIONS, _OPENAI_USAGE, _FINISH),
    "completions": (ApiFormat.API_FORMAT_COMPLETIONS, _OPENAI_USAGE, _FINISH),
    "responses": (ApiFormat.API_FORMAT_RESPONSES, _IO_USAGE, None),
    "messages": (ApiFormat.API_FORMAT_MESSAGES, _IO_USAGE, _STOP),
}
# OpenAI chat and Responses (``*_tokens_details.cached_tokens``), Anthropic (non-streamed, or the
# cumulative usage of a stream's last ``message_delta``).
_CACHED = re.compile(r'"(?:cached_tokens|cache_read_input_tokens)"\s*:\s*(\d+)')
_REASON = re.compile(r"[a-z_]{1,32}")  # a finish reason as the inspectors take it
_RESET = ErrorClass.ERROR_CLASS_RESET
_TIMEOUT = ErrorClass.ERROR_CLASS_TIMEOUT
_FORCED = Assignment.ASSIGNMENT_FORCED
_OVERRIDE = Assignment.ASSIGNMENT_OVERRIDE
_UNKNOWN_FORMAT = ApiFormat.API_FORMAT_UNKNOWN
_OVERRIDE_MARK = OVERRIDE_MARK.encode()
_FORCED_MARK = FORCED_MARK.encode()


def _ms(d: Duration) -> float:
    return d.seconds * 1e3 + d.nanos / 1e6


def decode_text(escaped: str) -> str | None:
    """The answer text inspect.lua kept, still JSON-escaped and possibly cut inside an escape."""
    if escaped.isascii() and escaped.isprintable() and "\\" not in escaped and '"' not in escaped:
        # Most answers' heads: nothing escaped, each character one byte; what JSON decoding
        # below would return, for a tenth of its cost per request.
        return escaped[:SIGNAL_CHARS]
    for trim in range(7):  # the longest escape, \\uXXXX, is 6 characters
        try:
            text = json.loads(f'"{escaped[: len(escaped) - trim]}"')
        except ValueError:
            continue
        if isinstance(text, str):
            return text.encode("utf-8", "surrogatepass")[:SIGNAL_CHARS].decode("utf-8", "ignore")
    return None


def _cached_tokens(tail: str, md: Struct) -> int | None:
    """The prompt-cache hits of the response's last usage (the tail), else those an Anthropic
    stream reported in its first event (inspect.lua read them); None when never reported."""
    found = _CACHED.findall(tail)
    if not found:
        return _count(md, "cached_prompt_tokens")
    count = int(found[-1])
    return count if count < 2**32 else None


def _flagged_failure(flags: al.ResponseFlags) -> ErrorClass.ValueType | None:
    """The upstream troubles only Envoy's response flags name; None leaves it to the builder."""
    if not flags.ByteSize():  # no flag set: most requests
        return None
    if flags.upstream_request_timeout:
        return _TIMEOUT
    if (
        flags.upstream_remote_reset
        or flags.upstream_connection_termination
        or flags.upstream_connection_failure
        or flags.upstream_retry_limit_exceeded
    ):
        return _RESET
    return None


@dataclass(frozen=True)
class EntryMapper:
    """Turns one HTTP access-log entry into the event the observer would have emitted: it reads
    the entry into an :class:`Observed`, the builder both planes share makes the event."""

    events: EventBuilder
    clusters: Mapping[str, str]  # Envoy cluster -> variant
    capturing: bool = False  # the sidecar captures a sample (the ext_proc plane)

    @classmethod
    def for_experiment(cls, experiment: Experiment, events: EventBuilder) -> EntryMapper:
        """Compiled once per sidecar, with the builder its observer uses."""
        return cls(events, _variant_clusters(experiment), experiment.spec.capture.sample > 0)

    def event(self, entry: al.HTTPAccessLogEntry) -> TelemetryEvent:
        # Each protobuf field read builds a wrapper object: every field is read once, here.
        req, resp, common = entry.request, entry.response, entry.common_properties
        hdrs = {k: v.encode() for k, v in req.request_headers.items()}
        out_headers = resp.response_headers
        echoed = out_headers.get(h.VARIANT)
        # A request the sidecar did not route went to stable by default: a fallback, whatever
        # the default route echoes, or sets for the access log's filter (Istio's does).
        route = common.route_name
        if route == FALLBACK_ROUTE:
            hdrs.pop(h.VARIANT, None)
        elif echoed is not None:
            hdrs[h.VARIANT] = echoed.encode()
        who = self.events.attribute(hdrs)
        first = (
            _ms(common.time_to_first_downstream_tx_byte)
            if common.HasField("time_to_first_downstream_tx_byte")
            else None
        )
        last = (
            _ms(common.time_to_last_downstream_tx_byte)
            if common.HasField("time_to_last_downstream_tx_byte")
            else None
        )
        flags = common.response_flags
        start = common.start_time
        start_s, start_ns = start.seconds, start.nanos
        seen = Observed(
            request_id=req.request_id,
            variant=who.variant,
            assignment=_pinned(route, hdrs.get(h.FORCED), who.assignment),
            key_hash=who.key_hash,
            captured=self.capturing and self.events.rules.captures(req.request_id),
            # The shadow listener's mark, logged with the request; the primary listener strips a
            # client-sent one, and neither the client's Host nor anything else says "copy".
            shadow=h.SHADOW_COPY in hdrs,
            start_unix_ms=start_s * 1000 + start_ns // 1_000_000,
            headers_ms=first,
            # Until the last byte left, else the first; None when no byte left.
            duration_ms=last if last is not None else first,
            status=resp.response_code.value,
            code_details=resp.response_code_details,
            completed=last is not None and not flags.downstream_connection_termination,
            upstream_failure=_flagged_failure(flags),
            streamed="text/event-stream" in out_headers.get("content-type", ""),
            response_bytes=resp.response_body_bytes,
        )
        md = common.metadata.filter_metadata.get(METADATA_NAMESPACE)
        if md is not None:
            _body(seen, md, start_s * 1e6 + start_ns / 1e3)
        return self.events.event(seen)

    # --- in-flight notices -----------------------------------------------------------------

    def notice(self, entry: al.HTTPAccessLogEntry) -> TelemetryEvent | None:
        """The in-flight notice of a periodic entry (a request still open), or None.

        Envoy logs every open request once per ``access_log_flush_interval`` (set to
        ``inflight.notice_ms``). No response has started, so the variant comes from the
        upstream cluster Envoy picked (a lane cluster is stable's). Forced requests, and
        requests not yet routed, get no notice: the evaluator follows neither.
        """
        common = entry.common_properties
        shadow = h.SHADOW_COPY in entry.request.request_headers
        shadow_variant = self.events.shadow_variant
        variant = (
            shadow_variant
            if shadow and shadow_variant
            else self.clusters.get(common.upstream_cluster)
        )
        hdrs = {k: v.encode() for k, v in entry.request.request_headers.items()}
        if variant is None or _forced(common.route_name, hdrs.get(h.FORCED)):
            return None
        hdrs[h.VARIANT] = variant.encode()
        who = self.events.attribute(hdrs)
        seen = Observed(
            request_id=entry.request.request_id,
            variant=who.variant,
            assignment=who.assignment,
            key_hash=who.key_hash,
            shadow=shadow,
        )
        start_ms = common.start_time.seconds * 1000 + common.start_time.nanos // 1_000_000
        age_ms = (
            _ms(common.duration) if common.HasField("duration") else time.time() * 1e3 - start_ms
        )
        return self.events.notice(seen, start_ms + int(age_ms), float(int(age_ms)))


def _body(seen: Observed, md: Struct, start_us: float) -> None:
    """What inspect.lua read from the body: its format, first token, tool calls, usage and the
    answer; of a body in no format it knows, only the first byte's time. ``start_us``: when the
    request started, in Unix microseconds."""
    f = md.fields
    if "first_token_us" in f:
        seen.first_token_ms = _between(
            (f["first_token_us"].number_value - start_us) / 1e3, seen.headers_ms, seen.duration_ms
        )
    seen.json_asked = JSON_ASKED in f and f[JSON_ASKED].bool_value
    if JSON_VALID in f:
        seen.json_verdict = f[JSON_VALID].bool_value
    known = _FORMATS.get(f["format"].string_value) if "format" in f else None
    if known is None:
        seen.api_format = _UNKNOWN_FORMAT
        return
    seen.api_format, usage, finish = known
    seen.tool_calls = "tool_calls" in f and f["tool_calls"].bool_value
    if "tail" in f:  # an inspector of an earlier release: the counts are in the body's tail
        _tail_usage(seen, md, f["tail"].string_value, usage, finish)
    else:  # the inspector found them
        seen.prompt_tokens = _count(md, "prompt_tokens")
        seen.completion_tokens = _count(md, "completion_tokens")
        seen.cached_prompt_tokens = _count(md, "cached_prompt_tokens")
        if "finish_reason" in f:
            reason = f["finish_reason"].string_value
            if _REASON.fullmatch(reason):
                seen.finish_reason = reason
    if "text" in f:
        seen.answer = decode_text(f["text"].string_value)


def _tail_usage(
    seen: Observed, md: Struct, tail: str, usage: re.Pattern[str], finish: re.Pattern[str] | None
) -> None:
    """The usage and finish reason in the body's last 1 KiB, which the inspectors of earlier
    releases sent instead of the counts (an Envoy configured by one, during an upgrade): what
    the inspectors now find themselves, by the same rules."""
    # The last believable count of each side (True: the prompt's); a uint32 field, a larger
    # count is not believable.
    tokens = {name in _PROMPT: int(n) for name, n in usage.findall(tail) if int(n) < 2**32}
    seen.prompt_tokens = tokens.get(True, _count(md, "prompt_tokens"))
    seen.completion_tokens = tokens.get(False)
    seen.cached_prompt_tokens = _cached_tokens(tail, md)
    reasons = finish.findall(tail) if finish is not None else []
    if reasons:
        seen.finish_reason = reasons[-1]


def _count(md: Struct, key: str) -> int | None:
    """A count the inspector found (with an earlier release's inspector: one read from an SSE
    stream's first event, Anthropic's message_start, for when the tail has none); None when
    absent or not believable (a uint32 field)."""
    if key not in md.fields:
        return None
    count = md.fields[key].number_value
    return int(count) if 0 <= count < 2**32 and count.is_integer() else None


def _between(first_token_ms: float, headers_ms: float | None, last_ms: float | None) -> float:
    """The first token within the response: not before its headers, not after its last byte.

    Why: inspect.lua stamps the first token with the wall clock, while Envoy's durations are
    monotonic from the request's start; on a loaded machine the two disagree by up to about half a
    millisecond, which on a fast answer put the first token after the last byte.
    """
    if last_ms is not None:
        first_token_ms = min(first_token_ms, last_ms)
    if headers_ms is not None:
        first_token_ms = max(first_token_ms, headers_ms)
    return first_token_ms


def _pinned(route: str, mark: bytes | None, who: Assignment.ValueType) -> Assignment.ValueType:
    """The assignment of an entry: a category override's or a tester's pin (the sidecar's mark
    ``x-llm-forced``, logged with the request), else ``who`` (what the headers say)."""
    if mark == _OVERRIDE_MARK:
        return _OVERRIDE
    return _FORCED if _forced(route, mark) else who


def _forced(route: str, mark: bytes | None) -> bool:
    """A tester forced the request's variant. The forcing header is stripped before the log is
    written: Envoy's forced routes say so by name, and the sidecar by its mark (which the primary
    listener strips from clients), the only sign on Istio, whose routes bear other names."""
    return route.startswith(FORCED_ROUTE) or mark == _FORCED_MARK


def _variant_clusters(experiment: Experiment) -> dict[str, str]:
    """Which variant each Envoy cluster of the native config serves."""
    out = {
        lane_cluster(experiment.spec.variants[experiment.stable].cluster, c): experiment.stable
        for c in experiment.candidates
    }
    out.update({v.cluster: name for name, v in experiment.spec.variants.items()})
    return out


MapperFor = Callable[[al.HTTPAccessLogEntry], "EntryMapper | None"]
"""The mapper of the experiment an entry belongs to; None: the request belongs to none."""


def model_of(entry: al.HTTPAccessLogEntry) -> str | None:
    """The request body's model, as Envoy's JSON-to-metadata filter wrote it (fleet listener)."""
    md = entry.common_properties.metadata.filter_metadata.get(METADATA_NAMESPACE)
    if md is None or MODEL_KEY not in md.fields:
        return None
    return md.fields[MODEL_KEY].string_value or None


# Requests already noticed, remembered until their final entry; bounded in case it never comes.
MAX_NOTICED = 100_000
_PERIODIC = al.AccessLogType.DownstreamPeriodic


class AccessLogService(als_pb2_grpc.AccessLogServiceServicer):
    """Envoy's access-log stream: every HTTP entry becomes one telemetry event; the first
    periodic entry of a request still open becomes its in-flight notice."""

    def __init__(self, mapper_for: MapperFor, emit: Callable[[TelemetryEvent], None]) -> None:
        self.mapper_for = mapper_for
        self.emit = emit
        self.noticed: OrderedDict[str, None] = OrderedDict()

    def _periodic(self, entry: al.HTTPAccessLogEntry, mapper: EntryMapper) -> None:
        rid = entry.request.request_id
        if not rid or rid in self.noticed:
            return
        n = mapper.notice(entry)
        if n is None:
            return
        self.noticed[rid] = None
        if len(self.noticed) > MAX_NOTICED:
            self.noticed.popitem(last=False)
        self.emit(n)

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[
            als_pb2.StreamAccessLogsMessage, als_pb2.StreamAccessLogsResponse
        ],
    ) -> als_pb2.StreamAccessLogsResponse:
        mapper_for, emit = self.mapper_for, self.emit
        async for msg in request_iterator:
            for entry in msg.http_logs.log_entry:
                try:
                    mapper = mapper_for(entry)
                    if mapper is None:  # a request no experiment took
                        continue
                    if entry.common_properties.access_log_type == _PERIODIC:
                        self._periodic(entry, mapper)
                        continue
                    if self.noticed:
                        self.noticed.pop(entry.request.request_id, None)
                    emit(mapper.event(entry))
                except ValueError:  # one odd entry must not end the stream and lose the rest
                    log.warning("dropped an access-log entry it could not map", exc_info=True)
        return als_pb2.StreamAccessLogsResponse()
