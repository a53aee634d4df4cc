"""Scale-out: two sidecar replicas behind one Envoy, worker processes, and the health service.

Replicas share nothing but Redis, so what must hold is that they decide alike (assignment is a
pure function of salt, key and weights) and that a weight change, above all a rollback, reaches
every one of them. The propagation times are printed as figures, never asserted (they depend on
the machine; `bench/` measures them).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from extproc.config import load_experiment
from extproc.contract import keys
from extproc.dev import stack
from tests.conftest import REQUEST_PATH, LiveStack, start_stack, wait_for
from tests.integration.sidecar_probe import (
    apply_and_measure,
    events_by_request,
    expected_variants,
    health,
    heartbeats,
    report,
    variants_of,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

NAME = "chat-upgrade"
EXTPROC = (sys.executable, "-m", "extproc")
FAST_MODELS = {"stable": ["--fast"], "canary": ["--fast"]}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    s = start_stack(
        tmp_path_factory.mktemp("scaleout"),
        sidecars=2,
        mock_args=FAST_MODELS,
        components=REQUEST_PATH,
    )
    try:
        yield s
    finally:
        stack.down(s.state_dir)


def streams_per_replica(s: LiveStack, http: httpx.Client) -> dict[str, int]:
    """Envoy's count of ext_proc streams sent to each sidecar endpoint."""
    text = http.get(f"{s.state['endpoints']['envoy_admin']}/clusters").text
    out = {}
    for line in text.splitlines():
        cluster, _, rest = line.partition("::")
        host, _, stat = rest.partition("::")
        if cluster == "extproc_sidecar" and stat.startswith("rq_total::"):
            out[host] = int(stat.rpartition("::")[2])
    return out


def ask_each_replica(s: LiveStack, conversations: list[str]) -> list[dict[str, str]]:
    answers = []
    for address in s.state["endpoints"]["sidecars"]:
        with grpc.insecure_channel(address) as channel:
            answers.append(variants_of(channel, conversations))
    return answers


def test_replicas_assign_every_conversation_alike(replicas: LiveStack, http: httpx.Client) -> None:
    s = replicas
    exp = load_experiment(s.experiment_path)
    weights = {"stable": 50.0, "canary": 50.0}
    s.set_weights(**weights)
    assert len(heartbeats(s)) == 2
    convs = [f"scale-{uuid.uuid4()}" for _ in range(120)]
    expected = expected_variants(exp, weights, convs)
    assert set(expected.values()) == {"stable", "canary"}
    conversation_of: dict[str, str] = {}
    for _turn in range(3):
        for c in convs:
            r = s.chat(http, {"x-conversation-id": c})
            assert r.status_code == 200
            assert r.headers["x-llm-variant"] == expected[c], c
            assert r.headers["x-mock-model"] == expected[c]
            conversation_of[r.headers["x-request-id"]] = c

    by_id = wait_for(
        lambda: events_by_request(s, NAME, set(conversation_of)), "an event for every request"
    )
    for ev in by_id.values():
        assert ev.variant == expected[conversation_of[ev.request_id]]
    # Events come from Envoy's access-log stream, held by one replica or the other; the routing
    # streams of the same conversations went to both (below).
    assert {ev.recorder for ev in by_id.values()} <= set(heartbeats(s))

    per_replica = streams_per_replica(s, http)
    assert len(per_replica) == 2
    assert all(n > 0 for n in per_replica.values()), per_replica
    assert ask_each_replica(s, convs) == [expected, expected]


def test_weight_change_and_rollback_reach_both_replicas(
    replicas: LiveStack, http: httpx.Client
) -> None:
    s = replicas
    exp = load_experiment(s.experiment_path)
    half, ramp_down, rollback = (
        {"stable": 50.0, "canary": 50.0},
        {"stable": 80.0, "canary": 20.0},
        {"stable": 100.0, "canary": 0.0},
    )
    s.set_weights(**half)
    convs = [f"move-{uuid.uuid4()}" for _ in range(200)]
    at_half = expected_variants(exp, half, convs)

    change = apply_and_measure(s, exp, half, ramp_down)
    at_twenty = expected_variants(exp, ramp_down, convs)
    assert ask_each_replica(s, convs) == [at_twenty, at_twenty]
    # A ramp down only takes conversations off the candidate, never puts new ones on it.
    assert all(at_half[c] == "canary" for c in convs if at_twenty[c] == "canary")

    back = apply_and_measure(s, exp, ramp_down, rollback)
    assert ask_each_replica(s, convs) == [dict.fromkeys(convs, "stable")] * 2
    for c in convs[:100]:
        r = s.chat(http, {"x-conversation-id": c})
        assert (r.headers["x-llm-variant"], r.headers["x-mock-model"]) == ("stable", "stable")

    report("weight change", change)
    report("rollback", back)


def _serve(redis_url: str, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*EXTPROC, "serve", "--redis-url", redis_url, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _two_free_ports() -> int:
    """A port whose next one is free too (worker 1 serves /metrics on PORT+1)."""
    for _ in range(100):
        port = stack.free_port()
        if port < 65535 and not stack.port_in_use(port + 1):
            return port
        port = stack.free_port()
        if port > 1024 and not stack.port_in_use(port - 1):
            return port - 1
    raise AssertionError("no two consecutive free ports")


def test_workers_share_one_port_and_are_supervised(redis_url: str, tmp_path: Path) -> None:
    import redis

    port, metrics = stack.free_port(), _two_free_ports()
    proc = _serve(
        redis_url,
        tmp_path / "serve.log",
        *("--workers", "2", "--instance", "wk", "--listen", f"127.0.0.1:{port}"),
        *("--metrics", f"127.0.0.1:{metrics}"),
    )
    r = redis.Redis.from_url(redis_url)

    def pids() -> dict[str, int] | None:
        got = {i: r.hget(keys.sidecar(f"wk-w{i}"), "pid") for i in ("0", "1")}
        return None if None in got.values() else {i: int(p or 0) for i, p in got.items()}

    try:
        first = wait_for(pids, "both workers' heartbeats")
        assert first["0"] != first["1"]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_for(lambda: health(channel) == "SERVING", "SERVING on the shared port")
        for m in (metrics, metrics + 1):
            assert stack.http_ok(f"http://127.0.0.1:{m}/metrics")()

        os.kill(first["0"], signal.SIGKILL)
        restarted = wait_for(
            lambda: (p := pids()) and p["0"] != first["0"] and _alive(p["0"]) and p,
            "the supervisor to restart worker 0",
        )
        ppid = int(Path(f"/proc/{restarted['0']}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert ppid == proc.pid
        assert restarted["1"] == first["1"]  # the other worker was left alone

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not any(_alive(p) for p in restarted.values())
    finally:
        if proc.poll() is None:
            proc.kill()  # its workers get SIGTERM from the kernel (parent-death signal)
            proc.wait(timeout=10)
    assert "restarting" in (tmp_path / "serve.log").read_text()


def test_workers_refuse_a_unix_socket(tmp_path: Path) -> None:
    out = subprocess.run(
        [*EXTPROC, "serve", "--workers", "2", "--listen", f"unix:{tmp_path}/s.sock"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert "Unix socket cannot be shared" in out.stderr


def test_health_is_serving_only_once_routing_is_loaded(tmp_path: Path) -> None:
    """No Redis yet: the replica knows only the file's weights and says NOT_SERVING."""
    st = stack.Stack(tmp_path)
    port, redis_port = stack.free_port(), stack.free_port()
    url = f"redis://127.0.0.1:{redis_port}/0"
    st.spawn(
        "sidecar",
        [*EXTPROC, "serve", "--redis-url", url, "--listen", f"127.0.0.1:{port}"],
    )
    try:
        wait_for(stack.tcp_ok("127.0.0.1", port), "the sidecar to listen")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert health(channel) == "NOT_SERVING"
            assert health(channel, "") == "NOT_SERVING"
            st.spawn(
                "redis",
                [
                    stack.redis_binary(),
                    "--port",
                    str(redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                ],
            )
            wait_for(lambda: health(channel) == "SERVING", "SERVING once Redis is there")
            assert health(channel, "") == "SERVING"
    finally:
        st.stop_all()
