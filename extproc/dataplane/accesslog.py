"""Telemetry for ``dataplane: native``: Envoy's gRPC access log turned into telemetry events.

With the native data plane Envoy routes by itself and the sidecar is off the request path. Envoy
sends one access-log entry per finished request, many to a message on one long-lived stream, so
the sidecar's cost is a fraction of an ext_proc stream per request and nothing waits for it. The
entry has what the observer measures on its own stream: the variant (the header the route
echoed), the sticky key (hashed here, never stored raw), status, timings, bytes and the reason
Envoy ended the request; ``extproc/data/inspect.lua`` adds what only the body shows (first token,
the answer's first characters, tool calls, the ``usage`` at the end) as dynamic metadata.

What differs from the ext_proc observer: the request starts when Envoy received its headers
(the observer also uses Envoy's ``request.time``), first token is when that chunk left the Lua
filter, and request bodies are never seen (no capture, no JSON-mode check).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.struct_pb2 import Struct

from extproc.config import Experiment
from extproc.contract import headers as h
from extproc.contract.envoy import FORCED_ROUTE, lane_cluster
from extproc.dataplane.observer import classify
from extproc.quality.rules import SIGNAL_CHARS, QualityRules
from extproc.routing.decide import Policy, attribute
from extproc.telemetry.v1.event_pb2 import Assignment, ErrorClass, TelemetryEvent

log = logging.getLogger(__name__)

METADATA = "extproc"
"""The dynamic-metadata namespace inspect.lua writes."""
_USAGE = re.compile(r'"(prompt_tokens|completion_tokens)"\s*:\s*(\d+)')
# OpenAI chat and Responses (``*_tokens_details.cached_tokens``), Anthropic (non-streamed, or the
# cumulative usage of a stream's last ``message_delta``).
_CACHED = re.compile(r'"(?:cached_tokens|cache_read_input_tokens)"\s*:\s*(\d+)')
_FINISH = re.compile(r'"finish_reason"\s*:\s*"([a-z_]{1,32})"')
_RESET = ErrorClass.ERROR_CLASS_RESET
_TIMEOUT = ErrorClass.ERROR_CLASS_TIMEOUT
_FORCED = Assignment.ASSIGNMENT_FORCED


def _ms(d: Duration) -> float:
    return d.seconds * 1e3 + d.nanos / 1e6


def decode_text(escaped: str) -> str | None:
    """The answer text inspect.lua kept, still JSON-escaped and possibly cut inside an escape."""
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
    if found:
        count = float(found[-1])
    elif "cached_prompt_tokens" in md.fields:
        count = md.fields["cached_prompt_tokens"].number_value
    else:
        return None
    return int(count) if 0 <= count < 2**32 and count.is_integer() else None


def error_class(entry: al.HTTPAccessLogEntry, completed: bool, got_headers: bool) -> int:
    """The observer's classification, plus the upstream troubles only Envoy's flags name."""
    flags = entry.common_properties.response_flags
    if flags.upstream_request_timeout:
        return _TIMEOUT
    if (
        flags.upstream_remote_reset
        or flags.upstream_connection_termination
        or flags.upstream_connection_failure
        or flags.upstream_retry_limit_exceeded
    ):
        return _RESET
    resp = entry.response
    return classify(resp.response_code.value, resp.response_code_details, completed, got_headers)


@dataclass(frozen=True)
class EntryMapper:
    """Turns one HTTP access-log entry into the event the observer would have emitted."""

    experiment: str
    stable: str
    variants: tuple[str, ...]
    policy: Policy
    rules: QualityRules
    recorder: str
    shadow_variant: str | None = None
    clusters: Mapping[str, str] = field(default_factory=dict)  # Envoy cluster -> variant

    @classmethod
    def for_experiment(cls, experiment: Experiment, recorder: str) -> EntryMapper:
        """Compiled once per sidecar, from the same file the observer compiles its rules from."""
        return cls(
            experiment=experiment.name,
            stable=experiment.stable,
            variants=tuple(experiment.variant_names),
            policy=Policy.compile(experiment),
            rules=QualityRules.compile(experiment.spec),
            recorder=recorder,
            shadow_variant=experiment.spec.shadow.variant,
            clusters=_variant_clusters(experiment),
        )

    def event(self, entry: al.HTTPAccessLogEntry) -> TelemetryEvent:
        req, resp, common = entry.request, entry.response, entry.common_properties
        # The shadow listener's mark, logged with the request; the primary listener strips a
        # client-sent one, and neither the client's Host nor anything else says "copy".
        shadow = h.SHADOW_COPY in req.request_headers
        hdrs = {k: v.encode() for k, v in req.request_headers.items()}
        echoed = resp.response_headers.get(h.VARIANT)
        if echoed is not None:
            hdrs[h.VARIANT] = echoed.encode()
        who = attribute(self.policy, self.stable, hdrs, self.variants)
        ev = TelemetryEvent(
            experiment=self.experiment,
            recorder=self.recorder,
            variant=who.variant,
            assignment=who.assignment,
            key_hash=who.key_hash,
            request_id=req.request_id,
            status=resp.response_code.value,
            time_unix_ms=common.start_time.seconds * 1000 + common.start_time.nanos // 1_000_000,
            response_bytes=resp.response_body_bytes,
            shadow=shadow,
        )
        if common.route_name.startswith(FORCED_ROUTE):
            # The forcing header is stripped before the log is written; the route tells.
            ev.assignment = _FORCED
        if shadow and self.shadow_variant is not None:
            ev.variant = self.shadow_variant
        ev.streamed = "text/event-stream" in resp.response_headers.get("content-type", "")
        got_headers = common.HasField("time_to_first_downstream_tx_byte")
        completed = (
            common.HasField("time_to_last_downstream_tx_byte")
            and not common.response_flags.downstream_connection_termination
        )
        if got_headers:
            ev.headers_ms = _ms(common.time_to_first_downstream_tx_byte)
        if completed or got_headers:
            ev.duration_ms = _ms(
                common.time_to_last_downstream_tx_byte
                if common.HasField("time_to_last_downstream_tx_byte")
                else common.time_to_first_downstream_tx_byte
            )
        ev.error = error_class(entry, completed, got_headers)  # type: ignore[assignment]
        md = common.metadata.filter_metadata.get(METADATA)
        if md is not None:
            self._body(ev, md, common)
        return ev

    def _body(self, ev: TelemetryEvent, md: Struct, common: al.AccessLogCommon) -> None:
        f = md.fields
        if "first_token_us" in f:
            start_us = common.start_time.seconds * 1e6 + common.start_time.nanos / 1e3
            ev.first_token_ms = (f["first_token_us"].number_value - start_us) / 1e3
        ev.tool_calls = "tool_calls" in f and f["tool_calls"].bool_value
        tail = f["tail"].string_value if "tail" in f else ""
        for name, value in _USAGE.findall(tail):
            if int(value) < 2**32:  # a uint32 field; a larger count is not believable
                setattr(ev, name, int(value))
        cached = _cached_tokens(tail, md)
        if cached is not None:
            ev.cached_prompt_tokens = cached
        finish = _FINISH.findall(tail)
        if finish:
            ev.finish_reason = finish[-1]
        if "text" in f and ev.status < 400:
            text = decode_text(f["text"].string_value)
            if text is not None:
                ev.refusal = self.rules.is_refusal(text)
                ev.empty_answer = not text.strip() and not ev.tool_calls
                ev.answer_chars = len(text)

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
        variant = (
            self.shadow_variant
            if shadow and self.shadow_variant
            else self.clusters.get(common.upstream_cluster)
        )
        if variant is None or common.route_name.startswith(FORCED_ROUTE):
            return None
        hdrs = {k: v.encode() for k, v in entry.request.request_headers.items()}
        hdrs[h.VARIANT] = variant.encode()
        who = attribute(self.policy, self.stable, hdrs, self.variants)
        start_ms = common.start_time.seconds * 1000 + common.start_time.nanos // 1_000_000
        age_ms = (
            _ms(common.duration) if common.HasField("duration") else time.time() * 1e3 - start_ms
        )
        return TelemetryEvent(
            experiment=self.experiment,
            recorder=self.recorder,
            variant=who.variant,
            assignment=who.assignment,
            key_hash=who.key_hash,
            request_id=entry.request.request_id,
            shadow=shadow,
            in_flight=True,
            time_unix_ms=start_ms + int(age_ms),
            duration_ms=float(int(age_ms)),
        )


def _variant_clusters(experiment: Experiment) -> dict[str, str]:
    """Which variant each Envoy cluster of the native config serves."""
    out = {
        lane_cluster(experiment.spec.variants[experiment.stable].cluster, c): experiment.stable
        for c in experiment.candidates
    }
    out.update({v.cluster: name for name, v in experiment.spec.variants.items()})
    return out


# Requests already noticed, remembered until their final entry; bounded in case it never comes.
MAX_NOTICED = 100_000
_PERIODIC = al.AccessLogType.DownstreamPeriodic


class AccessLogService(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Envoy's access-log stream: every HTTP entry becomes one telemetry event; the first
    periodic entry of a request still open becomes its in-flight notice."""

    def __init__(self, mapper: EntryMapper, emit: Callable[[TelemetryEvent], None]) -> None:
        self.mapper = mapper
        self.emit = emit
        self.noticed: OrderedDict[str, None] = OrderedDict()

    def _periodic(self, entry: al.HTTPAccessLogEntry) -> None:
        rid = entry.request.request_id
        if not rid or rid in self.noticed:
            return
        n = self.mapper.notice(entry)
        if n is None:
            return
        self.noticed[rid] = None
        if len(self.noticed) > MAX_NOTICED:
            self.noticed.popitem(last=False)
        self.emit(n)

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> als_pb2.StreamAccessLogsResponse:
        event, emit = self.mapper.event, self.emit
        async for msg in request_iterator:
            for entry in msg.http_logs.log_entry:
                try:
                    if entry.common_properties.access_log_type == _PERIODIC:
                        self._periodic(entry)
                        continue
                    if self.noticed:
                        self.noticed.pop(entry.request.request_id, None)
                    emit(event(entry))
                except ValueError:  # one odd entry must not end the stream and lose the rest
                    log.warning("dropped an access-log entry it could not map", exc_info=True)
        return als_pb2.StreamAccessLogsResponse()
