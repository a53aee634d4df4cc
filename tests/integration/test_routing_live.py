"""Routing through a real Envoy, real sidecar, real Redis and the OpenAI stand-ins."""

from __future__ import annotations

import time
import uuid
from collections import Counter

import httpx
import openai
import pytest

from extproc.contract import keys
from extproc.telemetry.v1.event_pb2 import Assignment, ErrorClass, TelemetryEvent
from tests.conftest import LiveStack, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def events(s: LiveStack) -> list[TelemetryEvent]:
    out = []
    for _id, fields in s.redis().xrange(keys.events("chat-upgrade")):
        ev = TelemetryEvent()
        ev.ParseFromString(fields[keys.EVENT_FIELD])
        out.append(ev)
    return out


def test_forced_routing_reaches_the_forced_model(data_stack: LiveStack, http: httpx.Client) -> None:
    for variant in ("canary", "stable"):
        r = data_stack.chat(http, {"x-experiment": variant})
        assert r.status_code == 200
        assert r.headers["x-llm-variant"] == variant
        assert r.headers["x-mock-model"] == variant  # the upstream that really answered


def test_unknown_forced_variant_is_a_400_listing_the_variants(
    data_stack: LiveStack, http: httpx.Client
) -> None:
    r = data_stack.chat(http, {"x-experiment": "gpt-9"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["valid_variants"] == ["stable", "canary"]
    assert "gpt-9" in err["message"]


def test_client_sent_variant_header_is_ignored(data_stack: LiveStack, http: httpx.Client) -> None:
    data_stack.set_weights(stable=100, canary=0)
    for i in range(20):
        r = data_stack.chat(http, {"x-llm-variant": "canary", "x-conversation-id": f"spoof-{i}"})
        assert r.headers["x-llm-variant"] == "stable"
        assert r.headers["x-mock-model"] == "stable"


def test_conversations_are_sticky_and_weights_apply_live(
    data_stack: LiveStack, http: httpx.Client
) -> None:
    data_stack.set_weights(stable=50, canary=50)
    seen: Counter[str] = Counter()
    for c in range(12):
        conv = f"conv-{c}"
        variants = {
            data_stack.chat(http, {"x-conversation-id": conv}).headers["x-llm-variant"]
            for _turn in range(10)
        }
        assert len(variants) == 1, f"{conv} moved between variants: {variants}"
        seen[variants.pop()] += 1
    assert set(seen) == {"stable", "canary"}, seen


def test_a_weight_change_reaches_every_sidecar_and_then_every_request(
    data_stack: LiveStack, http: httpx.Client
) -> None:
    """Once every sidecar reports the new routing version in its heartbeat, every request
    follows the new weights. How long that took is printed as a figure, not asserted (the time
    depends on the machine; `bench/` measures it)."""
    data_stack.set_weights(stable=100, canary=0)
    assert data_stack.chat(http, {"x-conversation-id": "probe"}).headers["x-llm-variant"] == (
        "stable"
    )
    t0 = time.monotonic()
    version = data_stack.set_weights(stable=0, canary=100)  # waits on the sidecars' version
    elapsed = time.monotonic() - t0
    for i in range(10):
        r = data_stack.chat(http, {"x-conversation-id": "probe" if i == 0 else f"after-{i}"})
        assert r.headers["x-llm-variant"] == "canary"
        assert r.headers["x-mock-model"] == "canary"
    print(f"routing version {version} on every sidecar {elapsed * 1000:.0f} ms after set-weights")
    data_stack.set_weights(stable=95, canary=5)


def test_one_event_per_request_with_the_right_variant(
    data_stack: LiveStack, http: httpx.Client
) -> None:
    data_stack.set_weights(stable=50, canary=50)
    served: dict[str, str] = {}
    for i in range(40):
        stream = i % 2 == 0
        r = data_stack.chat(
            http,
            {"x-conversation-id": f"ev-{uuid.uuid4()}"},
            stream=stream,
            stream_options={"include_usage": True} if stream else None,
        )
        assert r.status_code == 200
        served[r.headers["x-request-id"]] = r.headers["x-llm-variant"]

    def recorded() -> dict[str, list[TelemetryEvent]] | None:
        by_id: dict[str, list[TelemetryEvent]] = {}
        for ev in events(data_stack):
            if ev.request_id in served:
                by_id.setdefault(ev.request_id, []).append(ev)
        return by_id if len(by_id) == len(served) else None

    by_id = wait_for(recorded, "an event for every request")
    for rid, evs in by_id.items():
        assert len(evs) == 1, f"{rid}: {len(evs)} events"
        ev = evs[0]
        assert ev.variant == served[rid]
        assert ev.assignment == Assignment.ASSIGNMENT_STICKY
        assert ev.status == 200
        assert ev.key_hash
        assert "ev-" not in ev.key_hash
        assert ev.completion_tokens > 0
        assert ev.prompt_tokens > 0
        assert 0 < ev.headers_ms <= ev.first_token_ms <= ev.duration_ms


def test_openai_client_gets_completions_with_the_variant_header(data_stack: LiveStack) -> None:
    client = openai.OpenAI(base_url=f"{data_stack.listener}/v1", api_key="unused", timeout=10)
    raw = client.chat.completions.with_raw_response.create(
        model="m",
        messages=[{"role": "user", "content": "Say hi"}],
        extra_headers={"x-conversation-id": "openai-1"},
    )
    assert raw.headers["x-llm-variant"] in ("stable", "canary")
    assert raw.parse().choices[0].message.content
    with client.chat.completions.with_streaming_response.create(
        model="m",
        messages=[{"role": "user", "content": "Say hi"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-conversation-id": "openai-1"},
    ) as resp:
        assert resp.headers["x-llm-variant"] == raw.headers["x-llm-variant"]
        chunks = list(resp.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0


def test_upstream_5xx_is_recorded_against_the_variant_that_failed(
    data_stack: LiveStack, http: httpx.Client
) -> None:
    canary_model = data_stack.state["endpoints"]["models"]["canary"]
    http.post(f"{canary_model}/admin/behaviour", json={"error_rate": 1.0}).raise_for_status()
    try:
        r = data_stack.chat(http, {"x-experiment": "canary"})
        ok = data_stack.chat(http, {"x-experiment": "stable"})
    finally:
        http.post(f"{canary_model}/admin/behaviour", json={"error_rate": 0.0}).raise_for_status()
    assert r.status_code == 500
    assert ok.status_code == 200
    rid, ok_rid = r.headers["x-request-id"], ok.headers["x-request-id"]
    got = wait_for(
        lambda: (
            (evs := {e.request_id: e for e in events(data_stack)}).get(rid)
            and evs.get(ok_rid)
            and evs
        ),
        "both events",
    )
    assert (got[rid].variant, got[rid].status) == ("canary", 500)
    assert got[rid].error == ErrorClass.ERROR_CLASS_UPSTREAM_5XX
    assert got[ok_rid].error == ErrorClass.ERROR_CLASS_NONE


def test_sidecar_metrics_are_scraped_and_parse(data_stack: LiveStack, http: httpx.Client) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    for _ in range(5):
        data_stack.chat(http, {"x-experiment": "canary"})
    url = data_stack.state["endpoints"]["sidecar_metrics"]

    def canary_requests() -> float:
        families = {f.name: f for f in text_string_to_metric_families(http.get(url).text)}
        return sum(
            s.value
            for s in families["extproc_requests"].samples
            if s.name == "extproc_requests_total" and s.labels["variant"] == "canary"
        )

    assert wait_for(lambda: canary_requests() >= 5, "canary requests in /metrics")
    families = {f.name for f in text_string_to_metric_families(http.get(url).text)}
    assert {"extproc_request_duration_seconds", "extproc_routing_version", "extproc_redis_up"} <= (
        families
    )
