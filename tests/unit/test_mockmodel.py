"""The mock model server, exercised over real sockets with the official OpenAI client.

Integration tests put this server behind a real Envoy as the upstream, so what matters is that it
speaks the wire protocol real SDKs expect; these tests go through HTTP for that reason rather than
calling handlers directly.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import time
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from extproc.dev import mockmodel
from extproc.dev.mockmodel import REFUSAL, MockBehaviour, add_arguments, behaviour_from_args, serve
from extproc.telemetry.inspect import ResponseInspector
from tests.unit.conftest import Start

pytestmark = pytest.mark.timeout(30)

USER: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Tell me about rollouts please"}
]
TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "search_docs",
            "description": "Search the documentation",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def client(base: str, **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, **kwargs)


async def stats(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with session.get(f"{base}/admin/stats") as resp:
        assert resp.status == 200
        result: dict[str, Any] = await resp.json()
        return result


async def post_chat(
    session: aiohttp.ClientSession, base: str, body: object, path: str = "/v1/chat/completions"
) -> tuple[int, dict[str, Any]]:
    # BytesIO: aiohttp warns (an error here) on large raw-bytes bodies.
    data = io.BytesIO(body if isinstance(body, bytes) else json.dumps(body).encode())
    headers = {"Content-Type": "application/json"}
    async with session.post(f"{base}{path}", data=data, headers=headers) as resp:
        return resp.status, await resp.json()


# ------------------------------------------------------------------------------------------------
# The OpenAI wire protocol


async def test_json_completion_with_openai_client(start_mock: Start) -> None:
    base = await start_mock(MockBehaviour(name="stable-v1", completion_tokens=12, seed=1))
    async with client(base) as api:
        raw = await api.chat.completions.with_raw_response.create(model="anything", messages=USER)
        completion = raw.parse()
    assert raw.headers["x-mock-model"] == "stable-v1"
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "stable-v1"
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    content = choice.message.content
    assert content
    assert content.endswith(".")
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == 5  # a word count of the messages
    assert usage.completion_tokens == len(content.split())
    assert 6 <= usage.completion_tokens <= 18  # uniform +/-50% around 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_stream_with_usage_with_openai_client(start_mock: Start) -> None:
    base = await start_mock(MockBehaviour(name="canary", completion_tokens=10, seed=2))
    async with client(base) as api:
        stream = await api.chat.completions.create(
            model="x", messages=USER, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" and c.model == "canary" for c in chunks)
    first, *tokens, last, usage_chunk = chunks
    assert first.choices[0].delta.role == "assistant"
    assert not first.choices[0].delta.content
    assert all(t.choices[0].delta.content for t in tokens)
    assert all(t.choices[0].finish_reason is None for t in tokens)
    assert last.choices[0].finish_reason == "stop"
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == len(tokens)
    assert usage_chunk.usage.prompt_tokens == 5
    text = "".join(t.choices[0].delta.content or "" for t in tokens)
    assert len(text.split()) == len(tokens)


async def test_stream_without_usage_has_no_usage_chunk(start_mock: Start) -> None:
    base = await start_mock(MockBehaviour(completion_tokens=4))
    async with client(base) as api:
        stream = await api.chat.completions.create(model="x", messages=USER, stream=True)
        chunks = [chunk async for chunk in stream]
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_stream_and_json_agree_on_words(start_mock: Start) -> None:
    """Same prompt, same words: what lets a shadow comparison see only what settings change."""
    base = await start_mock(MockBehaviour(completion_tokens=30, seed=3))
    other = await start_mock(MockBehaviour(name="other", completion_tokens=30, seed=4))
    async with client(base) as api, client(other) as api2:
        completion = await api.chat.completions.create(model="x", messages=USER)
        stream = await api2.chat.completions.create(model="x", messages=USER, stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    json_text = completion.choices[0].message.content or ""
    shorter, longer = sorted([json_text.rstrip("."), streamed.rstrip(".")], key=len)
    assert longer.startswith(shorter)


async def test_max_tokens_gives_length(start_mock: Start) -> None:
    base = await start_mock(MockBehaviour(completion_tokens=50))
    async with client(base) as api:
        completion = await api.chat.completions.create(model="x", messages=USER, max_tokens=3)
        stream = await api.chat.completions.create(
            model="x",
            messages=USER,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3
    assert len((completion.choices[0].message.content or "").split()) == 3
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


async def test_max_completion_tokens_is_honoured(
    start_mock: Start, session: aiohttp.ClientSession
) -> None:
    base = await start_mock(MockBehaviour(completion_tokens=50))
    status, body = await post_chat(session, base, {"messages": USER, "max_completion_tokens": 2})
    assert status == 200
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


async def test_error_rate_one_gives_openai_500(start_mock: Start) -> None:
    base = await start_mock(MockBehaviour(error_rate=1.0))
    async with client(base) as api:
        with pytest.raises(openai.InternalServerError) as json_error:
            await api.chat.completions.create(model="x", messages=USER)
        with pytest.raises(openai.InternalServerError) as stream_error:
            await api.chat.completions.create(model="x", messages=USER, stream=True)
    for error in (json_error.value, stream_error.value):
        assert error.status_code == 500
        assert error.response.headers["x-mock-model"] == "mock-model"
        body = error.body
        assert isinstance(body, dict)
        assert body["type"] == "server_error"
        assert body["message"]


async def test_refusal_rate_one_gives_refusals(start_mock: Start) -> None:
    base = await start_mock(MockBehaviour(refusal_rate=1.0, completion_tokens=100))
    async with client(base) as api:
        completion = await api.chat.completions.create(model="x", messages=USER)
        stream = await api.chat.completions.create(model="x", messages=USER, stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert completion.choices[0].message.content == REFUSAL
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(REFUSAL.split())
    assert streamed == REFUSAL


async def test_tool_call_rate_one_calls_an_offered_tool(start_mock: Start) -> None:
    """A request that offers tools gets a call of one of them, as OpenAI sends it: no text, the
    call's JSON arguments, ``finish_reason: tool_calls``, streamed in fragments too."""
    base = await start_mock(MockBehaviour(tool_call_rate=1.0, completion_tokens=50))
    async with client(base) as api:
        completion = await api.chat.completions.create(model="x", messages=USER, tools=TOOLS)
        stream = await api.chat.completions.create(
            model="x",
            messages=USER,
            tools=TOOLS,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "search_docs"
    assert json.loads(call.function.arguments) == {"query": "Tell me about rollouts please"}
    assert completion.usage is not None
    assert completion.usage.completion_tokens >= 1

    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.content for d in deltas)
    fragments = [tc for d in deltas for tc in d.tool_calls or []]
    assert len(fragments) > 1  # streamed in pieces, as real servers do
    assert {f.index for f in fragments} == {0}
    assert fragments[0].id is not None
    assert fragments[0].id.startswith("call_")
    assert fragments[0].function is not None
    assert fragments[0].function.name == "search_docs"
    assert all(f.id is None for f in fragments[1:])
    arguments = "".join(f.function.arguments or "" for f in fragments if f.function)
    assert arguments == call.function.arguments  # deterministic in the prompt
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(fragments)


async def test_tool_calls_need_tools_offered_and_allowed(
    start_mock: Start, session: aiohttp.ClientSession
) -> None:
    """No tools, or tool_choice none: a text answer at any rate, as a real model gives."""
    base = await start_mock(MockBehaviour(tool_call_rate=1.0))
    for body in (
        {"messages": USER},
        {"messages": USER, "tools": []},
        {"messages": USER, "tools": TOOLS, "tool_choice": "none"},
    ):
        status, answer = await post_chat(session, base, body)
        assert status == 200
        choice = answer["choices"][0]
        assert (choice["finish_reason"], "tool_calls" in choice["message"]) == ("stop", False)
        assert choice["message"]["content"]
    assert (await stats(session, base))["outcomes"] == {"ok": 3}


async def test_tool_call_rate_mixes_calls_and_text(
    start_mock: Start, session: aiohttp.ClientSession
) -> None:
    """A rate between 0 and 1 mixes both answers; the admin endpoint changes it at run time."""
    base = await start_mock(MockBehaviour(seed=7))
    body = {"messages": USER, "tools": TOOLS}
    status, answer = await post_chat(session, base, body)
    assert (status, answer["choices"][0]["finish_reason"]) == (200, "stop")
    async with session.post(f"{base}/admin/behaviour", json={"tool_call_rate": 0.5}) as resp:
        assert resp.status == 200
        assert (await resp.json())["tool_call_rate"] == 0.5
    reasons = []
    for _ in range(40):
        status, answer = await post_chat(session, base, body)
        assert status == 200
        reasons.append(answer["choices"][0]["finish_reason"])
    assert set(reasons) == {"stop", "tool_calls"}
    outcomes = (await stats(session, base))["outcomes"]
    assert outcomes == {"ok": 1 + reasons.count("stop"), "tool_call": reasons.count("tool_calls")}


async def test_sidecar_inspector_sees_the_tool_calls(
    start_mock: Start, session: aiohttp.ClientSession
) -> None:
    """What the mock sends is what the observer counts as a tool call (``tool_call_rate``
    guardrails depend on it): streamed and whole; a text answer is no call."""
    base = await start_mock(MockBehaviour(tool_call_rate=1.0))
    seen = []
    for body in (
        {"messages": USER, "tools": TOOLS},
        {"messages": USER, "tools": TOOLS, "stream": True},
        {"messages": USER, "tools": TOOLS, "stream": True, "tool_choice": "none"},
    ):
        async with session.post(f"{base}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            inspector = ResponseInspector(resp.headers["Content-Type"])
            inspector.feed(await resp.read(), 0)
        summary = inspector.finish()
        assert not summary.malformed
        seen.append((summary.tool_calls, summary.finish_reason))
    assert seen == [(True, "tool_calls"), (True, "tool_calls"), (False, "stop")]


async def test_json_response_format_gives_json(start_mock: Start) -> None:
    base = await start_mock(MockBehaviour(completion_tokens=8))
    async with client(base) as api:
        completion = await api.chat.completions.create(
            model="x", messages=USER, response_format={"type": "json_object"}
        )
    answer = json.loads(completion.choices[0].message.content or "")
    assert isinstance(answer["answer"], str)
    assert answer["answer"]


async def test_verbosity_scales_length(start_mock: Start, session: aiohttp.ClientSession) -> None:
    base = await start_mock(MockBehaviour(completion_tokens=20, verbosity=3.0, seed=5))
    lengths = []
    for _ in range(20):
        status, body = await post_chat(session, base, {"messages": USER})
        assert status == 200
        lengths.append(body["usage"]["completion_tokens"])
    assert all(30 <= n <= 90 for n in lengths)
    assert len(set(lengths)) > 1  # an answer length varies, or the evaluator sees no variance


async def test_prompt_tokens_count_words_of_all_messages(
    start_mock: Start, session: aiohttp.ClientSession
) -> None:
    base = await start_mock(MockBehaviour())
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "one two three"}]},
        {"role": "assistant", "content": None},
    ]
    status, body = await post_chat(session, base, {"model": "m", "messages": messages})
    assert status == 200
    assert body["usage"]["prompt_tokens"] == 5


async def test_models_and_healthz(start_mock: Start, session: aiohttp.ClientSession) -> None:
    base = await start_mock(MockBehaviour(name="variant-b"))
    async with session.get(f"{base}/healthz") as resp:
        assert resp.status == 200
        assert await resp.text() == "ok"
    async with client(base) as api:
        models = await api.models.list()
    assert [m.id for m in models.data] == ["variant-b"]


# ------------------------------------------------------------------------------------------------
# Bad requests are OpenAI-style errors, never tracebacks


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"", None),
        (b"[" * 100_000, None),
        ([], None),
        ({"model": "x"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": USER, "model": 3}, "model"),
        ({"messages": USER, "stream": "yes"}, "stream"),
        ({"messages": USER, "stream_options": {"include_usage": 1}}, "stream_options"),
        ({"messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"messages": USER, "max_tokens": True}, "max_tokens"),
        ({"messages": USER, "response_format": {"type": "xml"}}, "response_format"),
        ({"messages": USER, "tools": "search"}, "tools"),
        ({"messages": USER, "tools": ["search"]}, "tools[0]"),
    ],
)
async def test_malformed_requests_get_400(
    start_mock: Start, session: aiohttp.ClientSession, body: object, param: str | None
) -> None:
    base = await start_mock(MockBehaviour())
    status, error = await post_chat(session, base, body)
    assert status == 400
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"]
    assert error["error"]["param"] == param
    assert (await stats(session, base))["outcomes"] == {"bad_request": 1}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": "x"}, "prompt"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": [1, 2]}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("/v1/responses", {"model": "x"}, "input"),
        ("/v1/responses", {"input": 3}, "input"),
        ("/v1/responses", {"input": [{"content": "hi"}]}, "input[0].role"),
        ("/v1/responses", {"input": "hi", "instructions": 3}, "instructions"),
        ("/v1/responses", {"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ("/v1/responses", {"input": "hi", "text": {"format": {"type": "xml"}}}, "text.format"),
        ("/v1/messages", {"model": "x"}, "messages"),
        ("/v1/messages", {"messages": USER, "system": ["be brief"]}, "system"),
        ("/v1/messages", {"messages": USER, "tools": "search"}, "tools"),
    ],
)
async def test_malformed_requests_of_each_api_get_400(
    start_mock: Start, session: aiohttp.ClientSession, path: str, body: object, param: str
) -> None:
    """Each API's own fields are checked, each problem named by its path."""
    base = await start_mock(MockBehaviour())
    status, error = await post_chat(session, base, body, path)
    assert (status, error["error"]["param"]) == (400, param)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/responses", "/v1/messages"])
async def test_errors_and_latency_in_each_api(
    start_mock: Start, session: aiohttp.ClientSession, path: str
) -> None:
    """The knobs the stand-in's telemetry tests do not read from the answer itself."""
    body = {"prompt": "hi", "input": "hi", "messages": USER}
    failing = await start_mock(MockBehaviour(error_rate=1.0))
    assert (await post_chat(session, failing, body, path))[0] == 500
    slow = await start_mock(MockBehaviour(latency_ms=50))
    started = time.monotonic()
    status, _ = await post_chat(session, slow, body, path)
    assert status == 200
    assert time.monotonic() - started >= 0.05


async def test_missing_messages_through_openai_client(start_mock: Start) -> None:
    base = await start_mock(MockBehaviour())
    async with client(base) as api:
        with pytest.raises(openai.BadRequestError) as error:
            await api.chat.completions.create(model="x", messages=[])
    assert error.value.status_code == 400


async def test_unknown_routes_and_methods_are_json(
    start_mock: Start, session: aiohttp.ClientSession
) -> None:
    base = await start_mock(MockBehaviour())
    async with session.get(f"{base}/v1/nope") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
    async with session.get(f"{base}/v1/chat/completions") as resp:
        assert resp.status == 405
        assert (await resp.json())["error"]["message"]


async def test_oversized_request_is_413_json(
    start_mock: Start, session: aiohttp.ClientSession
) -> None:
    base = await start_mock(MockBehaviour())
    status, error = await post_chat(session, base, b"x" * (mockmodel.MAX_REQUEST_BYTES + 1))
    assert status == 413
    assert error["error"]["type"] == "invalid_request_error"


# ------------------------------------------------------------------------------------------------
# Behaviour at run time, counters


async def test_runtime_behaviour_change_takes_effect(
    start_mock: Start, session: aiohttp.ClientSession
) -> None:
    base = await start_mock(MockBehaviour(name="before"))
    status, body = await post_chat(session, base, {"messages": USER})
    assert (status, body["model"]) == (200, "before")

    async with session.post(
        f"{base}/admin/behaviour", json={"name": "after", "refusal_rate": 1}
    ) as resp:
        assert resp.status == 200
        changed = await resp.json()
    assert changed["name"] == "after"
    assert changed["refusal_rate"] == 1.0
    async with session.get(f"{base}/admin/behaviour") as resp:
        assert await resp.json() == changed

    async with session.post(f"{base}/v1/chat/completions", json={"messages": USER}) as resp:
        assert resp.headers["x-mock-model"] == "after"
        body = await resp.json()
    assert body["model"] == "after"
    assert body["choices"][0]["message"]["content"] == REFUSAL

    async with session.post(f"{base}/admin/behaviour", json={"error_rate": 1}) as resp:
        assert resp.status == 200
    status, body = await post_chat(session, base, {"messages": USER})
    assert status == 500


@pytest.mark.parametrize(
    "change",
    [
        b"not json",
        b"[1, 2]",
        b'{"no_such_knob": 1}',
        b'{"error_rate": 2}',
        b'{"latency_ms": -1}',
        b'{"latency_ms": "slow"}',
        b'{"completion_tokens": 1.5}',
        b'{"name": ""}',
        b'{"name": "bad\\r\\nheader"}',
        b'{"seed": true}',
    ],
)
async def test_bad_behaviour_change_is_rejected_and_ignored(
    start_mock: Start, session: aiohttp.ClientSession, change: bytes
) -> None:
    base = await start_mock(MockBehaviour(name="kept"))
    async with session.post(f"{base}/admin/behaviour", data=change) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["message"]
    async with session.get(f"{base}/admin/behaviour") as resp:
        assert await resp.json() == MockBehaviour(name="kept").as_dict()


async def test_stats_count_outcomes_and_reset(
    start_mock: Start, session: aiohttp.ClientSession
) -> None:
    base = await start_mock(MockBehaviour(name="counted"))
    await post_chat(session, base, {"messages": USER})
    await post_chat(session, base, {"messages": USER, "stream": False})
    await post_chat(session, base, {"nope": 1})
    async with session.post(f"{base}/admin/behaviour", json={"refusal_rate": 1}) as resp:
        assert resp.status == 200
    async with session.post(
        f"{base}/v1/chat/completions", json={"messages": USER, "stream": True}
    ) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        await resp.read()
    async with session.post(f"{base}/admin/behaviour", json={"error_rate": 1}) as resp:
        assert resp.status == 200
    await post_chat(session, base, {"messages": USER})

    counts = await stats(session, base)
    assert counts["model"] == "counted"
    assert counts["requests"] == 5
    assert counts["streamed"] == 1
    assert counts["in_flight"] == 0
    assert counts["outcomes"] == {"ok": 2, "bad_request": 1, "refusal": 1, "error": 1}

    async with session.delete(f"{base}/admin/stats") as resp:
        assert resp.status == 200
    counts = await stats(session, base)
    assert counts["requests"] == 0
    assert counts["outcomes"] == {}


async def test_hang_never_answers(start_mock: Start, session: aiohttp.ClientSession) -> None:
    base = await start_mock(MockBehaviour(hang_rate=1.0))
    async with client(base, timeout=0.5) as api:
        with pytest.raises(openai.APITimeoutError):
            await api.chat.completions.create(model="x", messages=USER)
    counts = await stats(session, base)
    assert counts["outcomes"] == {"hang": 1}


async def test_shutdown_ends_a_hanging_request() -> None:
    """A hanging request must not hold the server's shutdown for its full grace period."""
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve("127.0.0.1", 0, MockBehaviour(hang_rate=1), ready.set_result))
    port = await ready
    async with aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{port}"

        async def ask() -> int:
            async with session.post(f"{base}/v1/chat/completions", json={"messages": USER}) as resp:
                return resp.status

        pending = asyncio.create_task(ask())
        # Poll the server's own counter (each poll is a round trip; the test timeout bounds it).
        while (await stats(session, base))["outcomes"].get("hang") != 1:
            pass
        task.cancel()
        with suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=1.5)  # below the runner's 2 s grace period
        assert await pending == 503


async def test_client_disconnect_mid_stream(start_mock: Start) -> None:
    base = await start_mock(MockBehaviour(completion_tokens=200, tokens_per_s=200))
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{base}/v1/chat/completions", json={"messages": USER, "stream": True}
        ) as resp:
            await resp.content.readline()
            resp.close()
        # Poll the server's own counter (each poll is a round trip; the test timeout bounds it).
        while (await stats(session, base))["in_flight"]:
            pass
        counts = await stats(session, base)
        assert counts["outcomes"] == {"disconnected": 1}
        status, _ = await post_chat(session, base, {"messages": USER})
        assert status == 200


# ------------------------------------------------------------------------------------------------
# Timing knobs


async def test_latency_delays_json_response(start_mock: Start) -> None:
    base = await start_mock(MockBehaviour(latency_ms=150, latency_jitter_ms=20))
    loop = asyncio.get_running_loop()
    async with client(base) as api:
        started = loop.time()
        await api.chat.completions.create(model="x", messages=USER)
        assert loop.time() - started >= 0.13


async def test_tail_latency(start_mock: Start) -> None:
    base = await start_mock(MockBehaviour(tail_ms=150, tail_rate=1.0))
    loop = asyncio.get_running_loop()
    async with client(base) as api:
        started = loop.time()
        await api.chat.completions.create(model="x", messages=USER)
        assert loop.time() - started >= 0.15


async def test_stream_headers_come_at_once(
    start_mock: Start, session: aiohttp.ClientSession
) -> None:
    """Time to first byte is not time to first token: headers must not wait for the token.

    A first token 30 s away makes this independent of machine load: the headers are here and
    the body is still empty."""
    base = await start_mock(MockBehaviour(ttft_ms=30_000))
    async with session.post(
        f"{base}/v1/chat/completions", json={"messages": USER, "stream": True}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.content.total_bytes == 0
        resp.close()  # hang up; the server cancels the waiting handler


async def test_stream_timing_lower_bounds(start_mock: Start) -> None:
    """Only lower bounds: a loaded machine can make things slower, never faster."""
    base = await start_mock(
        MockBehaviour(latency_ms=50, ttft_ms=100, tokens_per_s=100, completion_tokens=10, seed=1)
    )
    loop = asyncio.get_running_loop()
    arrivals = []
    async with aiohttp.ClientSession() as session:
        started = loop.time()
        async with session.post(
            f"{base}/v1/chat/completions", json={"messages": USER, "stream": True}
        ) as resp:
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    if delta.get("content"):
                        arrivals.append(loop.time())
    assert len(arrivals) >= 5
    assert arrivals[0] - started >= 0.15  # latency + ttft
    # 100 tokens/s: the last token no earlier than (n - 1) / 100 s after the first was sent.
    assert arrivals[-1] - started >= 0.15 + (len(arrivals) - 1) / 100


async def test_fast_mode_never_sleeps(
    start_mock: Start, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[float] = []
    real_sleep = asyncio.sleep

    async def spy(delay: float) -> None:
        calls.append(delay)
        await real_sleep(delay)

    monkeypatch.setattr(mockmodel, "_sleep", spy)
    behaviour = MockBehaviour()
    assert behaviour.fast
    base = await start_mock(behaviour)
    await post_chat(session, base, {"messages": USER})
    async with session.post(
        f"{base}/v1/chat/completions", json={"messages": USER, "stream": True}
    ) as resp:
        await resp.read()
    assert calls == []

    async with session.post(f"{base}/admin/behaviour", json={"tokens_per_s": 10_000}) as resp:
        assert not MockBehaviour(**await resp.json()).fast
    async with session.post(
        f"{base}/v1/chat/completions", json={"messages": USER, "stream": True}
    ) as resp:
        await resp.read()
    assert calls  # the spy is wired: a rate does sleep


async def test_a_cold_start_slows_only_the_first_requests(
    start_mock: Start, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cold_requests``: the first N requests wait ``cold_ms`` more (a model that just loaded),
    the later ones not; a stats reset makes the server cold again."""
    calls: list[float] = []

    async def spy(delay: float) -> None:
        calls.append(delay)

    monkeypatch.setattr(mockmodel, "_sleep", spy)
    base = await start_mock(MockBehaviour(cold_requests=2, cold_ms=500))
    for _ in range(4):
        await post_chat(session, base, {"messages": USER})
    assert calls == [0.5, 0.5]
    async with session.delete(f"{base}/admin/stats") as resp:
        assert resp.status == 200
    await post_chat(session, base, {"messages": USER})
    assert calls == [0.5, 0.5, 0.5]


async def test_seed_makes_runs_reproducible(
    start_mock: Start, session: aiohttp.ClientSession
) -> None:
    behaviour = MockBehaviour(error_rate=0.3, refusal_rate=0.3, completion_tokens=20, seed=42)
    runs = []
    for _ in range(2):
        base = await start_mock(behaviour)
        run = []
        for _ in range(15):
            status, body = await post_chat(session, base, {"messages": USER})
            run.append((status, body["choices"][0]["message"]["content"] if status == 200 else ""))
        runs.append(run)
    assert runs[0] == runs[1]
    assert {status for status, _ in runs[0]} == {200, 500}


async def test_reseeding_at_run_time(start_mock: Start, session: aiohttp.ClientSession) -> None:
    base = await start_mock(MockBehaviour(completion_tokens=50, seed=9))

    async def lengths() -> list[int]:
        out = []
        for _ in range(5):
            _, body = await post_chat(session, base, {"messages": USER})
            out.append(body["usage"]["completion_tokens"])
        return out

    first = await lengths()
    async with session.post(f"{base}/admin/behaviour", json={"seed": 9}) as resp:
        assert resp.status == 200
    assert await lengths() == first


# ------------------------------------------------------------------------------------------------
# Configuration


def test_cli_flags_map_to_behaviour() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args(
        [
            "--port",
            "0",
            "--name",
            "canary",
            "--latency-ms",
            "12.5",
            "--latency-jitter-ms",
            "2",
            "--tail-ms",
            "300",
            "--tail-rate",
            "0.01",
            "--ttft-ms",
            "40",
            "--tokens-per-s",
            "50",
            "--completion-tokens",
            "64",
            "--verbosity",
            "1.5",
            "--error-rate",
            "0.02",
            "--refusal-rate",
            "0.1",
            "--hang-rate",
            "0.001",
            "--tool-call-rate",
            "0.3",
            "--seed",
            "7",
        ]
    )
    assert (ns.host, ns.port) == ("127.0.0.1", 0)
    assert behaviour_from_args(ns) == MockBehaviour(
        name="canary",
        latency_ms=12.5,
        latency_jitter_ms=2,
        tail_ms=300,
        tail_rate=0.01,
        ttft_ms=40,
        tokens_per_s=50,
        completion_tokens=64,
        verbosity=1.5,
        error_rate=0.02,
        refusal_rate=0.1,
        hang_rate=0.001,
        tool_call_rate=0.3,
        seed=7,
    )


def test_cli_defaults_and_fast() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert behaviour_from_args(parser.parse_args([])) == MockBehaviour()
    argv = ["--latency-ms", "80", "--latency-jitter-ms", "5", "--tokens-per-s", "9", "--fast"]
    fast = behaviour_from_args(parser.parse_args(argv))
    assert fast.fast
    assert (fast.latency_ms, fast.latency_jitter_ms, fast.tokens_per_s) == (0, 0, 0)
    assert behaviour_from_args(parser.parse_args(argv[:-1])) == MockBehaviour(
        latency_ms=80, latency_jitter_ms=5, tokens_per_s=9
    )
    # Jitter alone can make a delay: not fast.
    assert not MockBehaviour(latency_jitter_ms=1).fast


@pytest.mark.parametrize(
    "argv", [["--error-rate", "1.5"], ["--latency-ms", "-3"], ["--completion-tokens", "x"]]
)
def test_cli_rejects_bad_values(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(argv)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": ""},
        {"name": "tab\there"},
        {"error_rate": 1.01},
        {"tail_rate": -0.1},
        {"tool_call_rate": 1.5},
        {"latency_ms": float("nan")},
        {"tokens_per_s": float("inf")},
        {"completion_tokens": -1},
        {"verbosity": True},
        {"seed": 1.5},
    ],
)
def test_behaviour_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs)).split("_")[0]):
        MockBehaviour(**kwargs)


def test_behaviour_is_frozen_and_floats_are_floats() -> None:
    behaviour = MockBehaviour(latency_ms=5)
    assert isinstance(behaviour.latency_ms, float)
    with pytest.raises(AttributeError):
        behaviour.latency_ms = 1.0  # type: ignore[misc]
