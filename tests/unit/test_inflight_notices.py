"""The observer's in-flight notices: one per request still open at ``notice_ms``, none for a
request that ended first, none for forced traffic; one sweeper per process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.config import parse_experiment
from extproc.contract.envoy import ACCESS_LOG
from extproc.dataplane.accesslog import AccessLogService, EntryMapper
from extproc.dataplane.event import EventBuilder
from extproc.dataplane.observer import InflightNotices, Observation, ObserverContext
from extproc.quality.rules import QualityRules
from extproc.routing.decide import Policy
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
    events = EventBuilder(
        experiment="exp",
        recorder="test",
        stable="stable",
        variants=("stable", "canary"),
        policy=Policy.compile(EXPERIMENT),
        rules=QualityRules.compile(EXPERIMENT.spec),
    )
    return ObserverContext(events=events, emit=out.append, notices=notices)


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
        old.seen.variant,
        old.seen.key_hash,
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


def native_entry(rid: str, cluster: str, periodic: bool, age_ms: int = 6000) -> Any:
    e = al.HTTPAccessLogEntry()
    e.request.request_id = rid
    e.request.request_headers["x-conversation-id"] = f"c-{rid}"
    c = e.common_properties
    c.start_time.FromMilliseconds(1_700_000_000_000)
    c.upstream_cluster = cluster
    c.route_name = "weighted"
    if periodic:
        c.access_log_type = al.AccessLogType.DownstreamPeriodic
        c.duration.FromMilliseconds(age_ms)
    else:
        c.access_log_type = al.AccessLogType.DownstreamEnd
        e.response.response_code.value = 200
        e.response.response_headers["x-llm-variant"] = "canary"
        c.time_to_first_downstream_tx_byte.FromMilliseconds(age_ms + 10)
        c.time_to_last_downstream_tx_byte.FromMilliseconds(age_ms + 20)
    return e


async def test_native_periodic_entries_become_one_notice_per_request() -> None:
    doc = {**EXPERIMENT.spec.model_dump(mode="json"), "dataplane": "native"}
    doc["variants"] = {
        "stable": {"cluster": "model_stable", "weight": 50},
        "canary": {"cluster": "model_canary", "weight": 50},
    }
    exp = parse_experiment(doc)
    out: list[TelemetryEvent] = []
    mapper = EntryMapper.for_experiment(exp, EventBuilder.for_experiment(exp, "test"))
    service = AccessLogService(mapper, out.append)

    async def stream() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
        msg = als_pb2.StreamAccessLogsMessage()
        msg.identifier.log_name = ACCESS_LOG
        for e in (
            native_entry("a", "model_canary", periodic=True),
            native_entry("a", "model_canary", periodic=True, age_ms=12_000),  # again: no notice
            native_entry("b", "", periodic=True),  # not routed yet: no notice
            native_entry("l", "model_stable_lane_canary", periodic=True),  # stable's lane
            native_entry("a", "model_canary", periodic=False, age_ms=15_000),
        ):
            msg.http_logs.log_entry.append(e)
        yield msg

    await service.StreamAccessLogs(stream(), None)
    assert [(e.request_id, e.variant, e.in_flight) for e in out] == [
        ("a", "canary", True),
        ("l", "stable", True),
        ("a", "canary", False),
    ]
    notice = out[0]
    assert (notice.time_unix_ms, notice.duration_ms) == (1_700_000_006_000, 6000)
    assert notice.key_hash == out[2].key_hash
    assert notice.assignment == Assignment.ASSIGNMENT_STICKY
    assert service.noticed == {"l": None}  # "a" ended; "l" is still open
