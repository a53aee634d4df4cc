"""Faults under load: what users and telemetry see while our parts or a model misbehave.

Each test keeps a steady load running (threads of real HTTP clients through Envoy), injects one
fault into a real process, and counts what the clients saw. The figures printed here are the
ones in docs/RELIABILITY.md (`pytest -s tests/integration/test_faults_load_live.py`).
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from extproc.dev import stack
from extproc.telemetry.v1.event_pb2 import ErrorClass, TelemetryEvent
from tests.conftest import REQUEST_PATH, LiveStack, start_stack, wait_for, write_experiment

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@dataclass
class Result:
    status: int
    variant: str
    request_id: str


@dataclass
class Load:
    """Clients sending chat requests back to back until stopped; every outcome is kept."""

    s: LiveStack
    clients: int = 2
    results: list[Result] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as c:
            while not self.stop.is_set():
                try:
                    r = self.s.chat(c, {"x-conversation-id": str(uuid.uuid4())})
                    res = Result(
                        r.status_code,
                        r.headers.get("x-llm-variant", ""),
                        r.headers.get("x-request-id", ""),
                    )
                    with self.lock:
                        self.results.append(res)
                except httpx.HTTPError as err:
                    with self.lock:
                        self.failures.append(repr(err))

    def __enter__(self) -> Load:
        for _ in range(self.clients):
            t = threading.Thread(target=self._run, daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the clients and wait for their last requests (idempotent)."""
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def count(self) -> int:
        with self.lock:
            return len(self.results)

    def wait_more(self, n: int, what: str) -> int:
        """Wait until ``n`` more requests completed; returns the index where they start."""
        start = self.count()
        wait_for(lambda: self.count() >= start + n, what, timeout_s=60)
        return start

    def since(self, start: int) -> list[Result]:
        with self.lock:
            return list(self.results[start:])

    def non_2xx(self) -> int:
        with self.lock:
            return sum(r.status != 200 for r in self.results) + len(self.failures)


def events(s: LiveStack) -> dict[str, TelemetryEvent]:
    return {ev.request_id: ev for ev in s.events()}


def kill(s: LiveStack, name: str) -> dict[str, Any]:
    """SIGKILL one of the stack's processes and wait until it is gone; returns its record."""
    proc: dict[str, Any] = s.state["processes"][name]
    os.kill(int(proc["pid"]), signal.SIGKILL)
    wait_for(lambda: not stack._alive(proc), f"{name} to die")
    return proc


@contextlib.contextmanager
def restarted(proc: dict[str, Any], env: dict[str, str] | None = None) -> Iterator[None]:
    """A killed process started again with its own command line (and ``env``, the secrets
    `up` gave it in its environment), stopped when the block ends."""
    again = subprocess.Popen(
        proc["argv"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    try:
        yield
    finally:
        again.terminate()
        again.wait(timeout=10)


def report(name: str, load: Load, **figures: object) -> None:
    extra = ", ".join(f"{k} {v}" for k, v in figures.items())
    print(f"\n[{name}] requests {load.count()}, errors seen by clients {load.non_2xx()}, {extra}")


def fixed_split_stack(tmp_path: Path, canary: float, request_timeout_s: float) -> LiveStack:
    """A request path whose split stays put (strategy ab, a stage longer than any test, and no
    evaluator): nothing moves the weights under a fault test."""
    exp = write_experiment(
        tmp_path,
        strategy="ab",
        rollout={"min_stage_seconds": 3600},
        variants={
            "stable": {
                "cluster": "model_stable",
                "address": "127.0.0.1:8001",
                "weight": 100 - canary,
            },
            "canary": {"cluster": "model_canary", "address": "127.0.0.1:8002", "weight": canary},
        },
        envoy={"request_timeout_s": request_timeout_s, "message_timeout_ms": 200},
        inflight={"notice_ms": int(request_timeout_s * 500)},  # noticed before they time out
    )
    return start_stack(tmp_path / "stack", exp, components=REQUEST_PATH)


@pytest.fixture
def canary_stack(tmp_path: Path) -> Iterator[LiveStack]:
    """All live traffic on the canary, so a fallback to stable is visible in every answer."""
    s = fixed_split_stack(tmp_path, canary=100, request_timeout_s=2)
    yield s
    stack.down(s.state_dir)


def test_stalled_sidecar_routes_to_stable_by_message_timeout(
    canary_stack: LiveStack,
) -> None:
    s = canary_stack
    pid = s.pid("sidecar")
    with Load(s) as load:
        load.wait_more(20, "traffic before the fault")
        os.kill(pid, signal.SIGSTOP)  # alive but unresponsive: the slowest sidecar there is
        try:
            stalled = load.since(load.wait_more(20, "traffic while the sidecar is stalled"))
        finally:
            os.kill(pid, signal.SIGCONT)
        during = collections.Counter(r.variant for r in stalled)
        resumed = load.wait_more(1, "traffic after the sidecar resumed")
        wait_for(
            lambda: any(r.variant == "canary" for r in load.since(resumed)),
            "routing to the canary again",
        )
    assert load.non_2xx() == 0, load.failures
    assert during["stable"] >= 15, during  # requests in flight at the stop may still be canary
    assert load.since(0)[0].variant == "canary"
    report("sidecar stalled (SIGSTOP)", load, variants_while_stalled=dict(during))


def test_sidecar_killed_and_restarted_under_load(canary_stack: LiveStack) -> None:
    s = canary_stack
    with Load(s) as load:
        load.wait_more(20, "traffic before the fault")
        proc = kill(s, "sidecar")
        down = load.since(load.wait_more(20, "traffic while the sidecar is dead"))
        with restarted(proc, {"REDIS_URL": s.redis_url}):
            try:
                back = load.wait_more(1, "traffic after the restart")
                wait_for(
                    lambda: any(r.variant == "canary" for r in load.since(back)),
                    "the restarted sidecar to route again",
                )
                after = load.since(load.wait_more(20, "traffic after recovery"))
            finally:
                load.close()
    assert load.non_2xx() == 0, load.failures
    # Only requests already routed when the sidecar died (one per client) may be canary.
    assert sum(r.variant == "canary" for r in down) <= load.clients, down
    # Requests routed after the restart are recorded by the restarted sidecar.
    got = events(s)
    recorded = sum(r.request_id in got for r in after)
    assert recorded == len(after)
    report("sidecar killed and restarted", load, recorded_after_restart=f"{recorded}/{len(after)}")


def test_redis_killed_and_restarted_under_load(canary_stack: LiveStack) -> None:
    s = canary_stack
    with Load(s) as load:
        load.wait_more(20, "traffic before the fault")
        proc = kill(s, "redis")
        outage = load.since(load.wait_more(40, "traffic while redis is down"))
        with restarted(proc):
            wait_for(stack.redis_ok(s.redis_url), "redis to come back")
            load.wait_more(20, "traffic after redis is back")
            load.close()
            ids = {r.request_id for r in outage}
            got = wait_for(
                lambda: (evs := events(s)) and ids <= set(evs) and evs,
                "the outage's buffered events to reach the restarted redis",
            )
    assert load.non_2xx() == 0, load.failures
    assert {r.variant for r in outage} == {"canary"}  # routing kept its last good weights
    report(
        "redis killed and restarted",
        load,
        outage_requests=len(outage),
        outage_events_recorded=sum(i in got for i in ids),
    )


@pytest.fixture
def split_stack(tmp_path: Path) -> Iterator[LiveStack]:
    s = fixed_split_stack(tmp_path, canary=50, request_timeout_s=1)
    yield s
    stack.down(s.state_dir)


@pytest.mark.parametrize(
    ("behaviour", "status", "error"),
    [
        ({"error_rate": 1.0}, 500, ErrorClass.ERROR_CLASS_UPSTREAM_5XX),
        ({"hang_rate": 1.0}, 504, ErrorClass.ERROR_CLASS_TIMEOUT),
    ],
    ids=["5xx", "hang"],
)
def test_a_failing_model_is_charged_to_its_variant_only(
    split_stack: LiveStack, behaviour: dict[str, float], status: int, error: int
) -> None:
    s = split_stack
    canary = s.state["endpoints"]["models"]["canary"]
    httpx.post(f"{canary}/admin/behaviour", json=behaviour, timeout=5).raise_for_status()
    with Load(s, clients=4) as load:
        start = load.wait_more(40, "traffic with a failing canary")
    seen = load.since(start)
    by_variant = collections.Counter((r.variant, r.status) for r in seen)
    assert {st for (v, st) in by_variant if v == "stable"} == {200}, by_variant
    assert {st for (v, st) in by_variant if v == "canary"} == {status}, by_variant
    ids = {r.request_id: r.variant for r in seen}
    got = wait_for(
        lambda: (evs := events(s)) and all(i in evs for i in ids) and evs,
        "every request's event",
    )
    for rid, variant in ids.items():
        ev = got[rid]
        assert ev.variant == variant
        assert ev.error == (error if variant == "canary" else ErrorClass.ERROR_CLASS_NONE)
    report(f"canary {behaviour}", load, by_variant_and_status=dict(by_variant))


def test_bad_input_gets_a_clear_answer_and_serving_goes_on(data_stack: LiveStack) -> None:
    s = data_stack
    with httpx.Client(timeout=30) as c:
        big = "x" * (10 * 1024 * 1024)
        r = s.chat(
            c, {"x-conversation-id": "big-body"}, messages=[{"role": "user", "content": big}]
        )
        assert r.status_code == 200
        r = s.chat(c, {"x-conversation-id": "h" * 100_000})
        assert r.status_code == 431  # Envoy's header limit (60 KiB), before any of our code
        raw = [(b"x-conversation-id", b"\xff\xfe-not-utf8"), (b"x-conversation-id", b"other")]
        payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        first = c.post(f"{s.listener}/v1/chat/completions", json=payload, headers=raw)
        assert first.status_code == 200
        for _ in range(5):  # sticky on the first value, whatever its bytes
            again = c.post(f"{s.listener}/v1/chat/completions", json=payload, headers=raw)
            assert again.headers["x-llm-variant"] == first.headers["x-llm-variant"]
        r = c.post(
            f"{s.listener}/v1/chat/completions",
            content=b'{"model": "m", "messages": [',
            headers={"content-type": "application/json", "x-conversation-id": "truncated"},
        )
        assert r.status_code == 400  # the model server's answer; routing and telemetry unaffected
        assert s.chat(c, {"x-conversation-id": "after"}).status_code == 200
        rid = r.headers["x-request-id"]
    got = wait_for(lambda: events(s).get(rid), "the malformed request's event")
    assert got.status == 400
    assert got.error == ErrorClass.ERROR_CLASS_CLIENT_ERROR


def test_client_disconnect_mid_stream_is_recorded_once(data_stack: LiveStack) -> None:
    s = data_stack
    models = s.state["endpoints"]["models"]
    for url in models.values():
        httpx.post(f"{url}/admin/behaviour", json={"tokens_per_s": 20}, timeout=5)
    try:
        with (
            httpx.Client(timeout=30) as c,
            c.stream(
                "POST",
                f"{s.listener}/v1/chat/completions",
                json={
                    "model": "m",
                    "stream": True,
                    "messages": [{"role": "user", "content": "hi"}],
                },
                headers={"x-conversation-id": "leaves-early"},
            ) as r,
        ):
            rid = r.headers["x-request-id"]
            next(r.iter_raw())  # the first chunk arrived; the user closes the tab
    finally:
        for url in models.values():
            httpx.post(f"{url}/admin/behaviour", json={"tokens_per_s": 0}, timeout=5)

    def recorded() -> list[TelemetryEvent]:
        return [ev for ev in s.events() if ev.request_id == rid]

    (ev,) = wait_for(recorded, "the event of the abandoned stream")
    assert ev.error == ErrorClass.ERROR_CLASS_CLIENT_DISCONNECT
    assert ev.streamed


def envoy_counter(s: LiveStack, name: str) -> int:
    stats = httpx.get(f"{s.state['endpoints']['envoy_admin']}/stats?format=json", timeout=5)
    return sum(
        int(x.get("value", 0)) for x in stats.json()["stats"] if x.get("name", "").endswith(name)
    )


def test_observe_streams_end_with_their_request(data_stack: LiveStack) -> None:
    """Streams to the sidecar stay few under load: each observing stream ends when its event is
    emitted, not 5 s later (Envoy's deferred close), so Envoy's stream limit is never reached
    and no request loses its routing or its event."""
    s = data_stack
    failed_before = envoy_counter(s, "ext_proc.streams_failed")
    open_streams = []
    with Load(s, clients=8) as load:
        for _ in range(10):
            load.wait_more(150, "load")
            open_streams.append(envoy_counter(s, "extproc_sidecar.upstream_rq_active"))
    assert load.non_2xx() == 0
    assert max(open_streams) <= 64, open_streams  # 8 clients: 2 streams each, some in closing
    assert envoy_counter(s, "ext_proc.streams_failed") == failed_before
    report("observe streams", load, open_streams_sampled=open_streams)
