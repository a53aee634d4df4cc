"""The response inspector on every API format it reads, and on a body in none of them.

Most cases are the model stand-in's real output (each format, whole and streamed, with its knobs
set), read as the sidecar reads it and cut in other ways; the OpenAI SDK checks that the
stand-in's legacy completions and Responses are what clients parse. Hand-made bodies pin the
corners the stand-in does not produce (reasoning before the answer, no ``object`` field).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any

import aiohttp
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.dev.mockmodel import REFUSAL, MockBehaviour
from extproc.telemetry.inspect import ResponseSummary
from extproc.telemetry.v1.event_pb2 import ApiFormat
from tests.unit.conftest import Start
from tests.unit.test_inspect import run as run_chunks

pytestmark = pytest.mark.timeout(30)

SSE = "text/event-stream"
JSON = "application/json"
PROMPT = "one two three four five"  # 5 prompt tokens

FORMATS = {
    "/v1/chat/completions": ApiFormat.API_FORMAT_CHAT_COMPLETIONS,
    "/v1/completions": ApiFormat.API_FORMAT_COMPLETIONS,
    "/v1/responses": ApiFormat.API_FORMAT_RESPONSES,
    "/v1/messages": ApiFormat.API_FORMAT_MESSAGES,
}
# The finish reason of a whole answer, and of one cut at the token limit.
FINISH = {
    "/v1/chat/completions": ("stop", "length"),
    "/v1/completions": ("stop", "length"),
    "/v1/responses": (None, None),
    "/v1/messages": ("end_turn", "max_tokens"),
}
TOOLS = {
    "/v1/chat/completions": [{"type": "function", "function": {"name": "search_docs"}}],
    "/v1/responses": [{"type": "function", "name": "search_docs", "parameters": {}}],
    "/v1/messages": [{"name": "search_docs", "input_schema": {"type": "object"}}],
}


def request(path: str, stream: bool, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": PROMPT}]
    body: dict[str, Any] = {
        "/v1/chat/completions": {"messages": messages},
        "/v1/completions": {"prompt": PROMPT},
        "/v1/responses": {"input": PROMPT},
        "/v1/messages": {"messages": messages, "max_tokens": 1000},
    }[path]
    if stream and path in ("/v1/chat/completions", "/v1/completions"):
        body["stream_options"] = {"include_usage": True}
    return {"model": "m", "stream": stream, **body, **extra}


def run(content_type: str, chunks: list[bytes]) -> ResponseSummary:
    """Fed with ``now_ns`` = the byte offset where each chunk ends, capturing the answer."""
    return run_chunks(content_type, chunks, 1 << 16)


async def fetch(base: str, path: str, body: dict[str, Any]) -> tuple[str, bytes]:
    async with aiohttp.ClientSession() as session, session.post(base + path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["Content-Type"], await resp.read()


def assert_any_cut_agrees(content_type: str, raw: bytes) -> ResponseSummary:
    """The summary of ``raw`` fed whole; cut in other ways it must agree but for the time of
    the first token."""
    whole = run(content_type, [raw])
    for size in (1, 7, 64, 1000):
        again = run(content_type, [raw[i : i + size] for i in range(0, len(raw), size)])
        assert dataclasses.replace(again, first_token_ns=None) == dataclasses.replace(
            whole, first_token_ns=None
        )
    return whole


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize("path", list(FORMATS))
async def test_the_stand_ins_answers_in_each_format(
    start_mock: Start, path: str, stream: bool
) -> None:
    base = await start_mock(MockBehaviour(completion_tokens=40, seed=5, cached_prompt_ratio=0.4))
    refusing = await start_mock(MockBehaviour(refusal_rate=1.0, seed=5))
    kind, raw = await fetch(base, path, request(path, stream))
    answer = assert_any_cut_agrees(kind, raw)
    _, raw = await fetch(base, path, request(path, stream, max_tokens=6, max_output_tokens=6))
    cut = run(kind, [raw])
    kind, raw = await fetch(refusing, path, request(path, stream))
    refusal = assert_any_cut_agrees(kind, raw)

    whole_reason, cut_reason = FINISH[path]
    assert (answer.api_format, answer.streamed, answer.malformed) == (FORMATS[path], stream, False)
    assert answer.text is not None
    assert answer.completion_tokens == len(answer.text.split())
    assert answer.completion_tokens >= 20  # 40 words, +/-50%
    cached = 2  # 40% of 5, rounded down
    # Anthropic counts the prompt's tokens not read from the cache.
    prompt = 5 - cached if path == "/v1/messages" else 5
    assert (answer.prompt_tokens, answer.cached_prompt_tokens) == (prompt, cached)
    assert (answer.finish_reason, answer.tool_calls) == (whole_reason, False)
    assert answer.first_token_ns is not None
    assert (cut.completion_tokens, cut.finish_reason) == (6, cut_reason)
    assert (refusal.text, refusal.completion_tokens) == (REFUSAL, 8)
    assert (refusal.prompt_tokens, refusal.cached_prompt_tokens) == (5, None)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize("path", list(TOOLS))
async def test_tool_calls_in_each_format(start_mock: Start, path: str, stream: bool) -> None:
    base = await start_mock(MockBehaviour(tool_call_rate=1.0, seed=2))
    kind, raw = await fetch(base, path, request(path, stream, tools=TOOLS[path]))
    summary = assert_any_cut_agrees(kind, raw)
    assert (summary.tool_calls, summary.text) == (True, "")
    if stream:
        # The call is the first token: the stream's second event (after the role chunk, the
        # response's creation, the message's start) announces it.
        events = [e + b"\n\n" for e in raw.split(b"\n\n")[:-1]]
        assert run(kind, events).first_token_ns == len(events[0]) + len(events[1])


async def test_the_openai_sdk_reads_legacy_completions_and_responses(start_mock: Start) -> None:
    base = await start_mock(MockBehaviour(refusal_rate=1.0, seed=1))
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    done = await client.completions.create(model="m", prompt=PROMPT)
    assert done.choices[0].text == REFUSAL
    assert done.usage is not None
    assert done.usage.prompt_tokens == 5
    pieces = [
        c.choices[0].text
        async for c in await client.completions.create(model="m", prompt=PROMPT, stream=True)
        if c.choices
    ]
    assert "".join(pieces) == REFUSAL
    response = await client.responses.create(model="m", input=PROMPT)
    assert response.output_text == REFUSAL
    assert response.usage is not None
    assert response.usage.output_tokens == 8
    events = [e async for e in await client.responses.create(model="m", input=PROMPT, stream=True)]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == REFUSAL
    assert events[-1].type == "response.completed"
    await client.close()


# ------------------------------------------------------------------------------------------------
# Hand-made bodies


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(
        f"event: {e.get('type', 'x')}\ndata: {json.dumps(e)}\n\n".encode() for e in events
    )


def test_a_responses_body_reads_the_message_after_the_reasoning() -> None:
    body = {
        "object": "response",
        "output": [
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "thinking"}]},
            {"type": "message", "content": [{"type": "output_text", "text": "Answer."}]},
        ],
        "usage": {"input_tokens": 3, "output_tokens": 2},
    }
    summary = run(JSON, [json.dumps(body).encode()])
    assert (summary.text, summary.prompt_tokens, summary.completion_tokens) == ("Answer.", 3, 2)


def test_an_anthropic_body_reads_the_text_after_the_thinking() -> None:
    body = {
        "type": "message",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "text", "text": "Answer."},
        ],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 3, "output_tokens": 2},
    }
    summary = run(JSON, [json.dumps(body).encode()])
    assert (summary.text, summary.finish_reason, summary.api_format) == (
        "Answer.",
        "end_turn",
        ApiFormat.API_FORMAT_MESSAGES,
    )


def test_thinking_and_tool_arguments_are_not_the_answers_first_token() -> None:
    thinking = {"type": "content_block_delta", "delta": {"type": "thinking_delta", "thinking": "h"}}
    text = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}}
    raw = sse({"type": "message_start", "message": {"type": "message"}}, thinking)
    summary = run(SSE, [raw, sse(text)])
    assert (summary.first_token_ns, summary.text) == (len(raw) + len(sse(text)), "Hi")
    arguments = {"type": "response.function_call_arguments.delta", "delta": '{"a"'}
    raw = sse({"type": "response.created", "response": {"object": "response"}}, arguments)
    summary = run(SSE, [raw])
    assert (summary.first_token_ns, summary.text, summary.tool_calls) == (None, "", False)


@pytest.mark.parametrize(
    ("event", "api"),
    [
        ({"choices": [{"delta": {"content": "Hi"}}]}, ApiFormat.API_FORMAT_CHAT_COMPLETIONS),
        ({"choices": [{"index": 0, "text": "Hi"}]}, ApiFormat.API_FORMAT_COMPLETIONS),
    ],
)
def test_a_server_naming_no_object_is_known_by_its_choices(
    event: dict[str, Any], api: ApiFormat.ValueType
) -> None:
    raw = b"data: " + json.dumps(event).encode() + b"\n\n"
    summary = run(SSE, [raw])
    assert (summary.api_format, summary.text, summary.first_token_ns) == (api, "Hi", len(raw))


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (SSE, sse({"token": "Hi", "usage": {"prompt_tokens": 3}}, {"token": "!"})),
        (JSON, b'{"object": "list", "data": [], "usage": {"prompt_tokens": 3}}'),
        (JSON, b'{"error": {"message": "I\'m sorry, I can\'t"}}'),
    ],
)
def test_a_body_in_no_known_format_gets_timing_only(content_type: str, body: bytes) -> None:
    summary = run(content_type, [body[:5], body[5:]])
    assert summary.api_format == ApiFormat.API_FORMAT_UNKNOWN
    assert (summary.prompt_tokens, summary.text, summary.tool_calls) == (None, None, False)
    # A JSON body's first byte is its first token whatever it says; a stream's is unknown.
    assert summary.first_token_ns == (None if content_type == SSE else 5)
    assert (summary.malformed, summary.response_bytes) == (False, len(body))


def test_a_stream_naming_no_format_early_is_not_probed_further() -> None:
    """The first MAX_PROBE_BYTES of events decide: the cost of an unknown stream is bounded,
    as inspect.lua's."""
    filler = sse(*[{"n": "x" * 1000}] * 70)
    late = sse({"object": "chat.completion.chunk", "choices": [{"delta": {"content": "Hi"}}]})
    summary = run(SSE, [filler + late])
    assert (summary.api_format, summary.text) == (ApiFormat.API_FORMAT_UNKNOWN, None)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["responses", "messages"]),
    st.lists(st.text(max_size=8), max_size=8),
    st.lists(st.integers(0, 2000), max_size=20),
)
def test_named_event_streams_survive_any_chunking(
    api: str, words: list[str], cuts: list[int]
) -> None:
    if api == "responses":
        events = [{"type": "response.created", "response": {"object": "response", "usage": None}}]
        events += [{"type": "response.output_text.delta", "delta": w} for w in words]
        events += [{"type": "response.completed", "response": {"usage": {"output_tokens": 4}}}]
    else:
        events = [{"type": "message_start", "message": {"usage": {"input_tokens": 3}}}]
        events += [
            {"type": "content_block_delta", "delta": {"type": "text_delta", "text": w}}
            for w in words
        ]
        events += [{"type": "message_delta", "usage": {"output_tokens": 4}}]
    raw = sse(*events)
    bounds = [0, *sorted(c for c in cuts if c < len(raw)), len(raw)]
    summary = run(SSE, [raw[a:b] for a, b in itertools.pairwise(bounds)])
    assert summary.text == "".join(words)
    assert summary.completion_tokens == 4
    assert (summary.first_token_ns is not None) == any(words)
