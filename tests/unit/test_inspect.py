"""The response inspector: tables for the rules, properties for chunking, and real mock output.

The properties carry most of the weight: Envoy cuts a body wherever the network did, so the same
bytes cut anywhere must give the same summary; the only field allowed to differ is
``first_token_ns``, and it must be the time of the chunk holding the byte that completed the first
token event.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Iterable, Sequence
from typing import Any
from unittest import mock

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.dev.mockmodel import MockBehaviour
from extproc.telemetry import inspect as inspect_mod
from extproc.telemetry.inspect import ResponseInspector, ResponseSummary
from extproc.telemetry.v1.event_pb2 import ApiFormat
from tests.unit.conftest import Start

CHAT = ApiFormat.API_FORMAT_CHAT_COMPLETIONS
SSE = "text/event-stream"
JSON = "application/json"


def run(content_type: str, chunks: Iterable[bytes], capture: int = 0) -> ResponseSummary:
    """Feed chunks with ``now_ns`` = the byte offset where each chunk ends."""
    inspector = ResponseInspector(content_type, capture)
    end = 0
    for chunk in chunks:
        end += len(chunk)
        inspector.feed(chunk, end)
    return inspector.finish()


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def assert_split_invariant(
    content_type: str, data: bytes, cuts: Sequence[int], capture: int
) -> ResponseSummary:
    """Byte-at-a-time feeding pins the byte that completes the first token; any other cut must
    agree on everything and report the end of the chunk that holds that byte."""
    reference = run(content_type, [data[i : i + 1] for i in range(len(data))], capture)
    assert run(content_type, [data], capture) == dataclasses.replace(
        reference, first_token_ns=None if reference.first_token_ns is None else len(data)
    )
    chunks = split(data, cuts)
    got = run(content_type, chunks, capture)
    expected_first = None
    if reference.first_token_ns is not None:
        ends, end = [], 0
        for chunk in chunks:
            end += len(chunk)
            ends.append(end)
        expected_first = min(e for e in ends if e >= reference.first_token_ns)
    assert got == dataclasses.replace(reference, first_token_ns=expected_first)
    return reference


def data_event(payload: object, eol: str = "\n") -> bytes:
    return f"data: {json.dumps(payload)}{eol}{eol}".encode()


def chunk(
    content: str | None = None,
    *,
    role: str | None = None,
    finish: str | None = None,
    usage: dict[str, Any] | None = None,
    null_usage: bool = False,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    event: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        event["choices"] = []
        event["usage"] = usage
    elif null_usage:
        event["usage"] = None
    return event


USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def openai_stream(*contents: str, eol: str = "\n", done: bool = True) -> bytes:
    events = [chunk("", role="assistant", null_usage=True)]
    events += [chunk(c, null_usage=True) for c in contents]
    events += [chunk(finish="stop", null_usage=True), chunk(usage=USAGE)]
    body = b"".join(data_event(e, eol) for e in events)
    return body + (f"data: [DONE]{eol}{eol}".encode() if done else b"")


# ------------------------------------------------------------------------------------------------
# SSE rules


def test_first_token_is_the_first_content_not_the_role_chunk() -> None:
    role = data_event(chunk("", role="assistant"))
    token = data_event(chunk("Hi"))
    inspector = ResponseInspector(SSE)
    inspector.feed(role, 100)
    inspector.feed(token[:10], 200)
    inspector.feed(token[10:], 300)
    inspector.feed(data_event(chunk(" there")), 400)
    summary = inspector.finish()
    assert summary.first_token_ns == 300
    assert summary.streamed
    assert summary.event_count == 3
    assert summary.text is None  # capture is off by default


def test_tool_call_delta_is_a_first_token() -> None:
    call = [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f"}}]
    inspector = ResponseInspector(SSE)
    inspector.feed(data_event(chunk(None, role="assistant")), 1)
    inspector.feed(data_event(chunk(None, tool_calls=call)), 2)
    inspector.feed(data_event(chunk(finish="tool_calls")), 3)
    summary = inspector.finish()
    assert (summary.first_token_ns, summary.finish_reason) == (2, "tool_calls")


def test_refusal_delta_is_a_first_token_and_text() -> None:
    event = {"choices": [{"index": 0, "delta": {"refusal": "No."}, "finish_reason": None}]}
    summary = run(SSE, [data_event(event)], capture=100)
    assert (summary.first_token_ns, summary.text) == (len(data_event(event)), "No.")


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"])
def test_line_endings(eol: str) -> None:
    body = openai_stream("Hello", ",", " world", eol=eol)
    summary = run(SSE, [body], capture=100)
    assert summary == ResponseSummary(
        streamed=True,
        first_token_ns=len(body),
        prompt_tokens=7,
        completion_tokens=3,
        response_bytes=len(body),
        finish_reason="stop",
        event_count=7,
        malformed=False,
        text="Hello, world",
        api_format=CHAT,
    )


def test_comments_other_fields_and_multiline_data() -> None:
    body = (
        b": keep-alive\n\n"
        b"event: message\nid: 1\nretry: 10\n: note\n"
        b'data: {"choices": [{"index": 0,\n'
        b'data:"delta": {"content": "a\\nb"}}]}\n\n'
        b'datum: {"usage": {"prompt_tokens": 1}}\n\n'
    )
    summary = run(SSE, [body], capture=10)
    assert summary.text == "a\nb"
    assert summary.event_count == 1  # the comment-only block and the "datum" block carry no data
    assert summary.prompt_tokens is None
    assert not summary.malformed


def test_done_ends_the_stream() -> None:
    after = data_event(chunk("late")) + data_event({"usage": {"prompt_tokens": 99}})
    body = openai_stream("x") + after
    summary = run(SSE, [body], capture=10)
    assert (summary.text, summary.prompt_tokens, summary.response_bytes) == ("x", 7, len(body))


def test_usage_comes_from_the_last_event_carrying_it() -> None:
    body = (
        data_event(chunk("a", null_usage=True))
        + data_event({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
        + data_event(chunk("b", null_usage=True))
        + data_event({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 5}})
        + data_event(chunk(finish="length", null_usage=True))
    )
    summary = run(SSE, [body])
    assert (summary.prompt_tokens, summary.completion_tokens) == (2, 5)
    assert summary.finish_reason == "length"


def test_bad_token_counts_are_unknown() -> None:
    body = data_event({"usage": {"prompt_tokens": -1, "completion_tokens": True}})
    summary = run(SSE, [body])
    assert (summary.prompt_tokens, summary.completion_tokens) == (None, None)


def test_incomplete_last_event_is_not_dispatched() -> None:
    body = openai_stream("x", done=False) + b'data: {"choices":[],"usage":{"prompt_tokens":9}}\n'
    summary = run(SSE, [body])
    assert summary.prompt_tokens == 7


@pytest.mark.parametrize(
    "bad",
    [
        b'data: {"content": not json',
        b"data: hello",
        b"data: [1, 2]",
        b"data: " + b"[" * 5000,
        b'data: {"content": ' + b"[" * 100_000,  # deep enough for a RecursionError
        b'data: {"choices": [{"delta": {"content": "\xff"}}]}',  # not UTF-8
    ],
)
def test_malformed_data_is_flagged_and_parsing_goes_on(bad: bytes) -> None:
    body = data_event(chunk("", role="assistant")) + bad + b"\n\n" + openai_stream("ok")
    summary = run(SSE, [body], capture=10)
    assert summary.malformed
    assert (summary.text, summary.prompt_tokens, summary.finish_reason) == ("ok", 7, "stop")


def test_undecoded_events_are_only_shape_checked() -> None:
    """The price of not decoding every token event: broken JSON that looks like an object and
    names no field we need passes unnoticed (once the first event named the format: until then
    every event is decoded); data that is not an object at all does not."""
    role = data_event(chunk("", role="assistant"))
    assert not run(SSE, [role + b"data: {not json\n\n" + openai_stream("x")]).malformed
    assert run(SSE, [b"data: {not json\n\n" + openai_stream("x")]).malformed
    assert run(SSE, [openai_stream("x") + b"data: nope\n\n"]).malformed is False  # after [DONE]
    assert run(SSE, [openai_stream("x", done=False) + b"data: nope\n\n"]).malformed


def test_bom_is_skipped_even_when_split() -> None:
    body = b"\xef\xbb\xbf" + openai_stream("x")
    for cut in range(1, 4):
        summary = run(SSE, [body[:cut], body[cut:]], capture=10)
        assert (summary.text, summary.malformed, summary.prompt_tokens) == ("x", False, 7)


@pytest.mark.parametrize("size", [3, 4096, 65536, 1 << 21])
def test_oversized_event_is_dropped(size: int) -> None:
    huge = data_event(chunk("x" * (1 << 20)))
    body = data_event(chunk("first")) + huge + openai_stream("after")
    chunks = [body[i : i + size] for i in range(0, len(body), size)]
    summary = run(SSE, chunks, capture=100)
    assert summary.malformed
    assert summary.text == "firstafter"
    assert (summary.prompt_tokens, summary.completion_tokens) == (7, 3)
    assert summary.event_count == 6  # first + 5 of openai_stream; the dropped one is not counted


def test_oversized_event_of_many_lines_is_dropped() -> None:
    line = b"data: " + b"x" * 1000 + b"\n"
    body = line * 1100 + b"\n" + openai_stream("after")
    summary = run(SSE, [body], capture=100)
    assert summary.malformed
    assert summary.text == "after"


def test_long_comment_is_ignored_not_malformed() -> None:
    body = b": " + b"c" * (2 << 20) + b"\n" + openai_stream("x")
    summary = run(SSE, [body[i : i + 65536] for i in range(0, len(body), 65536)], capture=9)
    assert (summary.malformed, summary.text) == (False, "x")


def test_capture_is_truncated_to_whole_utf8_characters() -> None:
    body = openai_stream("h\u00e9llo", " w\u00f6rld")  # é and ö are 2 bytes each
    assert run(SSE, [body], capture=5).text == "h\u00e9ll"
    assert run(SSE, [body], capture=2).text == "h"
    assert run(SSE, [body], capture=1000).text == "h\u00e9llo w\u00f6rld"
    assert run(SSE, [body], capture=0).text is None


def test_content_type_parameters_and_case() -> None:
    assert run("Text/Event-Stream; charset=utf-8", [openai_stream("x")]).streamed
    assert not run("application/json; charset=utf-8", [b"{}"]).streamed


def test_finish_is_idempotent_and_later_feeds_are_ignored() -> None:
    inspector = ResponseInspector(SSE)
    inspector.feed(openai_stream("x"), 5)
    first = inspector.finish()
    inspector.feed(data_event(chunk("more")), 6)
    assert inspector.finish() is first


def test_only_events_that_can_matter_are_decoded() -> None:
    body = openai_stream(*[f" w{i}" for i in range(100)])
    calls: list[int] = []
    real = inspect_mod._loads

    def counting(data: bytes | bytearray | str) -> Any:
        calls.append(len(data))
        return real(data)

    with mock.patch.object(inspect_mod, "_loads", counting):
        summary = run(SSE, [body])
        # role chunk (empty content), first token, finish_reason, usage
        assert len(calls) == 4
        assert summary.completion_tokens == 3
        calls.clear()
        run(SSE, [body], capture=1 << 20)
        assert len(calls) == 103  # capturing needs every delta


@pytest.mark.timeout(30)
def test_a_long_line_fed_byte_by_byte_is_linear() -> None:
    """Re-scanning the buffer on every chunk would make this quadratic (minutes, not a second)."""
    body = data_event(chunk("y" * 300_000))
    inspector = ResponseInspector(SSE, 10)
    for i in range(len(body)):
        inspector.feed(body[i : i + 1], i)
    assert inspector.finish().text == "y" * 10


# ------------------------------------------------------------------------------------------------
# Non-streamed bodies


def completion(content: str | None = "Hello there", finish: str = "stop") -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish,
                }
            ],
            "usage": USAGE,
        }
    ).encode()


def test_json_body() -> None:
    body = completion()
    inspector = ResponseInspector(JSON, max_capture_bytes=5)
    inspector.feed(b"", 10)
    inspector.feed(body[:3], 20)
    inspector.feed(body[3:], 30)
    assert inspector.finish() == ResponseSummary(
        streamed=False,
        first_token_ns=20,
        prompt_tokens=7,
        completion_tokens=3,
        response_bytes=len(body),
        finish_reason="stop",
        event_count=0,
        malformed=False,
        text="Hello",
        api_format=CHAT,
    )


@pytest.mark.parametrize(
    ("content_type", "body", "malformed"),
    [
        (JSON, b'{"choices": [', True),
        (JSON, b"[1]", True),
        (JSON, b"\xff\xfe garbage", True),
        ("text/plain", b"upstream connect error or disconnect/reset before headers", False),
        ("text/html", b"<html>502</html>", False),
        ("", b'{"object": "chat.completion", "usage": {"prompt_tokens": 4}}', False),
    ],
)
def test_json_body_problems(content_type: str, body: bytes, malformed: bool) -> None:
    summary = run(content_type, [body], capture=100)
    assert summary.malformed is malformed
    assert summary.first_token_ns == len(body)
    assert summary.completion_tokens is None
    assert summary.prompt_tokens == (4 if content_type == "" else None)


def test_error_body_has_no_tokens_and_no_text() -> None:
    body = b'{"error": {"message": "boom", "type": "server_error"}}'
    summary = run(JSON, [body], capture=100)
    assert (summary.malformed, summary.prompt_tokens, summary.text) == (False, None, None)
    assert summary.api_format == ApiFormat.API_FORMAT_UNKNOWN


def test_oversized_json_body_is_not_parsed() -> None:
    filler = "x" * (inspect_mod.MAX_JSON_BYTES + 10)
    body = completion(filler)
    step = 1 << 20
    summary = run(JSON, [body[i : i + step] for i in range(0, len(body), step)], capture=10)
    assert summary.response_bytes == len(body)
    assert (summary.prompt_tokens, summary.completion_tokens, summary.finish_reason) == (
        None,
        None,
        None,
    )
    assert (summary.malformed, summary.text) == (False, None)


def test_empty_body() -> None:
    assert run(JSON, [], capture=5) == ResponseSummary(
        streamed=False,
        first_token_ns=None,
        prompt_tokens=None,
        completion_tokens=None,
        response_bytes=0,
        finish_reason=None,
        event_count=0,
        malformed=False,
        text=None,
    )


# ------------------------------------------------------------------------------------------------
# Properties


@st.composite
def generated_streams(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    """OpenAI-like streams with every freedom the SSE format allows, and what they should say."""
    contents = draw(st.lists(st.text(max_size=12), max_size=12))
    include_usage = draw(st.booleans())
    ascii_only = draw(st.booleans())
    out: list[bytes] = []
    if draw(st.booleans()):
        out.append(b"\xef\xbb\xbf")

    def emit(payload: object) -> None:
        eol = draw(st.sampled_from(["\n", "\r\n", "\r"]))
        if draw(st.booleans()):
            out.append(f": ping{eol}".encode())
        text = json.dumps(payload, ensure_ascii=ascii_only, indent=draw(st.sampled_from([None, 1])))
        space = draw(st.sampled_from(["", " "]))
        lines = "".join(f"data:{space}{line}{eol}" for line in text.split("\n"))
        out.append(f"{lines}{eol}".encode())

    emit(chunk("", role="assistant", null_usage=include_usage))
    for content in contents:
        emit(chunk(content, null_usage=include_usage))
    emit(chunk(finish="stop", null_usage=include_usage))
    if include_usage:
        emit(chunk(usage=USAGE))
    done = draw(st.booleans())
    if done:
        out.append(b"data: [DONE]\n\n")
        out.append(draw(st.binary(max_size=20)))
    expected = {
        "text": "".join(contents),
        "prompt_tokens": 7 if include_usage else None,
        "finish_reason": "stop",
        "event_count": len(contents) + 2 + include_usage + done,
        "first_token": any(contents),
    }
    return b"".join(out), expected


def cuts_for(data: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(data)), max_size=30)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_generated_streams_survive_any_chunking(data: st.DataObject) -> None:
    body, expected = data.draw(generated_streams())
    cuts = data.draw(cuts_for(body))
    capture = data.draw(st.sampled_from([0, 1, 5, 1000]))
    summary = assert_split_invariant(SSE, body, cuts, capture)
    assert not summary.malformed
    assert summary.response_bytes == len(body)
    assert summary.prompt_tokens == expected["prompt_tokens"]
    assert summary.finish_reason == expected["finish_reason"]
    assert summary.event_count == expected["event_count"]
    assert (summary.first_token_ns is not None) == expected["first_token"]
    if capture:
        raw = expected["text"].encode()[:capture]
        assert summary.text == raw.decode("utf-8", "ignore")
    else:
        assert summary.text is None


FRAGMENTS = [
    b"data:",
    b"data: ",
    b"data",
    b": c",
    b"event: x",
    b"\n",
    b"\r",
    b"\r\n",
    b"{",
    b"}",
    b"[DONE]",
    b'{"choices":[{"index":0,"delta":{"content":"\xc3\xa9t\xc3\xa9"}}]}',
    b'{"choices":[{"delta":{"tool_calls":[{}]},"finish_reason":"stop"}]}',
    b'{"choices":[{"delta":{"content":""}}],"usage":null}',
    b'{"usage":{"prompt_tokens":1,"completion_tokens":2}}',
    b'"content"',
    b'"usage": {',
    b"\xef\xbb\xbf",
    b"\xff",
    b"\xe2\x82",
    b"x" * 30,
]


# Lines of plausible shape and lengths around the (patched) 40-byte event limit.
SSE_LINES = st.lists(
    st.tuples(
        st.sampled_from([b"data:", b"data: ", b"data", b": ", b"event: ", b""]),
        st.one_of(
            st.integers(30, 42).map(lambda n: b"x" * n),
            st.integers(0, 60).map(lambda n: b"x" * n),
            st.sampled_from(FRAGMENTS),
            st.binary(max_size=50),
        ),
        st.sampled_from([b"\n", b"\r", b"\r\n", b"\n\n", b"\r\n\r\n"]),
    ),
    max_size=20,
).map(lambda lines: b"".join(b"".join(parts) for parts in lines))


@pytest.mark.parametrize("prefix", [b"data:", b"data: ", b": ", b"event: "])
@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"])
def test_event_limit_does_not_depend_on_chunking(prefix: bytes, eol: bytes) -> None:
    """Every line length around the limit, one and two lines per event, every cut."""
    with mock.patch.object(inspect_mod, "MAX_EVENT_BYTES", 40):
        for n in range(20, 46):
            line = prefix + b"x" * n + eol
            for body in (line + eol, line + line + eol, line + b"data: 1" + eol + eol):
                for cut in range(len(body) + 1):
                    assert_split_invariant(SSE, body, [cut], 0)


def test_the_rest_of_a_dropped_line_is_dropped_even_when_it_looks_like_data() -> None:
    """A line over the limit is dropped as its head arrives; a later chunk of the same line that
    happens to start with ``data:`` is not a data line, so no event is dropped on its account
    (found by the split-invariance property below: the verdict depended on the cut)."""
    body = b"\x00" * 62 + b"data:" + b"\x00" * 40
    with mock.patch.object(inspect_mod, "MAX_EVENT_BYTES", 40):
        whole = run(SSE, [body])
        cut = run(SSE, [body[:62], body[62:]])
    assert not whole.malformed
    assert cut == whole


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.data(),
    st.one_of(
        st.binary(max_size=300), st.lists(st.sampled_from(FRAGMENTS)).map(b"".join), SSE_LINES
    ),
    st.sampled_from([SSE, JSON, "text/plain", ""]),
    st.sampled_from([0, 3, 64]),
)
def test_garbage_never_raises_and_is_split_invariant(
    data: st.DataObject, body: bytes, content_type: str, capture: int
) -> None:
    cuts = data.draw(cuts_for(body))
    # Tiny limits, so that the drop-and-resynchronise paths run on small inputs.
    with (
        mock.patch.object(inspect_mod, "MAX_EVENT_BYTES", 40),
        mock.patch.object(inspect_mod, "MAX_JSON_BYTES", 200),
    ):
        summary = assert_split_invariant(content_type, body, cuts, capture)
    assert summary.response_bytes == len(body)


# ------------------------------------------------------------------------------------------------
# Real mock-model output


async def fetch(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], capture: int
) -> tuple[ResponseSummary, list[bytes], int, int]:
    async with session.post(url, json=body) as resp:
        assert resp.status == 200
        inspector = ResponseInspector(resp.headers["Content-Type"], capture)
        headers_ns = time.monotonic_ns()
        chunks = []
        async for piece in resp.content.iter_any():
            chunks.append(piece)
            inspector.feed(piece, time.monotonic_ns())
        return inspector.finish(), chunks, headers_ns, time.monotonic_ns()


@pytest.mark.timeout(30)
async def test_real_mock_model_output(start_mock: Start) -> None:
    base = await start_mock(
        MockBehaviour(completion_tokens=40, tokens_per_s=2000, ttft_ms=30, seed=11)
    )
    url = f"{base}/v1/chat/completions"
    messages = [{"role": "user", "content": "one two three"}]
    stream_body = {"messages": messages, "stream": True, "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession() as session:
        streamed, chunks, headers_ns, end_ns = await fetch(session, url, stream_body, 1 << 16)
        plain, _, _, _ = await fetch(session, url, {"messages": messages}, 1 << 16)
        cut, _, _, _ = await fetch(session, url, {"messages": messages, "max_tokens": 5}, 100)

    assert streamed.streamed
    assert streamed.first_token_ns is not None
    assert headers_ns < streamed.first_token_ns <= end_ns
    assert streamed.prompt_tokens == 3
    assert streamed.completion_tokens is not None
    assert streamed.text is not None
    assert streamed.completion_tokens == len(streamed.text.split())
    assert streamed.event_count == streamed.completion_tokens + 4  # role, finish, usage, [DONE]
    assert (streamed.finish_reason, streamed.malformed) == ("stop", False)
    assert streamed.response_bytes == sum(map(len, chunks))

    assert not plain.streamed
    assert plain.prompt_tokens == 3
    assert plain.text is not None
    assert plain.completion_tokens == len(plain.text.split())
    # Same prompt, same words: the shorter answer is a prefix of the longer one.
    short, long = sorted([plain.text.rstrip("."), streamed.text.rstrip(".")], key=len)
    assert long.startswith(short)
    assert (cut.finish_reason, cut.completion_tokens) == ("length", 5)

    # The recorded bytes, cut in other ways, give the same summary.
    raw = b"".join(chunks)
    for size in (1, 2, 3, 5, 7, 64, 1000):
        again = run(SSE, [raw[i : i + size] for i in range(0, len(raw), size)], 1 << 16)
        assert dataclasses.replace(again, first_token_ns=None) == dataclasses.replace(
            streamed, first_token_ns=None
        )


# ------------------------------------------------------------------------------------------------
# Prompt-cache hits


@pytest.mark.parametrize(
    ("usage", "cached"),
    [
        ({"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 6}}, 6),  # OpenAI chat
        ({"input_tokens": 9, "input_tokens_details": {"cached_tokens": 4}}, 4),  # Responses
        ({"input_tokens": 2, "cache_read_input_tokens": 7}, 7),  # Anthropic
        ({"prompt_tokens_details": {"cached_tokens": 0}}, 0),  # a miss is zero, not unknown
        ({"prompt_tokens": 9}, None),  # a server without prompt caching
        ({"prompt_tokens_details": None}, None),
        ({"prompt_tokens_details": {"audio_tokens": 1}}, None),
        ({"prompt_tokens_details": {"cached_tokens": -1}}, None),
        ({"prompt_tokens_details": {"cached_tokens": True}}, None),
        ({"prompt_tokens_details": {"cached_tokens": 2**32}}, None),  # no uint32 holds it
        ({"cache_read_input_tokens": "5"}, None),
    ],
)
def test_cached_tokens_of_each_api(usage: dict[str, Any], cached: int | None) -> None:
    assert inspect_mod.cached_tokens(usage) == cached
    body = json.dumps({"object": "chat.completion", "usage": usage}).encode()
    assert run(JSON, [body]).cached_prompt_tokens == cached


@given(cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=6))
def test_cached_tokens_of_an_openai_stream_survive_any_chunking(cuts: list[int]) -> None:
    usage = {**USAGE, "prompt_tokens_details": {"cached_tokens": 5}}
    body = openai_stream("Hi", " there").replace(
        data_event(chunk(usage=USAGE)), data_event(chunk(usage=usage))
    )
    cuts = [c for c in cuts if c < len(body)]
    summary = assert_split_invariant(SSE, body, cuts, 0)
    assert (summary.prompt_tokens, summary.cached_prompt_tokens) == (7, 5)


def test_cached_tokens_of_an_anthropic_stream_come_from_message_start() -> None:
    """Anthropic reports the cache in its first event; the last usage (message_delta) has only
    the output tokens and must not erase it."""
    events = [
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "content": [],
                "usage": {"input_tokens": 3, "cache_read_input_tokens": 1800, "output_tokens": 1},
            },
        },
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 2},
        },
    ]
    body = b"".join(b"event: x\n" + data_event(e) for e in events)
    assert run(SSE, [body]).cached_prompt_tokens == 1800


def test_cached_tokens_of_a_responses_stream_come_from_response_completed() -> None:
    done = {
        "type": "response.completed",
        "response": {"id": "resp_1", "usage": {"input_tokens_details": {"cached_tokens": 64}}},
    }
    body = data_event({"type": "response.output_text.delta", "delta": "Hi"}) + data_event(done)
    assert run(SSE, [body]).cached_prompt_tokens == 64


def test_without_prompt_caching_the_figure_stays_unknown() -> None:
    assert run(SSE, [openai_stream("Hi")]).cached_prompt_tokens is None
    assert run(JSON, [completion()]).cached_prompt_tokens is None


@pytest.mark.timeout(30)
async def test_the_stand_in_reports_cached_tokens(
    start_mock: Start,
) -> None:
    base = await start_mock(MockBehaviour(cached_prompt_ratio=0.5, seed=3))
    plain = await start_mock(MockBehaviour(seed=3))
    messages = [{"role": "user", "content": "one two three four five"}]
    stream_body = {"messages": messages, "stream": True, "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession() as session:
        url = f"{base}/v1/chat/completions"
        streamed, _, _, _ = await fetch(session, url, stream_body, 0)
        whole, _, _, _ = await fetch(session, url, {"messages": messages}, 0)
        none, _, _, _ = await fetch(session, f"{plain}/v1/chat/completions", stream_body, 0)
    assert (streamed.prompt_tokens, streamed.cached_prompt_tokens) == (5, 2)  # half, rounded down
    assert whole.cached_prompt_tokens == 2
    assert none.cached_prompt_tokens is None
