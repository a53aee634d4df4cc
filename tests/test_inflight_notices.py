"""The observer's in-flight notices: one per request still open at ``notice_ms``, none for a
request that ended first, none for forced traffic; one sweeper per process."""

from __future__ import annotations

import asyncio
import time

import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.config import parse_experiment
from extproc.quality import QualityRules
from extproc.sidecar.decide import Policy
from extproc.sidecar.observer import InflightNotices, Observation, ObserverContext
from extproc.telemetry.v1.event_pb2 import Assignment, TelemetryEvent

pytestmark = pytest.mark.timeout(30)

EXPERIMENT = parse_experiment(
    {
        "name": "exp",
        "salt": "s",
        "stable": "stable",
        "variants": {
            "stable": {"cluster": "a", "weight": 50},
            "canary": {"cluster": "b", "weight": 50},
        },
        "forced_routing": {"allow": ["canary"]},
    }
)


def context(notices: InflightNotices, out: list[TelemetryEvent]) -> ObserverContext:
    return ObserverContext(
        experiment="exp",
        stable="stable",
        variants=("stable", "canary"),
        policy=Policy.compile(EXPERIMENT),
        recorder="test",
        emit=out.append,
        rules=QualityRules.compile(EXPERIMENT.spec),
        notices=notices,
    )


def request(rid: str, variant: str = "canary", forced: bool = False) -> pb.ProcessingRequest:
    headers = [
        HeaderValue(key="x-request-id", raw_value=rid.encode()),
        HeaderValue(key="x-llm-variant", raw_value=variant.encode()),
        HeaderValue(key="x-conversation-id", raw_value=f"c-{rid}".encode()),
    ]
    if forced:
        headers.append(HeaderValue(key="x-experiment", raw_value=variant.encode()))
    return pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=HeaderMap(headers=headers)),
        observability_mode=True,
    )


def ended() -> pb.ProcessingRequest:
    status = HeaderMap(headers=[HeaderValue(key=":status", raw_value=b"200")])
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=status, end_of_stream=True))


async def test_the_sweeper_notices_only_requests_open_past_the_bound() -> None:
    out: list[TelemetryEvent] = []
    notices = InflightNotices(notice_ms=1000)
    ctx = context(notices, out)
    old, young, done, forced = (Observation(ctx) for _ in range(4))
    old.on_message(request("old"))
    old.start_ns = time.time_ns() - 5_000_000_000  # open for 5 s
    young.on_message(request("young", "stable"))
    done.on_message(request("done"))
    done.on_message(ended())
    forced.on_message(request("forced", forced=True))
    assert list(notices.open) == [old, young]  # ended and forced requests are not followed
    notices.sweep()
    assert [(e.request_id, e.in_flight) for e in out] == [("done", False), ("old", True)]
    n = out[-1]
    assert (n.variant, n.key_hash, n.assignment) == (
        old.event.variant,
        old.event.key_hash,
        Assignment.ASSIGNMENT_STICKY,
    )
    assert n.time_unix_ms - int(n.duration_ms) == pytest.approx(old.start_ns // 1_000_000, abs=1)
    assert n.duration_ms >= 5000
    assert list(notices.open) == [young]  # the timer is armed for the next oldest
    old.close()  # its final event still comes, once
    assert [e.request_id for e in out].count("old") == 2
    notices.sweep()
    assert len(out) == 3  # young is not due yet


async def test_one_timer_delivers_a_notice_while_the_request_is_open() -> None:
    out: list[TelemetryEvent] = []
    got = asyncio.Event()
    notices = InflightNotices(notice_ms=50)

    def emit(ev: TelemetryEvent) -> None:
        out.append(ev)
        got.set()

    ctx = ObserverContext(**{**context(notices, out).__dict__, "emit": emit})
    obs = Observation(ctx)
    obs.on_message(request("slow"))
    await asyncio.wait_for(got.wait(), 10)
    assert [(e.request_id, e.in_flight) for e in out] == [("slow", True)]
    assert out[0].duration_ms >= 50
    assert not notices.open
    obs.close()
    assert [e.in_flight for e in out] == [True, False]
