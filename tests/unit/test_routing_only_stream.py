"""The ext_proc plane at the cost of routing alone: one answer per request, bodies only for the
captured sample (asked with ``mode_override``), and the access log giving every request's event,
with what only the capture stream knows (JSON asked, JSON valid) passed on as dynamic metadata."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import uvloop
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue, Metadata
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.struct_pb2 import Struct

from extproc.config import Experiment, parse_experiment
from extproc.contract.envoy import FALLBACK_ROUTE, FORCED_ROUTE, METADATA_NAMESPACE
from extproc.dataplane.accesslog import EntryMapper
from extproc.dataplane.catalog import Catalog, Lane
from extproc.dataplane.event import EventBuilder
from extproc.dataplane.observer import JSON_ASKED, JSON_VALID, ObserverContext
from extproc.dataplane.router import CAPTURE_MODE, Router
from extproc.dataplane.server import ExternalProcessor, run_sidecar
from extproc.dev.mockformats import FORMATS, Answer
from extproc.routing.live import LiveRouting
from extproc.telemetry.v1.event_pb2 import Assignment
from extproc.telemetry.writer import Capture

pytestmark = pytest.mark.timeout(30)


def experiment(sample: float) -> Experiment:
    return parse_experiment(
        {
            "name": "exp",
            "salt": "s",
            "stable": "stable",
            "variants": {
                "stable": {"cluster": "model_stable", "weight": 50},
                "canary": {"cluster": "model_canary", "weight": 50},
            },
            "shadow": {"variant": "canary", "share": 0},
            "capture": {"sample": sample},
        }
    )


def headers(**values: str) -> pb.ProcessingRequest:
    hm = HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()])
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=hm))


def body(phase: str, data: bytes, end: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(**{phase: pb.HttpBody(body=data, end_of_stream=end)})


def response_headers(content_type: str = "application/json") -> pb.ProcessingRequest:
    hm = HeaderMap(
        headers=[
            HeaderValue(key=":status", raw_value=b"200"),
            HeaderValue(key="content-type", raw_value=content_type.encode()),
        ]
    )
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=hm))


class Stream:
    """An ext_proc stream as grpc.aio's servicer context shows it: what Envoy sends, what the
    sidecar answered, and whether the sidecar read past the messages it was given."""

    def __init__(self, messages: list[pb.ProcessingRequest]) -> None:
        self.pending: Iterator[pb.ProcessingRequest] = iter(messages)
        self.answers: list[pb.ProcessingResponse] = []
        self.read_eof = False

    async def read(self) -> Any:
        nxt = next(self.pending, None)
        if nxt is None:
            self.read_eof = True
            return grpc.aio.EOF
        return nxt

    async def write(self, msg: pb.ProcessingResponse) -> None:
        self.answers.append(msg)


def processor(sample: float) -> tuple[ExternalProcessor, list[Capture]]:
    exp = experiment(sample)
    events = EventBuilder.for_experiment(exp, "test")
    captures: list[Capture] = []
    live = LiveRouting(exp, None)  # type: ignore[arg-type]  # never reads: the file's weights
    router = Router(live, events.rules.captures if sample else None)
    ctx = ObserverContext(events=events, capture=captures.append if sample else None)
    mapper = EntryMapper.for_experiment(exp, events)
    lane = Lane(exp, "", live, router, events, mapper, ctx)
    catalog = Catalog(None, lambda _exp, _digest: lane, fixed=exp)  # type: ignore[arg-type]
    return ExternalProcessor(catalog), captures


async def test_an_uncaptured_request_costs_one_answer_and_the_stream_ends() -> None:
    proc, captures = processor(sample=0)
    s = Stream([headers(**{"x-request-id": "r1", "x-conversation-id": "c1"})])
    await proc.Process(None, s)
    (answer,) = s.answers
    assert answer.request_headers.response.clear_route_cache
    assert not answer.HasField("mode_override")
    assert not s.read_eof  # it ended the stream without waiting for Envoy to
    assert captures == []


async def test_a_captured_request_asks_for_its_bodies_and_is_captured() -> None:
    proc, captures = processor(sample=100)
    prompt = {
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_object"},
    }
    answer = b'{"choices":[{"message":{"content":"{\\"a\\": 1}"},"finish_reason":"stop"}]}'
    s = Stream(
        [
            headers(**{"x-request-id": "r2", "x-conversation-id": "c2"}),
            body("request_body", json.dumps(prompt).encode(), end=True),
            response_headers(),
            body("response_body", answer, end=True),
        ]
    )
    await proc.Process(None, s)
    first, req_body, resp_headers, resp_body = s.answers
    assert first.mode_override == CAPTURE_MODE
    assert first.request_headers.response.header_mutation.set_headers  # still routed
    # Whether it asked for JSON, and whether the answer parsed, go to the access log.
    assert (
        req_body.dynamic_metadata.fields[METADATA_NAMESPACE]
        .struct_value.fields[JSON_ASKED]
        .bool_value
    )
    assert resp_headers.HasField("response_headers")
    md = resp_body.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.fields
    assert (resp_body.HasField("response_body"), md[JSON_VALID].bool_value) == (True, True)
    assert not s.read_eof  # ended at the response's end
    (cap,) = captures
    assert (cap.request_id, cap.role) == ("r2", "primary")
    assert json.loads(cap.doc)["prompt"] == "user: hi"


async def test_a_shadow_copy_is_not_routed_and_a_refusal_never_captured() -> None:
    proc, _ = processor(sample=100)
    copy = Stream([headers(**{"x-request-id": "r3", "x-llm-shadow-copy": "1"})])
    await proc.Process(None, copy)
    (answer,) = copy.answers  # its listener routes it; captured, it asks for its bodies
    assert answer.request_headers == pb.HeadersResponse()
    assert answer.mode_override == CAPTURE_MODE
    refused = Stream([headers(**{"x-request-id": "r4", "x-experiment": "nope"})])
    await proc.Process(None, refused)
    (answer,) = refused.answers
    assert answer.immediate_response.status.code == 400
    assert not answer.HasField("mode_override")


def entry(route: str, md: dict[str, Any] | None = None, **request: str) -> al.HTTPAccessLogEntry:
    e = al.HTTPAccessLogEntry()
    e.request.request_id = "rid"
    e.request.request_headers.update({"x-conversation-id": "c", **request})
    e.response.response_code.value = 200
    e.response.response_headers.update(
        {"x-llm-variant": "canary" if route != FALLBACK_ROUTE else "stable"}
    )
    c = e.common_properties
    c.start_time.FromMilliseconds(1_700_000_000_000)
    c.time_to_first_downstream_tx_byte.FromMilliseconds(5)
    c.time_to_last_downstream_tx_byte.FromMilliseconds(9)
    c.route_name = route
    s = Struct()
    s.update({"format": "chat", "text": '{\\"a\\": 1', "tail": "", **(md or {})})
    c.metadata.CopyFrom(Metadata(filter_metadata={METADATA_NAMESPACE: s}))
    return e


def test_the_access_log_attributes_ext_proc_routes() -> None:
    exp = experiment(sample=100)
    m = EntryMapper.for_experiment(exp, EventBuilder.for_experiment(exp, "test"))
    routed = m.event(entry("variant_canary"))
    assert (routed.variant, routed.assignment) == ("canary", Assignment.ASSIGNMENT_STICKY)
    assert routed.captured  # 100% sampled: the capture stream and the access log agree
    fallback = m.event(entry(FALLBACK_ROUTE))
    assert (fallback.variant, fallback.assignment) == ("stable", Assignment.ASSIGNMENT_FALLBACK)
    # Istio's fallback route sets the variant header so that its access-log filter keeps it.
    marked_fallback = m.event(entry(FALLBACK_ROUTE, **{"x-llm-variant": "stable"}))
    assert marked_fallback.assignment == Assignment.ASSIGNMENT_FALLBACK
    forced = m.event(entry(f"{FORCED_ROUTE}canary"))
    assert (forced.variant, forced.assignment) == ("canary", Assignment.ASSIGNMENT_FORCED)
    # On Istio no route says "forced": the sidecar's mark does (clients' is stripped).
    marked = m.event(entry("outbound|8000|canary|model.svc", **{"x-llm-forced": "1"}))
    assert (marked.variant, marked.assignment) == ("canary", Assignment.ASSIGNMENT_FORCED)


async def test_only_a_forced_request_is_marked_forced_for_the_access_log() -> None:
    proc, _ = processor(sample=0)
    marks = []
    for extra in ({"x-experiment": "canary"}, {}, {"x-experiment": ""}):
        s = Stream([headers(**{"x-request-id": "r5", "x-conversation-id": "c5", **extra})])
        await proc.Process(None, s)
        (answer,) = s.answers
        mutation = answer.request_headers.response.header_mutation
        marks.append({o.header.key: o.header.raw_value for o in mutation.set_headers})
    assert marks[0] == {"x-llm-variant": b"canary", "x-llm-forced": b"1"}
    assert all("x-llm-forced" not in m for m in marks[1:])


def test_json_signals_from_the_capture_stream_reach_the_event() -> None:
    exp = experiment(sample=100)
    m = EntryMapper.for_experiment(exp, EventBuilder.for_experiment(exp, "test"))
    assert not m.event(entry("variant_canary")).HasField("json_valid")  # not asked
    # The access log's own text is cut ("{\"a\": 1" does not parse); the stream's verdict wins.
    judged = m.event(entry("variant_canary", {JSON_ASKED: True, JSON_VALID: True}))
    assert judged.json_valid is True
    unjudged = m.event(entry("variant_canary", {JSON_ASKED: True}))
    assert unjudged.json_valid is False


def test_the_first_token_stays_within_the_response() -> None:
    """inspect.lua's wall-clock stamp past the last byte (Envoy's monotonic durations) is held to
    it; one before the headers is held to them."""
    exp = experiment(sample=0)
    m = EntryMapper.for_experiment(exp, EventBuilder.for_experiment(exp, "test"))
    start_us = 1_700_000_000_000 * 1000
    late = m.event(entry("variant_canary", {"first_token_us": start_us + 9_500}))
    assert (late.headers_ms, late.first_token_ms, late.duration_ms) == (5, 9, 9)
    early = m.event(entry("variant_canary", {"first_token_us": start_us + 1_000}))
    assert early.first_token_ms == 5
    inside = m.event(entry("variant_canary", {"first_token_us": start_us + 7_000}))
    assert inside.first_token_ms == 7


def metadata_keys(answer: pb.ProcessingResponse) -> set[str]:
    """The access-log metadata an answer sets; read without indexing, which would add the key
    to a shared answer message."""
    md = answer.dynamic_metadata.fields
    return set(md[METADATA_NAMESPACE].struct_value.fields) if METADATA_NAMESPACE in md else set()


@pytest.mark.parametrize(
    ("path", "request_doc", "prompt", "json_asked"),
    [
        ("/v1/completions", {"prompt": "hi"}, "user: hi", False),
        (
            "/v1/responses",
            {"instructions": "brief", "input": "hi", "text": {"format": {"type": "json_object"}}},
            "system: brief\nuser: hi",
            True,
        ),
        (
            "/v1/messages",
            {"system": "brief", "messages": [{"role": "user", "content": "hi"}]},
            "system: brief\nuser: hi",
            False,
        ),
    ],
)
async def test_a_captured_request_of_each_api_is_captured(
    path: str, request_doc: dict[str, Any], prompt: str, json_asked: bool
) -> None:
    """The prompt where each API puts it, the answer where each API puts it (the stand-in's
    rendering), and a JSON answer asked for in Responses' own way."""
    proc, captures = processor(sample=100)
    answer = Answer("ab12", 0, "m", ['{"a": 1}'], "", False, 3, None, False)
    s = Stream(
        [
            headers(**{"x-request-id": "r3", "x-conversation-id": "c3"}),
            body("request_body", json.dumps(request_doc).encode(), end=True),
            response_headers(),
            body("response_body", json.dumps(FORMATS[path].body(answer)).encode(), end=True),
        ]
    )
    await proc.Process(None, s)
    _, req_body, _, resp_body = s.answers
    assert metadata_keys(req_body) == ({JSON_ASKED} if json_asked else set())
    assert metadata_keys(resp_body) == ({JSON_VALID} if json_asked else set())
    (cap,) = captures
    doc = json.loads(cap.doc)
    assert (doc["prompt"], doc["answer"], doc["completion_tokens"]) == (prompt, '{"a": 1}', 1)


def test_the_sidecar_runs_on_uvloop() -> None:
    """Its loop wakes for each event of a routed stream for less than asyncio's
    (docs/PERFORMANCE.md, "The event loop"): ``extproc serve`` and every worker start through
    ``run_sidecar``."""
    loops: list[type[asyncio.AbstractEventLoop]] = []

    class Probe:
        async def run(self, ready: object = None) -> None:
            loops.append(type(asyncio.get_running_loop()))

    run_sidecar(Probe())  # type: ignore[arg-type]
    assert loops == [uvloop.Loop]
