"""The native data plane's reading of each API format: the access-log mapping takes the format
inspect.lua named and the usage counts and finish reason it found; from an inspector of an earlier
release, which sent the body's tail instead, it reads that format's usage and finish reason from
the tail (or the prompt tokens of an Anthropic stream's first event). Of a body in no format it
takes nothing but the timing."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.telemetry.v1.event_pb2 import ApiFormat
from tests.component.test_native import entry, mapper

START_US = 1_700_000_000_000_000
CHAT_TAIL = '"finish_reason":"length"}],"usage":{"prompt_tokens":9,"completion_tokens":10}}'
RESPONSES_TAIL = (
    '"usage":{"input_tokens":9,"input_tokens_details":{"cached_tokens":0},'
    '"output_tokens":10,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":19}}}'
)
MESSAGES_TAIL = (
    '{"type":"message_delta","delta":{"stop_reason":"max_tokens","stop_sequence":null},'
    '"usage":{"output_tokens":10}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'
)


@pytest.mark.parametrize(
    ("md", "api", "tokens", "finish"),
    [
        (
            {"format": "chat", "tail": CHAT_TAIL},
            ApiFormat.API_FORMAT_CHAT_COMPLETIONS,
            (9, 10),
            "length",
        ),
        (
            {"format": "completions", "tail": CHAT_TAIL},
            ApiFormat.API_FORMAT_COMPLETIONS,
            (9, 10),
            "length",
        ),
        (
            {"format": "responses", "tail": RESPONSES_TAIL},
            ApiFormat.API_FORMAT_RESPONSES,
            (9, 10),
            "",
        ),
        # An Anthropic stream: its prompt tokens were in message_start, long out of the tail.
        (
            {"format": "messages", "tail": MESSAGES_TAIL, "prompt_tokens": 9},
            ApiFormat.API_FORMAT_MESSAGES,
            (9, 10),
            "max_tokens",
        ),
        # The tail's count (a cumulative message_delta) wins over the first event's.
        (
            {
                "format": "messages",
                "tail": '"usage":{"input_tokens":7,"output_tokens":3}}',
                "prompt_tokens": 9,
            },
            ApiFormat.API_FORMAT_MESSAGES,
            (7, 3),
            "",
        ),
        # Each format reads its own names only.
        (
            {"format": "chat", "tail": RESPONSES_TAIL},
            ApiFormat.API_FORMAT_CHAT_COMPLETIONS,
            (None, None),
            "",
        ),
        (
            {"format": "messages", "tail": CHAT_TAIL},
            ApiFormat.API_FORMAT_MESSAGES,
            (None, None),
            "",
        ),
        (
            {"format": "messages", "tail": "", "prompt_tokens": 2.5},
            ApiFormat.API_FORMAT_MESSAGES,
            (None, None),
            "",
        ),
        # A name inspect.lua never writes, or none: no format read.
        ({"format": "gemini", "tail": CHAT_TAIL}, ApiFormat.API_FORMAT_UNKNOWN, (None, None), ""),
        (
            {"tail": CHAT_TAIL, "text": "I'm sorry", "tool_calls": True},
            ApiFormat.API_FORMAT_UNKNOWN,
            (None, None),
            "",
        ),
    ],
)
def test_each_formats_usage_and_finish(
    md: dict[str, Any], api: ApiFormat.ValueType, tokens: tuple[int | None, int | None], finish: str
) -> None:
    ev = mapper().event(entry(variant="canary", md={"first_token_us": START_US + 55_000, **md}))
    assert ev.api_format == api
    prompt = ev.prompt_tokens if ev.HasField("prompt_tokens") else None
    completion = ev.completion_tokens if ev.HasField("completion_tokens") else None
    assert (prompt, completion) == tokens
    assert ev.finish_reason == finish
    assert ev.first_token_ms == 55  # timing, whatever the format
    if api == ApiFormat.API_FORMAT_UNKNOWN:
        assert not ev.tool_calls
        assert not ev.HasField("refusal")


def test_an_error_response_records_no_format() -> None:
    ev = mapper().event(entry(variant="canary", status=500, md={"format": "chat", "tail": ""}))
    assert ev.api_format == ApiFormat.API_FORMAT_UNSPECIFIED


@pytest.mark.parametrize(
    ("md", "tokens", "cached", "finish"),
    [
        (
            {
                "format": "chat",
                "prompt_tokens": 9,
                "completion_tokens": 10,
                "cached_prompt_tokens": 4,
                "finish_reason": "length",
            },
            (9, 10),
            4,
            "length",
        ),
        ({"format": "responses", "prompt_tokens": 9}, (9, None), None, ""),
        # What no inspector sends is not believed: a count past a uint32 or not whole, a reason
        # that is not at most 32 of [a-z_].
        (
            {
                "format": "messages",
                "prompt_tokens": 2**32,
                "completion_tokens": 2.5,
                "cached_prompt_tokens": -1,
                "finish_reason": "end turn",
            },
            (None, None),
            None,
            "",
        ),
        ({"format": "chat", "finish_reason": "x" * 33}, (None, None), None, ""),
        # Counts under an unknown format are not read.
        ({"format": "gemini", "prompt_tokens": 9, "finish_reason": "stop"}, (None, None), None, ""),
    ],
)
def test_the_counts_and_finish_reason_the_inspector_found(
    md: dict[str, Any], tokens: tuple[int | None, int | None], cached: int | None, finish: str
) -> None:
    ev = mapper().event(entry(variant="canary", md=md))
    prompt = ev.prompt_tokens if ev.HasField("prompt_tokens") else None
    completion = ev.completion_tokens if ev.HasField("completion_tokens") else None
    assert (prompt, completion) == tokens
    assert (ev.cached_prompt_tokens if ev.HasField("cached_prompt_tokens") else None) == cached
    assert ev.finish_reason == finish
