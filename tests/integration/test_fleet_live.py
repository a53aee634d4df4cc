"""Many experiments behind one gateway, live: one Envoy, two fleet sidecar replicas, one fleet
evaluator, and three experiments created one after another while traffic flows.

Chat is selected by the body's model, code by its model too, and legacy completions by the
gateway route. Each ramps on its own schedule; legacy's candidate refuses everything and is rolled
back while the others complete. A category override keeps coding questions to chat on stable
whatever the weights; a model no experiment takes passes through to the gateway's own route.
Through all of it: no client error, no process restarted, and every experiment's events are
exactly the requests the client saw it route.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from extproc.contract import keys
from extproc.dev import stack
from extproc.telemetry.v1.event_pb2 import Assignment, TelemetryEvent
from tests.conftest import run_cli, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MODELS = {
    # name: extra mock-model flags
    "gw-default": [],
    "chat-stable": [],
    "chat-canary": [],
    "code-stable": [],
    "code-canary": [],
    "legacy-stable": [],
    "legacy-canary": ["--refusal-rate", "1"],
}
GUARDRAILS = [
    {"metric": "error_rate", "max_increase": 0.5, "min_samples": 20},
    {"metric": "refusal_rate", "max_increase": 0.1, "min_samples": 20},
]


def experiment(
    name: str, stages: list[float], match: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "salt": f"{name}-salt",
        "stable": "stable",
        "variants": {
            "stable": {"cluster": f"{name}_stable", "weight": 100},
            "canary": {"cluster": f"{name}_canary", "weight": 0},
        },
        "match": match,
        "rollout": {
            "min_stage_seconds": 0.3,
            "min_stage_samples": 15,
            "stages": stages,
            "holdback": 0,
        },
        "guardrails": GUARDRAILS,
        **extra,
    }


@dataclass
class Fleet:
    tmp: Path
    st: stack.Stack
    redis_url: str
    listener: str
    models: dict[str, str]  # name -> host:port
    pids: dict[str, int] = field(default_factory=dict)

    def cli(self, *args: str) -> Any:
        out = run_cli(*args, "--redis-url", self.redis_url)
        assert out.returncode == 0, out.stderr
        return out

    def create(self, doc: dict[str, Any]) -> None:
        for v in ("stable", "canary"):
            doc["variants"][v]["address"] = self.models[f"{doc['name']}-{v}"]
        path = self.tmp / f"{doc['name']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        self.cli("experiment", "create", str(path))

    def status(self, name: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.cli("status", name, "--json").stdout)
        return doc


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    st = stack.Stack(tmp_path / "stack")
    py = [sys.executable, "-m", "extproc"]
    try:
        redis_url = stack.start_redis(st, stack.free_port(), tmp_path)
        models: dict[str, str] = {}
        for name, extra in MODELS.items():
            port = stack.free_port()
            st.spawn(name, [*py, "mock-model", "--port", str(port), "--name", name, *extra])
            models[name] = f"127.0.0.1:{port}"
        for name, where in models.items():
            stack.wait_until(stack.http_ok(f"http://{where}/healthz"), name)
        sidecars = []
        for i in (1, 2):
            port = stack.free_port()
            st.spawn(
                f"sidecar-{i}",
                [
                    *py,
                    "serve",
                    "--all",
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--instance",
                    f"fleet-{i}",
                    "--redis-url",
                    redis_url,
                ],
            )
            stack.wait_until(stack.tcp_ok("127.0.0.1", port), f"sidecar {i}")
            sidecars.append(f"127.0.0.1:{port}")
        st.spawn("evaluator", [*py, "evaluate", "--all", "--redis-url", redis_url])
        gateway = {
            "routes": [
                {
                    "name": "chat",
                    "models": ["chat-1", "chat-1-legacy"],
                    "cluster": "gw_chat",
                    "address": models["chat-stable"],
                },
                {
                    "name": "code",
                    "models": ["code-1"],
                    "cluster": "gw_code",
                    "address": models["code-stable"],
                },
                {
                    "name": "legacy",
                    "prefix": "/v1/completions",
                    "cluster": "gw_legacy",
                    "address": models["legacy-stable"],
                },
                {
                    "name": "default",
                    "prefix": "/",
                    "cluster": "gw_default",
                    "address": models["gw-default"],
                },
            ],
            # A loaded machine must not make Envoy route around the sidecar: every request's
            # filing is what the test counts.
            "message_timeout_ms": 5000,
            "shadow": False,
        }
        gw = tmp_path / "gateway.yaml"
        gw.write_text(yaml.safe_dump(gateway))
        listen, admin = stack.free_port(), stack.free_port()
        cfg = tmp_path / "envoy.yaml"
        out = run_cli(
            "envoy-config",
            "--gateway",
            str(gw),
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(listen),
            "--admin-port",
            str(admin),
            *[a for s in sidecars for a in ("--sidecar", s)],
            "-o",
            str(cfg),
        )
        assert out.returncode == 0, out.stderr
        st.spawn(
            "envoy",
            [
                stack.envoy_binary(),
                "-c",
                str(cfg),
                "--disable-hot-restart",
                "--log-level",
                "warning",
            ],
        )
        stack.wait_until(stack.http_ok(f"http://127.0.0.1:{admin}/ready"), "envoy")
        f = Fleet(tmp_path, st, redis_url, f"http://127.0.0.1:{listen}", models)
        f.pids = {n: p["pid"] for n, p in st.state["processes"].items()}
        yield f
    finally:
        st.stop_all()


@dataclass
class Seen:
    """What the client saw, per kind of request: status codes, and per experiment that routed
    it, the variants."""

    statuses: Counter[int] = field(default_factory=Counter)
    routed: Counter[str] = field(default_factory=Counter)  # experiment -> requests
    passed: int = 0  # requests no experiment took
    variants: dict[str, Counter[str]] = field(default_factory=dict)  # kind -> variants
    overridden: int = 0  # coding requests to chat routed by chat
    failures: list[str] = field(default_factory=list)


KINDS = {
    # kind: (path, model, extra headers)
    "chat": ("/v1/chat/completions", "chat-1", {}),
    "coding": ("/v1/chat/completions", "chat-1", {"x-llm-category": "coding"}),
    "code": ("/v1/chat/completions", "code-1", {}),
    "legacy": ("/v1/completions", "legacy-model", {}),
    "unknown": ("/v1/chat/completions", "mystery-9", {}),
}


def traffic(listener: str, seen: Seen, stop: threading.Event) -> None:
    with httpx.Client(base_url=listener, timeout=30) as http:
        i = 0
        while not stop.is_set():
            for kind, (path, model, extra) in KINDS.items():
                i += 1
                body: dict[str, Any] = {"model": model}
                if path.endswith("completions") and "chat" in path:
                    body["messages"] = [{"role": "user", "content": f"q{i}"}]
                else:
                    body["prompt"] = f"q{i}"
                headers = {"x-conversation-id": f"{kind}-{i}", **extra}
                try:
                    r = http.post(path, json=body, headers=headers)
                except httpx.HTTPError as err:
                    seen.failures.append(f"{kind}: {err!r}")
                    continue
                seen.statuses[r.status_code] += 1
                exp = r.headers.get("x-llm-experiment")
                if exp is None:
                    seen.passed += 1
                    continue
                seen.routed[exp] += 1
                seen.variants.setdefault(kind, Counter())[r.headers.get("x-llm-variant", "")] += 1
                if kind == "coding":
                    seen.overridden += 1


def events(r: redis.Redis, name: str) -> list[TelemetryEvent]:
    out = []
    for _, fields in r.xrange(keys.events(name)):
        ev = TelemetryEvent()
        ev.ParseFromString(fields[keys.EVENT_FIELD])
        if not ev.in_flight:
            out.append(ev)
    return out


def test_three_experiments_created_live_behind_one_envoy(fleet: Fleet) -> None:
    seen, stop = Seen(), threading.Event()
    load = threading.Thread(target=traffic, args=(fleet.listener, seen, stop), daemon=True)
    load.start()
    try:
        wait_for(lambda: seen.passed >= 20, "traffic through the gateway's own routes")
        chat = experiment(
            "chat",
            [20, 50, 100],
            {"models": ["chat-1", "chat-1-legacy"]},
            overrides=[
                {"variant": "stable", "headers": [{"name": "x-llm-category", "values": ["coding"]}]}
            ],
        )
        fleet.create(chat)
        wait_for(lambda: seen.routed["chat"] >= 20, "chat to take its requests")
        fleet.create(experiment("code", [50, 100], {"models": ["code-1"]}))
        wait_for(lambda: seen.routed["code"] >= 20, "code to take its requests")
        fleet.create(experiment("legacy", [30, 100], {"routes": ["legacy"]}))

        def ended(name: str, status: str) -> bool:
            rollout = fleet.status(name)["rollout"]  # None until the evaluator took it up
            return rollout is not None and rollout["status"] == status

        wait_for(lambda: ended("legacy", "rolled_back"), "legacy to be rolled back", 120)
        wait_for(lambda: ended("chat", "completed"), "chat to complete", 120)
        wait_for(lambda: ended("code", "completed"), "code to complete", 120)
    finally:
        stop.set()
        load.join(timeout=60)

    assert seen.failures == []
    assert set(seen.statuses) == {200}
    # The override held at every weight; the unknown model never met an experiment.
    assert seen.variants["coding"] == Counter({"stable": seen.overridden})
    assert "unknown" not in seen.variants
    assert set(seen.variants["chat"]) == {"stable", "canary"}
    r = redis.Redis.from_url(fleet.redis_url)
    for name in ("chat", "code", "legacy"):
        # Exactly the requests the client saw the experiment route, each counted once (the
        # access log's last batch lands a moment after the last answer).
        wait_for(
            lambda name=name: len(events(r, name)) >= seen.routed[name],
            f"every event of {name}",
        )
        recorded = events(r, name)
        assert len(recorded) == seen.routed[name], name
        assert len({e.request_id for e in recorded}) == len(recorded)
        counts = {k.decode(): int(v) for k, v in r.hgetall(keys.counts(name)).items()}
        assert sum(counts.values()) == seen.routed[name]
    pinned = [e for e in events(r, "chat") if e.assignment == Assignment.ASSIGNMENT_OVERRIDE]
    assert len(pinned) == seen.overridden
    assert {e.variant for e in pinned} == {"stable"}
    # Each walked its own stages: chat three, code two; legacy stopped before its last.
    assert fleet.status("chat")["rollout"]["stage"] == 2
    assert fleet.status("code")["rollout"]["stage"] == 1
    # Nothing restarted: the same processes, each still running, and no task of a sidecar
    # restarted by its supervisor.
    assert {n: p["pid"] for n, p in fleet.st.state["processes"].items()} == fleet.pids
    assert all(c["running"] for c in stack.components(fleet.st.state).values())

    def beats() -> list[dict[bytes, bytes]]:
        return [r.hgetall(keys.sidecar(f"fleet-{i}")) for i in (1, 2)]

    def unmatched_reported() -> bool:
        return sum(int(b.get(b"unmatched", 0)) for b in beats()) == seen.passed

    wait_for(unmatched_reported, "the sidecars to report every request no experiment took")
    assert all(b[b"tasks_down"] == b"" for b in beats())


def test_the_gateway_serves_what_no_sidecar_routes(fleet: Fleet) -> None:
    """A request no experiment takes, a client naming a cluster, and every request while no
    sidecar answers: each served by the gateway's own routes, by path and by model."""
    with httpx.Client(base_url=fleet.listener, timeout=30) as http:

        def served_by(model: str, **hdrs: str) -> str:
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            r = http.post("/v1/chat/completions", json=body, headers=hdrs)
            assert r.status_code == 200, r.text
            assert "x-llm-experiment" not in r.headers
            return str(r.json()["model"])  # the stand-in's name: which server answered

        fleet.create(experiment("chat", [50], {"models": ["chat-1"]}))
        wait_for(
            lambda: (
                "x-llm-experiment"
                in http.post(
                    "/v1/chat/completions", json={"model": "chat-1", "messages": []}
                ).headers
            ),
            "chat to take its requests",
        )
        assert served_by("code-1") == "code-stable"  # by the body's model
        assert served_by("mystery-9") == "gw-default"
        # A client cannot send its request to a cluster of its choosing.
        assert served_by("mystery-9", **{"x-llm-cluster": "chat_canary"}) == "gw-default"

        for name in ("sidecar-1", "sidecar-2"):
            pid = fleet.pids[name]
            os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: (
                not any(
                    c["running"]
                    for n, c in stack.components(fleet.st.state).items()
                    if n.startswith("sidecar")
                )
            ),
            "the sidecars to be gone",
        )
        # Chat's requests fall back to the gateway's chat route (its production model, which
        # the body's model selects), unknown ones to the default route; none fails.
        assert {served_by("chat-1") for _ in range(20)} == {"chat-stable"}
        # Also when the client names a charset (Envoy's default reads exact application/json).
        body = json.dumps({"model": "chat-1", "messages": [{"role": "user", "content": "hi"}]})
        r = http.post(
            "/v1/chat/completions",
            content=body,
            headers={"content-type": "application/json; charset=utf-8"},
        )
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "chat-stable"
        assert served_by("mystery-9") == "gw-default"
