"""``dataplane: native`` through a real Envoy, sidecar, Redis and the OpenAI stand-ins.

Envoy routes by itself (sticky weighted clusters, weights over RTDS from the sidecar) and the
sidecar only reads Envoy's access log: these tests hold it to the contract of the default data
plane: forced routing, stickiness, monotone ramps, live weights, one event per request with the
variant, how it was assigned, timings, tokens and the answer's quality signals.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from extproc.contract.envoy import RUNTIME_PREFIX
from extproc.dev import stack
from extproc.telemetry.v1.event_pb2 import Assignment, ErrorClass, TelemetryEvent
from tests.conftest import REQUEST_PATH, LiveStack, start_stack, wait_for, write_experiment
from tests.integration.test_faults_load_live import kill

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def native_experiment(tmp: Path) -> Path:
    """The bundled example on the native data plane, as an A/B test whose stage outlasts the
    tests: the evaluator leaves the weights the tests set alone."""
    return write_experiment(
        tmp, dataplane="native", strategy="ab", rollout={"min_stage_seconds": 3600}
    )


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    tmp = tmp_path_factory.mktemp("native")
    s = start_stack(tmp / "stack", native_experiment(tmp), components=REQUEST_PATH)
    try:
        yield s
    finally:
        stack.down(s.state_dir)


def envoy_weights(s: LiveStack, http: httpx.Client) -> dict[str, int]:
    """The weights Envoy routes with now: its runtime, as its admin page shows it."""
    doc = http.get(f"{s.state['endpoints']['envoy_admin']}/runtime").json()
    return {
        k.removeprefix(RUNTIME_PREFIX + "."): int(v["final_value"])
        for k, v in doc["entries"].items()
        if k.startswith(RUNTIME_PREFIX)
    }


def set_weights(s: LiveStack, http: httpx.Client, canary: float) -> None:
    """Change the live weights and wait until Envoy routes with them."""
    s.set_weights(stable=100 - canary, canary=canary)
    want = round(canary * 100)
    wait_for(
        lambda: envoy_weights(s, http).get("model_canary") == want,
        f"Envoy's runtime to hold canary {want} bp",
    )


def on_canary(s: LiveStack, http: httpx.Client, convs: range) -> set[int]:
    return {
        c
        for c in convs
        if s.chat(http, {"x-conversation-id": f"ramp-{c}"}).headers["x-llm-variant"] == "canary"
    }


def turn(s: LiveStack, http: httpx.Client, conv: str, stream: bool) -> httpx.Response:
    """One chat turn of a conversation; a streamed one asks for the usage chunk."""
    return s.chat(
        http,
        {"x-conversation-id": conv},
        stream=stream,
        stream_options={"include_usage": True} if stream else None,
    )


def events_of(s: LiveStack, request_ids: set[str]) -> dict[str, TelemetryEvent]:
    """Wait for one event per request id, and return them by id."""

    def recorded() -> dict[str, TelemetryEvent] | None:
        by_id: dict[str, TelemetryEvent] = {}
        for ev in s.events():
            if ev.request_id in request_ids:
                assert ev.request_id not in by_id, f"two events for {ev.request_id}"
                by_id[ev.request_id] = ev
        return by_id if len(by_id) == len(request_ids) else None

    found: dict[str, TelemetryEvent] = wait_for(recorded, "an event for every request")
    return found


def test_forced_routing_and_refusals(native: LiveStack, http: httpx.Client) -> None:
    for variant in ("canary", "stable"):
        r = native.chat(http, {"x-experiment": variant})
        assert r.status_code == 200
        assert r.headers["x-llm-variant"] == variant
        assert r.headers["x-mock-model"] == variant
    r = native.chat(http, {"x-experiment": "gpt-9"})
    assert r.status_code == 400
    assert sorted(r.json()["error"]["valid_variants"]) == ["canary", "stable"]
    set_weights(native, http, 0)
    r = native.chat(http, {"x-llm-variant": "canary", "x-conversation-id": "spoof"})
    assert (r.headers["x-llm-variant"], r.headers["x-mock-model"]) == ("stable", "stable")


def test_sticky_and_monotone_as_the_canary_ramps(native: LiveStack, http: httpx.Client) -> None:
    convs = range(300)
    set_weights(native, http, 10)
    at10 = on_canary(native, http, convs)
    assert on_canary(native, http, convs) == at10  # every conversation stays where it was
    set_weights(native, http, 25)
    at25 = on_canary(native, http, convs)
    assert at10 < at25  # the ramp only adds conversations to the canary
    assert 10 < len(at10) < 60, len(at10)  # 30 expected
    assert 40 < len(at25) < 120, len(at25)  # 75 expected
    set_weights(native, http, 0)
    assert not on_canary(native, http, convs)  # a rollback takes every one back


def test_one_event_per_request_with_timings_tokens_and_signals(
    native: LiveStack, http: httpx.Client
) -> None:
    set_weights(native, http, 50)
    served: dict[str, tuple[str, bool]] = {}
    for i in range(30):
        stream = i % 2 == 0
        r = turn(native, http, f"ev-{uuid.uuid4()}", stream)
        assert r.status_code == 200
        served[r.headers["x-request-id"]] = (r.headers["x-llm-variant"], stream)
    forced = native.chat(http, {"x-experiment": "canary"}).headers["x-request-id"]
    by_id = events_of(native, {*served, forced})
    for rid, (variant, stream) in served.items():
        ev = by_id[rid]
        assert (ev.variant, ev.assignment, ev.status) == (
            variant,
            Assignment.ASSIGNMENT_STICKY,
            200,
        )
        assert ev.error == ErrorClass.ERROR_CLASS_NONE
        assert ev.key_hash
        assert "ev-" not in ev.key_hash
        assert ev.streamed == stream
        assert ev.completion_tokens > 0
        assert ev.prompt_tokens > 0
        assert 0 < ev.headers_ms <= ev.first_token_ms <= ev.duration_ms
        assert ev.answer_chars > 0
        assert not ev.refusal
        assert not ev.empty_answer
    assert (by_id[forced].variant, by_id[forced].assignment) == (
        "canary",
        Assignment.ASSIGNMENT_FORCED,
    )


def test_refusals_and_upstream_errors_count_against_the_variant(
    native: LiveStack, http: httpx.Client
) -> None:
    model = native.state["endpoints"]["models"]["canary"]
    ids: dict[str, str] = {}
    http.post(f"{model}/admin/behaviour", json={"refusal_rate": 1.0}).raise_for_status()
    try:
        for stream in (False, True):
            r = native.chat(http, {"x-experiment": "canary"}, stream=stream)
            ids[r.headers["x-request-id"]] = "refusal"
    finally:
        http.post(f"{model}/admin/behaviour", json={"refusal_rate": 0.0}).raise_for_status()
    http.post(f"{model}/admin/behaviour", json={"error_rate": 1.0}).raise_for_status()
    try:
        r = native.chat(http, {"x-experiment": "canary"})
        assert r.status_code >= 500
        ids[r.headers["x-request-id"]] = "error"
    finally:
        http.post(f"{model}/admin/behaviour", json={"error_rate": 0.0}).raise_for_status()
    by_id = events_of(native, set(ids))
    for rid, what in ids.items():
        ev = by_id[rid]
        assert ev.variant == "canary"
        if what == "refusal":
            assert ev.refusal, ev
            assert not ev.empty_answer
        else:
            assert ev.error == ErrorClass.ERROR_CLASS_UPSTREAM_5XX
            assert not ev.HasField("refusal")


def test_traffic_keeps_its_routing_while_the_sidecar_is_away(
    tmp_path: Path, http: httpx.Client
) -> None:
    s = start_stack(tmp_path / "stack", native_experiment(tmp_path), components=REQUEST_PATH)
    try:
        set_weights(s, http, 50)
        convs = range(100)
        before = on_canary(s, http, convs)
        kill(s, "sidecar")
        responses = [s.chat(http, {"x-conversation-id": f"ramp-{c}"}) for c in convs]
        assert all(r.status_code == 200 for r in responses)
        variants = [r.headers["x-llm-variant"] for r in responses]
        assert {c for c, v in zip(convs, variants, strict=True) if v == "canary"} == before
    finally:
        stack.down(s.state_dir)


def test_mirrored_copies_are_recorded_as_the_shadow_variant(
    tmp_path: Path, http: httpx.Client
) -> None:
    variants = {
        "stable": {"cluster": "model_stable", "address": "127.0.0.1:8001", "weight": 100},
        "canary": {"cluster": "model_canary", "address": "127.0.0.1:8002", "weight": 0},
    }
    exp = write_experiment(
        tmp_path,
        dataplane="native",
        strategy="shadow",
        variants=variants,
        shadow={"variant": "canary", "share": 100},
        rollout={"min_stage_seconds": 3600},
    )
    s = start_stack(tmp_path / "stack", exp, components=REQUEST_PATH)
    try:
        ids = set()
        for i in range(10):
            r = turn(s, http, f"shadow-{i}", stream=i % 2 == 0)
            assert r.headers["x-llm-variant"] == "stable"
            ids.add(r.headers["x-request-id"])
        # A client claiming to be a copy, by Host or by the shadow listener's mark, under an id
        # of its choosing: two more primaries, each with its own id and its own copy.
        for forged in ({"host": "api-shadow"}, {"x-llm-shadow-copy": "1"}):
            r = s.chat(http, {"x-conversation-id": "forger", "x-request-id": "mine", **forged})
            assert r.headers["x-llm-variant"] == "stable"
            ids.add(r.headers["x-request-id"])
        assert len(ids) == 12
        assert "mine" not in ids

        def both_sides() -> list[TelemetryEvent] | None:
            evs = [ev for ev in s.events() if ev.request_id in ids]
            return evs if len(evs) == 2 * len(ids) else None

        evs = wait_for(both_sides, "a primary and a shadow event per request")
        primary = {ev.request_id for ev in evs if not ev.shadow and ev.variant == "stable"}
        copies = {ev.request_id for ev in evs if ev.shadow and ev.variant == "canary"}
        assert primary == copies == ids
        assert all(ev.status == 200 and ev.completion_tokens > 0 for ev in evs)
    finally:
        stack.down(s.state_dir)
