"""Every LLM API format the telemetry reads, through a real Envoy, sidecar, Redis and the model
stand-ins speaking it, on both data planes: time to first token, token counts and refusals land
in the events in Redis as the stand-ins made them.

The stand-ins are set so that every figure is known in advance: the first token leaves
``TTFT_MS`` after the headers and the rest one every ``1000 / TOKENS_PER_S`` ms; stable answers
in words and is cut at the request's ``MAX_TOKENS`` (its answers are 20 words or more), canary
refuses (``REFUSAL``: 8 tokens, under the limit); offered a tool, stable calls it (in the APIs that
have tools). A body in no known format (the stand-in's model list) gets timing only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from extproc.dev.mockmodel import REFUSAL
from extproc.telemetry.v1.event_pb2 import ApiFormat, TelemetryEvent
from tests.conftest import LiveStack, forced_planes, upstream_stack, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PROMPT = "one two three four five six seven eight nine"  # 9 prompt tokens
MAX_TOKENS = 10
TTFT_MS = 150
TOKENS_PER_S = 50
GAP_MS = 1000 / TOKENS_PER_S
PACE = ["--ttft-ms", str(TTFT_MS), "--tokens-per-s", str(TOKENS_PER_S), "--completion-tokens", "40"]
# A request offering a tool gets a call of it from stable (the stand-in's --tool-call-rate 1).
TOOLS = {
    "/v1/chat/completions": [{"type": "function", "function": {"name": "search_docs"}}],
    "/v1/responses": [{"type": "function", "name": "search_docs", "parameters": {}}],
    "/v1/messages": [{"name": "search_docs", "input_schema": {"type": "object"}}],
}


def request(path: str, stream: bool) -> dict[str, Any]:
    """A request of the API at ``path`` for PROMPT, limited to MAX_TOKENS."""
    messages = [{"role": "user", "content": PROMPT}]
    usage = {"stream_options": {"include_usage": True}} if stream else {}
    return {
        "/v1/chat/completions": {"messages": messages, "max_tokens": MAX_TOKENS, **usage},
        "/v1/completions": {"prompt": PROMPT, "max_tokens": MAX_TOKENS, **usage},
        "/v1/responses": {"input": PROMPT, "max_output_tokens": MAX_TOKENS},
        "/v1/messages": {"messages": messages, "max_tokens": MAX_TOKENS},
    }[path] | {"model": "m", "stream": stream}


# path -> (the format recorded, the finish reason of an answer cut at the limit, of a whole one)
FORMATS = {
    "/v1/chat/completions": (ApiFormat.API_FORMAT_CHAT_COMPLETIONS, "length", "stop"),
    "/v1/completions": (ApiFormat.API_FORMAT_COMPLETIONS, "length", "stop"),
    "/v1/responses": (ApiFormat.API_FORMAT_RESPONSES, "", ""),
    "/v1/messages": (ApiFormat.API_FORMAT_MESSAGES, "max_tokens", "end_turn"),
}


# One stack per data plane for the whole module; every request is forced to a variant.
plane = forced_planes(
    {"stable": [*PACE, "--tool-call-rate", "1"], "canary": [*PACE, "--refusal-rate", "1"]}
)


def event_of(s: LiveStack, rid: str) -> TelemetryEvent:
    def found() -> TelemetryEvent | None:
        return next((ev for ev in s.events() if ev.request_id == rid and not ev.shadow), None)

    ev: TelemetryEvent = wait_for(found, f"the event of request {rid}")
    return ev


def ask(
    s: LiveStack, http: httpx.Client, variant: str, path: str, stream: bool, **extra: Any
) -> str:
    """One forced request; its request id (as Envoy assigned and echoed it)."""
    r = http.post(
        f"{s.listener}{path}",
        json=request(path, stream) | extra,
        headers={"x-experiment": variant},
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-llm-variant"] == variant
    assert ("text/event-stream" in r.headers["content-type"]) is stream
    if variant == "canary":
        assert "sorry" in r.text
    return r.headers["x-request-id"]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize("path", list(FORMATS))
def test_each_api_format_is_read(
    plane: LiveStack, http: httpx.Client, path: str, stream: bool
) -> None:
    api, cut_reason, whole_reason = FORMATS[path]
    answer = event_of(plane, ask(plane, http, "stable", path, stream))
    refusal = event_of(plane, ask(plane, http, "canary", path, stream))
    for ev in (answer, refusal):
        assert ev.api_format == api
        assert (ev.status, ev.streamed, ev.prompt_tokens) == (200, stream, 9)
        assert ev.HasField("first_token_ms")
        assert ev.headers_ms <= ev.first_token_ms <= ev.duration_ms
        assert not ev.tool_calls
    assert (answer.completion_tokens, answer.finish_reason) == (MAX_TOKENS, cut_reason)
    assert (answer.refusal, answer.empty_answer) == (False, False)
    assert answer.answer_chars > MAX_TOKENS  # words, not one
    assert (refusal.completion_tokens, refusal.finish_reason) == (8, whole_reason)
    assert refusal.refusal
    assert refusal.answer_chars == len(REFUSAL)
    if stream:
        # The first token leaves TTFT_MS after the request came, the last one 9 tokens after
        # that: a first token stamped at the last byte would fail (half the gap: Envoy may pass
        # the first chunk on late on a loaded machine, never early).
        assert answer.first_token_ms >= TTFT_MS
        assert answer.duration_ms - answer.first_token_ms >= (MAX_TOKENS - 1) * GAP_MS / 2


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize("path", list(TOOLS))
def test_each_api_formats_tool_calls(
    plane: LiveStack, http: httpx.Client, path: str, stream: bool
) -> None:
    ev = event_of(plane, ask(plane, http, "stable", path, stream, tools=TOOLS[path]))
    assert (ev.api_format, ev.tool_calls, ev.empty_answer) == (FORMATS[path][0], True, False)
    assert ev.HasField("first_token_ms")
    if stream:  # the call is the first token, TTFT_MS after the request came
        assert ev.first_token_ms >= TTFT_MS


def test_a_body_in_no_known_format_gets_timing_only(plane: LiveStack, http: httpx.Client) -> None:
    r = http.get(f"{plane.listener}/v1/models", headers={"x-experiment": "canary"})
    assert r.status_code == 200, r.text
    ev = event_of(plane, r.headers["x-request-id"])
    assert ev.api_format == ApiFormat.API_FORMAT_UNKNOWN
    assert ev.HasField("headers_ms")
    assert ev.HasField("duration_ms")
    assert ev.response_bytes == len(r.content)
    for name in ("prompt_tokens", "completion_tokens", "refusal", "empty_answer", "answer_chars"):
        assert not ev.HasField(name), name


def structured_refusal(stream: bool) -> bytes:
    """OpenAI's refusal in its own field, the content null (no stand-in knob makes one)."""
    if not stream:
        message = {"role": "assistant", "content": None, "refusal": REFUSAL}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return json.dumps({"object": "chat.completion", "choices": [choice]}).encode()
    deltas = [{"role": "assistant", "content": None, "refusal": ""}, {"refusal": REFUSAL}, {}]
    events = [{"object": "chat.completion.chunk", "choices": [{"delta": d}]} for d in deltas]
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


@pytest.fixture(scope="module", params=["ext_proc", "native"])
def refusing_plane(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveStack]:
    answers = {
        "/stream": ("text/event-stream", structured_refusal(True)),
        "/json": ("application/json", structured_refusal(False)),
    }
    with upstream_stack(tmp_path_factory.mktemp(request.param), request.param, answers) as s:
        yield s


@pytest.mark.parametrize("path", ["/stream", "/json"])
def test_a_refusal_in_its_own_field_is_the_answer(
    refusing_plane: LiveStack, http: httpx.Client, path: str
) -> None:
    r = http.post(f"{refusing_plane.listener}{path}", json={}, headers={"x-experiment": "canary"})
    assert r.status_code == 200, r.text
    ev = event_of(refusing_plane, r.headers["x-request-id"])
    assert ev.api_format == ApiFormat.API_FORMAT_CHAT_COMPLETIONS
    assert (ev.refusal, ev.empty_answer, ev.answer_chars) == (True, False, len(REFUSAL))
