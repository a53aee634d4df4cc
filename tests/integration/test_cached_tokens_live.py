"""Prompt-cache hits from ``usage`` reach the telemetry on both data planes, through a real
Envoy, sidecar, Redis and the OpenAI stand-ins (which report half of the prompt as cached on
stable and nothing on the canary: a server without prompt caching).

ext_proc: the sidecar's response inspector reads the usage as the body streams through it.
native: inspect.lua keeps the body's tail and the access-log mapping reads the usage from it;
an Anthropic stream reports its cache in its first event, long gone from the tail, which
inspect.lua reads as the stream passes.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from extproc.telemetry.v1.event_pb2 import TelemetryEvent
from tests.conftest import LiveStack, forced_planes, upstream_stack, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PROMPT = "one two three four five six seven eight nine"  # 9 prompt tokens: 4 cached on stable


plane = forced_planes({"stable": ["--fast", "--cached-prompt-ratio", "0.5"], "canary": ["--fast"]})


def ask(s: LiveStack, http: httpx.Client, variant: str, stream: bool) -> str:
    """One forced request; its request id (as Envoy assigned and echoed it)."""
    r = s.chat(
        http,
        {"x-experiment": variant},
        messages=[{"role": "user", "content": PROMPT}],
        stream=stream,
        stream_options={"include_usage": True} if stream else None,
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-llm-variant"] == variant
    return r.headers["x-request-id"]


def events_by_id(s: LiveStack, ids: set[str]) -> dict[str, TelemetryEvent]:
    def found() -> dict[str, TelemetryEvent] | None:
        by_id = {ev.request_id: ev for ev in s.events() if ev.request_id in ids and not ev.shadow}
        return by_id if len(by_id) == len(ids) else None

    result: dict[str, TelemetryEvent] = wait_for(found, "an event for every request")
    return result


def test_cached_prompt_tokens_arrive_in_the_events(plane: LiveStack, http: httpx.Client) -> None:
    asked = {
        (variant, stream): ask(plane, http, variant, stream)
        for variant in ("stable", "canary")
        for stream in (True, False)
    }
    events = events_by_id(plane, set(asked.values()))
    for (variant, stream), rid in asked.items():
        ev = events[rid]
        assert (ev.variant, ev.prompt_tokens) == (variant, 9), (variant, stream)
        if variant == "stable":
            assert ev.HasField("cached_prompt_tokens"), (variant, stream)
            assert ev.cached_prompt_tokens == 4, (variant, stream)
        else:  # not reported by the server: unknown, not zero
            assert not ev.HasField("cached_prompt_tokens"), (variant, stream)
    # Shown by `extproc status`: the requests were forced, so in the tester traffic's figures.
    forced = plane.status()["forced"]
    assert forced["stable"]["cached_prompt_tokens"] == 4.0
    assert forced["canary"]["cached_prompt_tokens"] is None


def anthropic_stream() -> bytes:
    """A Messages API stream whose only cache figure is in ``message_start``, followed by more
    than a kilobyte of text, so the body's tail no longer holds it."""
    events = [
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "content": [],
                "usage": {"input_tokens": 3, "cache_read_input_tokens": 1800, "output_tokens": 1},
            },
        },
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 40},
        },
        {"type": "message_stop"},
    ]
    word = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "w"}}
    events[2:2] = [word] * 40
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


@pytest.mark.parametrize("dataplane", ["ext_proc", "native"])
def test_an_anthropic_streams_cache_arrives(
    dataplane: str, tmp_path: Path, http: httpx.Client
) -> None:
    """Behind a model server speaking the Messages API's stream, the cache hits its first event
    reported arrive."""
    assert len(anthropic_stream()) > 2048  # message_start is long out of the 1 KiB tail
    answers = {"/v1/chat/completions": ("text/event-stream", anthropic_stream())}
    with upstream_stack(tmp_path, dataplane, answers) as s:
        r = s.chat(http, {"x-experiment": "canary"}, stream=True)
        assert r.status_code == 200, r.text
        assert b"cache_read_input_tokens" in r.content
        (ev,) = events_by_id(s, {r.headers["x-request-id"]}).values()
        assert ev.HasField("cached_prompt_tokens")
        assert ev.cached_prompt_tokens == 1800
