"""What a client cannot do through the real Envoy and sidecar (default data plane): pass a live
request off as a shadow copy (by ``Host`` or by the shadow listener's own mark), or choose its
request id and so merge two requests into one pair or aim feedback at someone else's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from extproc.dev import stack
from extproc.telemetry.v1.event_pb2 import TelemetryEvent
from tests.conftest import REQUEST_PATH, LiveStack, start_stack, wait_for, write_experiment
from tests.integration.test_shadow_live import pairs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def shadow_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    tmp = tmp_path_factory.mktemp("edge")
    exp = write_experiment(
        tmp,
        strategy="shadow",
        variants={
            "stable": {"cluster": "model_stable", "address": "127.0.0.1:8001", "weight": 100},
            "canary": {"cluster": "model_canary", "address": "127.0.0.1:8002", "weight": 0},
        },
        shadow={"variant": "canary", "share": 100},
        capture={"sample": 100},
        rollout={"cadence_s": 0.5, "min_stage_seconds": 600},
    )
    s = start_stack(tmp / "stack", exp, components=REQUEST_PATH)
    try:
        yield s
    finally:
        stack.down(s.state_dir)


def sides(s: LiveStack, request_ids: set[str]) -> dict[str, list[TelemetryEvent]]:
    """Wait until every request id has its primary's and its copy's event; by request id."""

    def both() -> dict[str, list[TelemetryEvent]] | None:
        by_id: dict[str, list[TelemetryEvent]] = {rid: [] for rid in request_ids}
        for ev in s.events():
            if ev.request_id in by_id:
                by_id[ev.request_id].append(ev)
        return by_id if all(len(evs) >= 2 for evs in by_id.values()) else None

    got: dict[str, list[TelemetryEvent]] = wait_for(both, "two events for every request id")
    return got


@pytest.mark.parametrize(
    "forged",
    [{"host": "api-shadow"}, {"host": "api-shadow:10000"}, {"x-llm-shadow-copy": "1"}],
    ids=["host", "host-port", "marker"],
)
def test_a_client_cannot_pass_a_live_request_off_as_a_shadow_copy(
    shadow_stack: LiveStack, http: httpx.Client, forged: dict[str, str]
) -> None:
    s = shadow_stack
    r = s.chat(http, {"x-conversation-id": "forger", **forged})
    assert r.status_code == 200
    assert r.headers["x-mock-model"] == "stable"
    rid = r.headers["x-request-id"]
    evs = sides(s, {rid})[rid]
    got = sorted((ev.shadow, ev.variant) for ev in evs)
    # The live request is stable's primary; the one shadow event is Envoy's real mirror.
    assert got == [(False, "stable"), (True, "canary")]
    pair = wait_for(
        lambda: next((p for p in pairs(s) if p["request_id"] == rid and "shadow" in p), None),
        "the request's pair",
    )
    assert (pair["primary"]["variant"], pair["shadow"]["variant"]) == ("stable", "canary")


def test_request_ids_are_the_edges_not_the_clients(
    shadow_stack: LiveStack, http: httpx.Client
) -> None:
    s = shadow_stack
    sent = [
        s.chat(http, {"x-conversation-id": f"dup{i}", "x-request-id": "chosen-by-client"})
        for i in range(2)
    ]
    ids = {r.headers["x-request-id"] for r in sent}
    assert len(ids) == 2
    assert "chosen-by-client" not in ids
    # Each is a pair of its own: the mirrored copy kept its primary's (generated) id.
    by_id = sides(s, ids)
    for rid in ids:
        assert sorted(ev.shadow for ev in by_id[rid]) == [False, True]

    def paired() -> dict[str, dict[str, Any]] | None:
        now = {p["request_id"]: p for p in pairs(s)}
        whole = all(rid in now and {"primary", "shadow"} <= set(now[rid]) for rid in ids)
        return now if whole else None

    got = wait_for(paired, "a complete pair for each request")
    assert "chosen-by-client" not in got
