"""The native data plane's prompt-cache hits: the access-log mapping reads them from the body's
tail (OpenAI chat and Responses, Anthropic non-streamed) or from what inspect.lua kept of an
Anthropic stream's first event; of a body in no format inspect.lua names, none."""

from __future__ import annotations

from typing import Any

import pytest

from tests.component.test_native import entry, mapper


@pytest.mark.parametrize(
    ("api", "md", "cached"),
    [
        (
            "chat",
            {"tail": '"usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":4}}}'},
            4,
        ),
        (
            "responses",
            {"tail": '"usage":{"input_tokens_details":{"cached_tokens":0},"output_tokens":3}}'},
            0,
        ),
        (
            "messages",
            {"tail": '"usage":{"input_tokens":2,"cache_read_input_tokens":70,"output_tokens":5}}'},
            70,
        ),
        # Anthropic stream: the tail's message_delta lacks it, message_start had it.
        (
            "messages",
            {"tail": '"usage":{"output_tokens":5}}\n\n', "cached_prompt_tokens": 1800},
            1800,
        ),
        # The tail holds the last usage: it wins over the stream's first event.
        ("messages", {"tail": '"cache_read_input_tokens":12}', "cached_prompt_tokens": 1800}, 12),
        ("chat", {"tail": '"usage":{"prompt_tokens":9}}'}, None),
        ("chat", {"tail": '"cached_tokens":4294967296}'}, None),  # more than a uint32 holds
        ("messages", {"tail": "", "cached_prompt_tokens": 1.5}, None),
        ("messages", {"tail": "", "cached_prompt_tokens": -3}, None),
        # A body in no format read: nothing of its usage.
        (
            None,
            {"tail": '"usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":4}}}'},
            None,
        ),
    ],
)
def test_cached_prompt_tokens_of_an_access_log_entry(
    api: str | None, md: dict[str, Any], cached: int | None
) -> None:
    md = md if api is None else {**md, "format": api}
    ev = mapper().event(entry(variant="canary", md=md))
    if cached is None:
        assert not ev.HasField("cached_prompt_tokens")
    else:
        assert ev.HasField("cached_prompt_tokens")
        assert ev.cached_prompt_tokens == cached
