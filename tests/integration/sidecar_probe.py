"""Probes of sidecar replicas: what each decides, what it should decide, how fast changes land.

Through Envoy a request's routing stream may go to any replica; asking each replica directly, over
gRPC, for the same keys is how the tests tell that every replica decides alike and that each one
applied a change. ``apply_and_measure`` times a weight change from the Redis write to every
replica's heartbeat and to the first request served under it.

Those times are measured and reported, not bounded: the pub/sub notice and the 0.5 s poll make a
change land well within a second (README), but on a busy machine a process may wait that long for a
core, and a wall-clock bound would then fail a change that did land. What must hold, and is checked,
is that it lands on every replica and that requests are then assigned under the new weights.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from typing import Any

import grpc
import httpx
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.config import Experiment
from extproc.contract import headers as h
from extproc.contract import keys
from extproc.contract.assignment import bucket_of, compile_table, salt_key
from extproc.contract.envoy import SIDECAR_SERVICE
from extproc.telemetry.v1.event_pb2 import Assignment, TelemetryEvent
from tests.conftest import LiveStack, wait_for

PROPAGATION_WAIT_S = 30.0  # how long a change may take to land before the test fails


def variants_of(channel: grpc.Channel, conversations: list[str]) -> dict[str, str]:
    """The variant one replica routes each conversation to (its answer to Envoy)."""
    stub = pb_grpc.ExternalProcessorStub(channel)
    out = {}
    for conv in conversations:
        hdrs = HeaderMap(headers=[HeaderValue(key="x-conversation-id", raw_value=conv.encode())])
        req = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=hdrs))
        resp = next(iter(stub.Process(iter([req]), timeout=5)))
        mutation = resp.request_headers.response.header_mutation
        out[conv] = next(
            o.header.raw_value.decode() for o in mutation.set_headers if o.header.key == h.VARIANT
        )
    return out


def expected_variants(
    exp: Experiment, weights: Mapping[str, float], conversations: list[str]
) -> dict[str, str]:
    """The assignment computed from the experiment alone (extproc/contract/assignment.py)."""
    table = compile_table(exp.variant_names, exp.stable, weights)
    salt = salt_key(exp.spec.salt)
    return {c: table.variant_for(bucket_of(salt, c.encode())) for c in conversations}


def health(channel: grpc.Channel, service: str = SIDECAR_SERVICE) -> str:
    """The replica's gRPC health status name (SERVING, NOT_SERVING, ...)."""
    stub = health_pb2_grpc.HealthStub(channel)
    resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


def heartbeats(s: LiveStack) -> dict[str, dict[bytes, bytes]]:
    r = s.redis()
    names = [m.decode() for m in r.zrange(keys.SIDECARS, 0, -1)]
    beats = {name: r.hgetall(keys.sidecar(name)) for name in names}
    return {name: beat for name, beat in beats.items() if beat}


def events_by_request(
    s: LiveStack, experiment: str, ids: set[str]
) -> dict[str, TelemetryEvent] | None:
    """The events of these requests, once every one of them has landed (else None)."""
    out = {}
    for _id, fields in s.redis().xrange(keys.events(experiment)):
        ev = TelemetryEvent()
        ev.ParseFromString(fields[keys.EVENT_FIELD])
        if ev.request_id in ids:
            out[ev.request_id] = ev
    return out if len(out) == len(ids) else None


def _probe_for(exp: Experiment, before: dict[str, float], after: dict[str, float]) -> str:
    """A conversation whose variant the change moves (canary before, stable after)."""
    for i in range(10_000):
        c = f"probe-{i}"
        if (
            expected_variants(exp, before, [c])[c]
            == "canary"
            != expected_variants(exp, after, [c])[c]
        ):
            return c
    raise AssertionError("no conversation moves with this change")


def apply_and_measure(
    s: LiveStack, exp: Experiment, before: dict[str, float], after: dict[str, float]
) -> dict[str, Any]:
    """Change the weights with the CLI; time from the Redis write until every replica's heartbeat
    reports the new version, and until the first request through Envoy is served under it.

    A request can also come back from stable because the sidecar missed Envoy's deadline (Envoy
    then falls back to stable): only answers whose event says the sidecar assigned them count.
    """
    r = s.redis()
    old = json.loads(r.get(keys.routing(exp.name)) or b"{}")["version"]
    replicas = set(heartbeats(s))
    probe = _probe_for(exp, before, after)
    beats_at: list[float] = []
    answers: list[tuple[float, str]] = []  # (time, request id) of answers off the candidate
    done = threading.Event()

    def watch_heartbeats() -> None:
        while not done.is_set():
            beats = heartbeats(s)
            if all(int(beats.get(i, {}).get(b"routing_version", 0)) > old for i in replicas):
                beats_at.append(time.time())
                return
            done.wait(0.002)

    def probe_once(client: httpx.Client) -> None:
        resp = s.chat(client, {"x-conversation-id": probe})
        if resp.headers["x-llm-variant"] != "canary":
            answers.append((time.time(), resp.headers["x-request-id"]))

    def send_probes() -> None:
        with httpx.Client(timeout=5) as client:
            while not done.is_set() and len(answers) < 5:
                probe_once(client)

    threads = [threading.Thread(target=watch_heartbeats), threading.Thread(target=send_probes)]
    for t in threads:
        t.start()
    try:
        out = s.cli(
            "experiment", "set-weights", exp.name, *(f"{k}={v}" for k, v in after.items()), "--json"
        )
        assert out.returncode == 0, out.stderr
        version = int(json.loads(out.stdout)["version"])
        doc = json.loads(r.get(keys.routing(exp.name)) or b"{}")
        assert doc["version"] == version == old + 1
        written = float(doc["updated_at"])  # wall clock of the writer, just before the write
        for t in threads:  # the deadline counts from the write, not from now
            t.join(max(0.0, written + PROPAGATION_WAIT_S - time.time()))
    finally:
        done.set()
        for t in threads:
            t.join()
    late = f"not within {PROPAGATION_WAIT_S:.0f} s of the write"
    assert beats_at, f"{late}: every replica's heartbeat"
    assert answers, f"{late}: a request under the new weights"

    def first_assigned() -> float | None:
        """When the first answer the sidecar assigned under the new weights came back. A loaded
        sidecar may miss Envoy's deadline (then Envoy falls back to stable): probe on until one."""
        events = events_by_request(s, exp.name, {rid for _t, rid in answers})
        if events is None:
            return None  # not all landed yet
        assigned = [
            t for t, rid in answers if events[rid].assignment == Assignment.ASSIGNMENT_STICKY
        ]
        if assigned:
            return min(assigned)
        with httpx.Client(timeout=5) as client:
            probe_once(client)
        return None

    first: float = wait_for(first_assigned, "a request the sidecar assigned under the new weights")
    first_request = first - written
    return {
        "version": version,
        "heartbeats_ms": round((beats_at[0] - written) * 1000, 1),
        "first_request_ms": round(first_request * 1000, 1),
    }


def report(what: str, m: dict[str, Any]) -> None:
    """Print the figures (seen with ``pytest -s`` or ``-rP``). Not ``record_property``: under
    ``--junitxml`` with the default junit family (xunit2) it warns, and warnings are errors."""
    print(
        f"{what} (version {m['version']}): every replica's heartbeat after "
        f"{m['heartbeats_ms']:.0f} ms, first request under the new weights after "
        f"{m['first_request_ms']:.0f} ms (from the Redis write)"
    )
