"""Prompt-cache hits from ``usage`` reach the telemetry on both data planes, through a real
Envoy, sidecar, Redis and the OpenAI stand-ins (which report half of the prompt as cached on
stable and nothing on the canary: a server without prompt caching).

ext_proc: the sidecar's response inspector reads the usage as the body streams through it.
native: inspect.lua keeps the body's tail and the access-log mapping reads the usage from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from extproc import stack
from extproc.telemetry.v1.event_pb2 import TelemetryEvent
from tests.conftest import LiveStack, start_stack, wait_for, write_experiment

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PROMPT = "one two three four five six seven eight nine"  # 9 prompt tokens: 4 cached on stable


@pytest.fixture(scope="module", params=["ext_proc", "native"])
def plane(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveStack]:
    tmp = tmp_path_factory.mktemp(request.param)
    path: Path = write_experiment(
        tmp, dataplane=request.param, strategy="ab", rollout={"min_stage_seconds": 3600}
    )
    s = start_stack(
        tmp / "stack",
        path,
        mock_args={"stable": ["--fast", "--cached-prompt-ratio", "0.5"], "canary": ["--fast"]},
    )
    try:
        yield s
    finally:
        stack.down(s.state_dir)


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
