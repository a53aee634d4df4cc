"""In-flight notices from Envoy's periodic access-log entries: one per request still open at
``notice_ms``, none for a request not routed yet, a lane counted as stable's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.accesslog.v3 import als_pb2

from extproc.config import parse_experiment
from extproc.contract.envoy import ACCESS_LOG
from extproc.dataplane.accesslog import AccessLogService, EntryMapper
from extproc.dataplane.event import EventBuilder
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
    service = AccessLogService(lambda _entry: mapper, out.append)

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
