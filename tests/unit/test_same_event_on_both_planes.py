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
from extproc.telemetry.v1.event_pb2 import ApiFormat, ErrorClass, TelemetryEvent

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
    first_token_ms: int | None  # what both planes call the first token (see inspect.lua)
    answer: str | None  # the answer text inspect.lua finds, None when it finds none
    api: str | None = "chat"  # the format inspect.lua names, None when it names none
    early: dict[str, int] = field(default_factory=dict)  # what inspect.lua read of a stream's head
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


def named(*events: dict[str, Any]) -> bytes:
    """Events as Responses and Anthropic stream them: an ``event:`` line names each."""
    return b"".join(f"event: {e['type']}\n".encode() + sse(e) for e in events)


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


def text_completion(text: str, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": "cmpl-1", "object": "text_completion", "choices": [choice], **extra}


USAGE = {"prompt_tokens": 12, "completion_tokens": 34}
USAGE_OUT = {"output_tokens": 34}
COMPLETIONS_STREAM = [
    (55, sse(text_completion(ANSWER[:10]))),
    (300, sse(text_completion(ANSWER[10:]))),
    (900, sse(text_completion("", "stop", usage=USAGE)) + b"data: [DONE]\n\n"),
]
RESPONSE = {"id": "resp_1", "object": "response", "status": "in_progress", "output": []}
RESPONSES_USAGE = {
    "input_tokens": 12,
    "input_tokens_details": {"cached_tokens": 4},
    "output_tokens": 34,
    "output_tokens_details": {"reasoning_tokens": 0},
}
RESPONSES_BODY = {
    **RESPONSE,
    "status": "completed",
    "output": [
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": ANSWER, "annotations": []}],
        }
    ],
    "text": {"format": {"type": "text"}},
    "usage": RESPONSES_USAGE,
}


def text_delta(text: str) -> dict[str, Any]:
    return {"type": "response.output_text.delta", "output_index": 0, "delta": text}


RESPONSES_STREAM = [
    (45, named({"type": "response.created", "response": {**RESPONSE, "usage": None}})),
    (55, named(text_delta(ANSWER[:10]))),
    (300, named(text_delta(ANSWER[10:]))),
    (900, named({"type": "response.completed", "response": RESPONSES_BODY})),
]


def block_delta(text: str) -> dict[str, Any]:
    return {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": text},
    }


MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m"}
MESSAGES_STREAM = [
    (
        45,
        named(
            {
                "type": "message_start",
                "message": {
                    **MESSAGE,
                    "content": [],
                    "usage": {"input_tokens": 12, "cache_read_input_tokens": 4, "output_tokens": 1},
                },
            },
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}},
        ),
    ),
    (55, named(block_delta(ANSWER[:10]))),
    (300, named(block_delta(ANSWER[10:]))),
    (
        900,
        named(
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": USAGE_OUT},
            {"type": "message_stop"},
        ),
    ),
]
MESSAGES_TOOL_CALL = json.dumps(
    {
        **MESSAGE,
        "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"text": "x"}}],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 20, "output_tokens": 7},
    }
).encode()
# OpenAI's structured refusal: the answer in its own field, the content null.
REFUSAL_DELTAS = [
    (55, sse({"choices": [{"delta": {"role": "assistant", "content": None, "refusal": ""}}]})),
    (70, sse({"choices": [{"delta": {"refusal": ANSWER}}]})),
    (900, sse({"choices": [{"delta": {}, "finish_reason": "stop"}]}) + b"data: [DONE]\n\n"),
]
REFUSAL_BODY = json.dumps(
    {
        "object": "chat.completion",
        "choices": [
            {
                "message": {"role": "assistant", "content": None, "refusal": ANSWER},
                "finish_reason": "stop",
            }
        ],
    }
).encode()
UNKNOWN_STREAM = [(55, sse({"token": "hello"})), (900, sse({"token": "world", "done": True}))]

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
    "legacy completions, streamed": Request(
        "canary", 200, "text/event-stream", COMPLETIONS_STREAM, 55, ANSWER, api="completions"
    ),
    "legacy completions": Request(
        "canary",
        200,
        "application/json",
        [(700, json.dumps(text_completion(ANSWER, "stop", usage=USAGE)).encode())],
        700,
        ANSWER,
        api="completions",
    ),
    "responses, streamed": Request(
        "canary", 200, "text/event-stream", RESPONSES_STREAM, 55, ANSWER, api="responses"
    ),
    "responses": Request(
        "canary",
        200,
        "application/json",
        [(700, json.dumps(RESPONSES_BODY).encode())],
        700,
        ANSWER,
        api="responses",
    ),
    "messages, streamed": Request(
        "canary",
        200,
        "text/event-stream",
        MESSAGES_STREAM,
        55,
        ANSWER,
        api="messages",
        early={"prompt_tokens": 12, "cached_prompt_tokens": 4},
    ),
    "messages tool call": Request(
        "canary",
        200,
        "application/json",
        [(700, MESSAGES_TOOL_CALL)],
        700,
        "",
        api="messages",
        tool_calls=True,
    ),
    "structured refusal, streamed": Request(
        "canary", 200, "text/event-stream", REFUSAL_DELTAS, 70, ANSWER
    ),
    "structured refusal": Request(
        "canary", 200, "application/json", [(700, REFUSAL_BODY)], 700, ANSWER
    ),
    "unknown format": Request(
        "canary", 200, "text/event-stream", UNKNOWN_STREAM, None, None, api=None
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
    md: dict[str, Any] = {"tail": r.body[-1024:].decode(), **r.early}
    if r.first_token_ms is not None:
        md["first_token_us"] = (START_MS + r.first_token_ms) * 1000
    if r.api is not None:
        md["format"] = r.api
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
        assert ext_proc.HasField("answer_chars") is (r.api is not None)
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
    assert tool.api_format == ApiFormat.API_FORMAT_CHAT_COMPLETIONS
    assert ev["upstream 503"].api_format == ApiFormat.API_FORMAT_UNSPECIFIED  # an error body


@pytest.mark.parametrize(
    ("case", "api", "first_token_ms", "cached"),
    [
        ("legacy completions, streamed", ApiFormat.API_FORMAT_COMPLETIONS, 55, None),
        ("legacy completions", ApiFormat.API_FORMAT_COMPLETIONS, 700, None),
        ("responses, streamed", ApiFormat.API_FORMAT_RESPONSES, 55, 4),
        ("responses", ApiFormat.API_FORMAT_RESPONSES, 700, 4),
        ("messages, streamed", ApiFormat.API_FORMAT_MESSAGES, 55, 4),
    ],
)
def test_each_api_formats_answer_and_usage(
    case: str, api: ApiFormat.ValueType, first_token_ms: int, cached: int | None
) -> None:
    """The refusal, first token and token counts of every format the planes read."""
    ev = mapper().event(access_log_entry(CASES[case]))
    assert (ev.api_format, ev.refusal, ev.first_token_ms) == (api, True, first_token_ms)
    assert (ev.prompt_tokens, ev.completion_tokens) == (12, 34)
    assert ev.HasField("cached_prompt_tokens") is (cached is not None)
    assert ev.cached_prompt_tokens == (cached or 0)


def test_the_other_formats_finish_reasons_and_tool_calls() -> None:
    m = mapper()
    assert m.event(access_log_entry(CASES["messages, streamed"])).finish_reason == "end_turn"
    assert m.event(access_log_entry(CASES["legacy completions"])).finish_reason == "stop"
    tool = m.event(access_log_entry(CASES["messages tool call"]))
    assert (tool.tool_calls, tool.empty_answer, tool.finish_reason) == (True, False, "tool_use")
    assert (tool.prompt_tokens, tool.completion_tokens) == (20, 7)


@pytest.mark.parametrize("case", ["structured refusal, streamed", "structured refusal"])
def test_a_refusal_in_its_own_field_is_the_answer(case: str) -> None:
    ev = mapper().event(access_log_entry(CASES[case]))
    assert (ev.refusal, ev.empty_answer, ev.answer_chars) == (True, False, len(ANSWER))


def test_an_unknown_format_gets_timing_only() -> None:
    ev = mapper().event(access_log_entry(CASES["unknown format"]))
    assert ev.api_format == ApiFormat.API_FORMAT_UNKNOWN
    assert (ev.headers_ms, ev.duration_ms, ev.status) == (40, 900, 200)
    for name in ("first_token_ms", "prompt_tokens", "completion_tokens", "refusal", "answer_chars"):
        assert not ev.HasField(name), name
