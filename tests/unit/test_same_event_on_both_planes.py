"""One request, seen by either data plane, becomes one and the same telemetry event.

Each case is fed to the ext_proc observer as the messages Envoy streams to it (on a clock the
test sets) and to the native plane as the access-log entry Envoy writes once it ended, with what
``inspect.lua`` would have put in its metadata. Both adapters fill an ``Observed`` record for the
shared ``EventBuilder``; the events must agree field for field, final events and in-flight notices
alike. A new field filled by one plane only shows up here as a difference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue, Metadata
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.json_format import MessageToDict
from google.protobuf.struct_pb2 import Struct, Value

from extproc.config import EXAMPLE_EXPERIMENT, parse_experiment
from extproc.contract.envoy import METADATA_NAMESPACE as METADATA
from extproc.dataplane import observer
from extproc.dataplane.accesslog import EntryMapper
from extproc.dataplane.event import EventBuilder
from extproc.dataplane.observer import Observation, ObserverContext
from extproc.telemetry.v1.event_pb2 import ErrorClass, TelemetryEvent

pytestmark = pytest.mark.timeout(30)

_DOC = yaml.safe_load(EXAMPLE_EXPERIMENT.read_text())
_DOC["shadow"] = {"variant": "canary", "share": 10}
EXPERIMENT = parse_experiment(_DOC)
EVENTS = EventBuilder.for_experiment(EXPERIMENT, "test")
START_MS = 1_700_000_000_000
START_RFC3339 = "2023-11-14T22:13:20Z"  # START_MS, as Envoy's request.time attribute


@dataclass(frozen=True)
class Request:
    """One request as both planes see it: routed to ``variant``, answered with ``chunks`` (the
    milliseconds after the start each one left, and its bytes), headers after ``headers_ms``."""

    variant: str
    status: int
    content_type: str
    chunks: list[tuple[int, bytes]]
    first_token_ms: int  # what both planes call the first token (see inspect.lua)
    answer: str | None  # the answer text inspect.lua finds, None when it finds none
    headers_ms: int = 40
    shadow: bool = False
    code_details: str = "via_upstream"
    tool_calls: bool = False
    headers: dict[str, str] = field(default_factory=lambda: {"x-conversation-id": "conv-9"})

    @property
    def body(self) -> bytes:
        return b"".join(c for _, c in self.chunks)

    @property
    def request_headers(self) -> dict[str, str]:
        return {**self.headers, **({"x-llm-shadow-copy": "1"} if self.shadow else {})}


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


ANSWER = "I\u2019m sorry, but I can\u2019t help with that."
STREAM = [
    (55, sse({"choices": [{"delta": {"role": "assistant", "content": ANSWER[:10]}}]})),
    (300, sse({"choices": [{"delta": {"content": ANSWER[10:]}}]})),
    (
        900,
        sse(
            {
                "choices": [{"delta": {}, "finish_reason": "stop"}],
                "usage": {
                    "prompt_tokens": 12,
                    "completion_tokens": 34,
                    "prompt_tokens_details": {"cached_tokens": 4},
                },
            }
        )
        + b"data: [DONE]\n\n",
    ),
]
TOOL_CALL = json.dumps(
    {
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 20, "completion_tokens": 7},
    }
).encode()

CASES = {
    "streamed refusal": Request("canary", 200, "text/event-stream", STREAM, 55, ANSWER),
    "shadow copy": Request("stable", 200, "text/event-stream", STREAM, 55, ANSWER, shadow=True),
    "tool call": Request(
        "canary", 200, "application/json", [(700, TOOL_CALL)], 700, "", tool_calls=True
    ),
    "upstream 503": Request(
        "canary",
        503,
        "application/json",
        [(60, b'{"error":{"message":"overloaded"}}')],
        60,
        None,
        headers_ms=60,
    ),
    "reset after headers": Request(
        "stable",
        200,
        "text/event-stream",
        STREAM[:1],
        55,
        ANSWER[:10],
        code_details="upstream_reset_after_response_started{remote_reset}",
        headers={},
    ),
}


class Clock:
    """The observer's ``time`` module: every message arrives when the test says."""

    def __init__(self) -> None:
        self.now_ns = START_MS * 1_000_000

    def at(self, ms: int) -> None:
        self.now_ns = (START_MS + ms) * 1_000_000

    def time_ns(self) -> int:
        return self.now_ns


def header_map(values: dict[str, str]) -> pb.HttpHeaders:
    hm = HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()])
    return pb.HttpHeaders(headers=hm)


def attributes(**values: str) -> dict[str, Struct]:
    return {
        "envoy.filters.http.ext_proc": Struct(
            fields={k: Value(string_value=v) for k, v in values.items()}
        )
    }


def observation(r: Request, out: list[TelemetryEvent]) -> Observation:
    """The observer's stream of ``r`` up to its request headers (its start: Envoy's
    ``request.time``)."""
    obs = Observation(ObserverContext(events=EVENTS, emit=out.append))
    hdrs = {"x-request-id": "rid-1", "x-llm-variant": r.variant, **r.request_headers}
    obs.on_message(
        pb.ProcessingRequest(
            request_headers=header_map(hdrs),
            attributes=attributes(**{"request.time": START_RFC3339}),
            observability_mode=True,
        )
    )
    return obs


def through_observer(r: Request, clock: Clock) -> TelemetryEvent:
    out: list[TelemetryEvent] = []
    obs = observation(r, out)
    clock.at(r.headers_ms)
    obs.on_message(
        pb.ProcessingRequest(
            response_headers=header_map({":status": str(r.status), "content-type": r.content_type}),
            attributes=attributes(**{"response.code_details": r.code_details}),
        )
    )
    for i, (ms, chunk) in enumerate(r.chunks):
        clock.at(ms)
        last = i == len(r.chunks) - 1 and r.code_details == "via_upstream"
        obs.on_message(
            pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk, end_of_stream=last))
        )
    obs.close()  # a reset stream closes without its end
    assert len(out) == 1
    return out[0]


def access_log_entry(r: Request) -> al.HTTPAccessLogEntry:
    """The entry Envoy logs for ``r``, with inspect.lua's metadata."""
    e = al.HTTPAccessLogEntry()
    e.request.request_id = "rid-1"
    e.request.request_headers.update(r.request_headers)
    e.response.response_code.value = r.status
    e.response.response_code_details = r.code_details
    e.response.response_body_bytes = len(r.body)
    e.response.response_headers.update({"x-llm-variant": r.variant, "content-type": r.content_type})
    c = e.common_properties
    c.start_time.FromMilliseconds(START_MS)
    c.time_to_first_downstream_tx_byte.FromMilliseconds(r.headers_ms)
    c.time_to_last_downstream_tx_byte.FromMilliseconds(r.chunks[-1][0])
    c.route_name = "weighted"
    if r.code_details != "via_upstream":
        c.response_flags.upstream_remote_reset = True
    md: dict[str, Any] = {
        "first_token_us": (START_MS + r.first_token_ms) * 1000,
        "tail": r.body[-1024:].decode(),
    }
    if r.answer is not None:
        md["text"] = json.dumps(r.answer)[1:-1]
    if r.tool_calls:
        md["tool_calls"] = True
    s = Struct()
    s.update(md)
    c.metadata.CopyFrom(Metadata(filter_metadata={METADATA: s}))
    return e


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(observer, "time", c)
    return c


def mapper() -> EntryMapper:
    return EntryMapper.for_experiment(EXPERIMENT, EVENTS)


@pytest.mark.parametrize("case", CASES)
def test_both_planes_build_the_same_event(case: str, clock: Clock) -> None:
    r = CASES[case]
    ext_proc = through_observer(r, clock)
    native = mapper().event(access_log_entry(r))
    assert MessageToDict(ext_proc) == MessageToDict(native)
    assert ext_proc == native
    # Not two empty events: each case carries what it is about.
    assert ext_proc.request_id == "rid-1"
    assert ext_proc.headers_ms == r.headers_ms
    if r.status < 400:
        assert ext_proc.HasField("answer_chars")
    else:
        assert not ext_proc.HasField("refusal")
        assert ext_proc.error == ErrorClass.ERROR_CLASS_UPSTREAM_5XX


def test_the_signals_each_case_is_about() -> None:
    """What the cases above compare, pinned once (on the native plane, equal to the other)."""
    m = mapper()
    ev = {name: m.event(access_log_entry(r)) for name, r in CASES.items()}
    refusal = ev["streamed refusal"]
    assert (refusal.refusal, refusal.first_token_ms, refusal.duration_ms) == (True, 55, 900)
    usage = (refusal.prompt_tokens, refusal.completion_tokens, refusal.cached_prompt_tokens)
    assert usage == (12, 34, 4)
    assert (ev["shadow copy"].variant, ev["shadow copy"].shadow) == ("canary", True)
    tool = ev["tool call"]
    assert (tool.tool_calls, tool.empty_answer, tool.finish_reason) == (True, False, "tool_calls")
    assert ev["reset after headers"].error == ErrorClass.ERROR_CLASS_RESET
