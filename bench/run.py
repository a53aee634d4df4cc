"""The performance benchmark: what the sidecar costs over bare Envoy, measured in one run.

    .venv/bin/python bench/run.py            # ~5 min: every configuration, streaming, profile
    .venv/bin/python bench/run.py --quick    # ~2 min: bare, minimal ext_proc, both shipped planes
    .venv/bin/python bench/run.py --json     # the same, as one JSON document on stdout
    .venv/bin/python bench/run.py --configs bare,ext_proc,route --rounds 6   # a chosen subset

Why it is built this way:

* One upstream for every path, and a cheap one (Envoy answering ``direct_response`` with a fixed
  chat completion), so the upstream is never what limits throughput and every difference between
  paths is the proxy's.
* Each configuration (``bench/proxies.py``: bare Envoy, the two shipped data planes, and
  variants that each change one thing) is its own Envoy (``--concurrency 1`` by default: on a
  2-core machine a second worker only competes with the load generator) with its own sidecar or
  access-log sink and its own experiment name (so its Redis counters are its own). Only one
  configuration carries load at a time; the others idle. ``native`` is measured only once its
  Envoy holds the weights the sidecar serves over RTDS.
* The machine is shared and noisy, so configurations run in interleaved rounds (the order rotates
  each round) and latency and throughput are reported as a ratio or difference against bare
  Envoy *of the same round*, then the median over rounds.
* Counts and CPU are totals over each connection level, taken from the level's start to 1.5 s
  after its end: batched access logs land up to 1 s late, and a per-run window would miss that
  work. Per-round CPU (each run's own window) gives the min-max shown beside the total.
  CPU is utime+stime of the configuration's own processes from ``/proc/<pid>/stat``; Redis and
  the load generator are reported apart.
* Load: ``wrk`` (Debian package) with ``bench/wrk_conversations.lua``, which sends a new
  ``x-conversation-id`` on every request. Requests, non-2xx, ext_proc message counts, failed
  ext_proc streams and the requests each variant's cluster received come from Envoy's own
  counters; telemetry completeness compares the events in Redis with completed requests.
* Streaming: the mock model streams a 500-chunk SSE answer (paced at ``--stream-tps``, so each
  chunk is its own network write, as with a real model); a Python client on a raw socket records
  time to first token and to the last byte per configuration, interleaved; the telemetry each
  configuration recorded for those streams (TTFT, tokens) is read back from Redis.
* Profile: ``py-spy record`` on the sidecar under 16-connection load; the top frames are printed
  and the collapsed stacks saved (``bench/results/``, or under ``--keep``).

Results and their interpretation: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis

from extproc.config import EXAMPLE_EXPERIMENT, Experiment, load_experiment
from extproc.contract import keys
from extproc.dev import stack
from extproc.envoyconf import inspector
from extproc.envoyconf.common import EnvoyLayout
from extproc.telemetry.events import decode_event

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxies import PROXIES, Proxy, envoy_runtime, native_layer, to_json, upstream_config

BENCH = Path(__file__).resolve().parent
LUA = BENCH / "wrk_conversations.lua"
TICK = os.sysconf("SC_CLK_TCK")
STAT_FILTER = (
    r"^(http\.llm\.|cluster\.extproc_|cluster\.model_[a-z]+\.upstream_rq_total|access_logs\.)"
)
STREAM_BODY = json.dumps(
    {
        "model": "m",
        "messages": [{"role": "user", "content": "tell me a long story"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 500,
    }
).encode()
FIRST_TOKEN = re.compile(rb'"content":"[^"]')
LINGER_S = 1.5  # the access logger's flush (0.1 s shipped, 1 s in hash-als), plus slack


class BenchError(Exception):
    """Something the user must fix (a missing tool); the message says how."""


# --- processes ------------------------------------------------------------------------------


def _stat_ticks(stat: Path) -> tuple[str, int]:
    """The command name and utime + stime (clock ticks) of a ``/proc`` stat file."""
    comm, rest = stat.read_text().split("(", 1)[1].rsplit(")", 1)
    fields = rest.split()
    return comm, int(fields[11]) + int(fields[12])


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads, live and exited), in clock ticks."""
    return _stat_ticks(Path(f"/proc/{pid}/stat"))[1]


def worker_ticks(pid: int) -> int:
    """utime + stime of an Envoy's worker threads (named ``wrk:worker_N``), in clock ticks: the
    request path, its access log and its filters, without the main thread (xDS, stats, admin).
    What a request costs Envoy itself, whatever else the machine runs."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            comm, ticks = _stat_ticks(task / "stat")
            if comm.startswith("wrk:worker_"):
                total += ticks
    return total


def children_cpu_s() -> float:
    """CPU seconds of reaped children: wrk's, since it is the only child that exits mid-run."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def need_wrk() -> str:
    found = shutil.which("wrk")
    if not found:
        raise BenchError(
            "wrk is not installed. On Debian/Ubuntu: `apt-get install -y wrk` (as root), "
            "on macOS: `brew install wrk`; then run this again."
        )
    return found


def envoy_stats(admin_port: int) -> dict[str, int]:
    url = f"http://127.0.0.1:{admin_port}/stats?usedonly&filter={quote(STAT_FILTER)}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.isdigit():
            out[name] = int(value)
    return out


@dataclass
class Running:
    """Every process of the benchmark, started under one state folder."""

    procs: stack.Stack
    redis_url: str
    upstream_port: int
    envoys: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (listen, admin)
    experiments: dict[str, Experiment] = field(default_factory=dict)  # one per configuration

    def pid(self, name: str) -> int:
        return int(self.procs.state["processes"][name]["pid"])

    def has(self, name: str) -> bool:
        return name in self.procs.state["processes"]


def _wait_envoy(run: Running, name: str, admin: int) -> None:
    stack.wait_until(
        stack.http_ok(f"http://127.0.0.1:{admin}/ready"),
        name,
        alive=lambda: run.procs.check_running(name),
    )


def _envoy_argv(config: Path, concurrency: int) -> list[str]:
    return [
        stack.envoy_binary(),
        "-c",
        str(config),
        "--disable-hot-restart",
        "--log-level",
        "warning",
        "--concurrency",
        str(concurrency),
    ]


def start_all(
    workdir: Path, proxies: list[Proxy], concurrency: int, stream_tps: float | None
) -> Running:
    """Redis, the upstream (and the streaming mock), the sidecar, the access-log sink, and one
    Envoy per configuration; returns when every one answers."""
    procs = stack.Stack(workdir / "procs")
    free = stack.free_port
    redis_port = free()
    redis_url = stack.start_redis(procs, redis_port, workdir)

    stream_port = None
    py = [sys.executable, "-m", "extproc"]
    if stream_tps is not None:
        stream_port = free()
        procs.spawn(
            "stream-model",
            [
                *py,
                "mock-model",
                "--port",
                str(stream_port),
                "--name",
                "stream",
                "--tokens-per-s",
                str(stream_tps),
                "--completion-tokens",
                "1000",  # uniform +/-50%: never under 500, and max_tokens cuts it to 500
            ],
        )
    up_port, up_admin = free(), free()
    up_cfg = workdir / "upstream.json"
    up_cfg.write_text(json.dumps(upstream_config(up_port, up_admin, stream_port)))
    procs.spawn("upstream", _envoy_argv(up_cfg, 1))

    run = Running(procs, redis_url, up_port)
    local, envoy_env, why = inspector.for_local_envoy()
    print(
        f"inspector: {local}" + (f" (the module did not build: {why})" if why else ""),
        file=sys.stderr,
    )
    base = load_experiment(EXAMPLE_EXPERIMENT).to_json_dict()
    for name, v in base["variants"].items():
        v["address"] = f"127.0.0.1:{up_port}"
        v["weight"] = 90 if name == base["stable"] else 10
    waits: list[tuple[str, int]] = []
    for p in proxies:
        # An experiment per configuration, so that each one's events are counted apart (Redis
        # keys carry the experiment name) even when a late flush overlaps the next run.
        exp_path = workdir / f"experiment-{p.name}.json"
        doc = {**base, "name": f"bench-{p.name}", "dataplane": p.dataplane}
        exp_path.write_text(json.dumps(doc))
        exp = run.experiments[p.name] = load_experiment(exp_path)
        sidecar_port, als_port = free(), free()
        if p.sidecar:
            procs.spawn(
                f"sidecar-{p.name}",
                [
                    *py,
                    "serve",
                    "--experiment",
                    str(exp_path),
                    "--redis-url",
                    redis_url,
                    "--listen",
                    f"127.0.0.1:{sidecar_port}",
                    "--instance",
                    p.name,
                ],
            )
            waits.append((f"sidecar-{p.name}", sidecar_port))
        if p.helper:
            procs.spawn(
                f"helper-{p.name}",
                [
                    sys.executable,
                    str(BENCH / p.helper),
                    "--experiment",
                    str(exp_path),
                    "--listen",
                    f"127.0.0.1:{als_port}",
                    "--redis-url",
                    redis_url,
                    *p.helper_args,
                ],
            )
            waits.append((f"helper-{p.name}", als_port))
        listen, admin = free(), free()
        layout = EnvoyLayout(
            listen_host="127.0.0.1",
            listen_port=listen,
            admin_port=admin,
            shadow_port=free(),
            sidecar=f"127.0.0.1:{sidecar_port}",
            upstreams=dict.fromkeys(exp.variant_names, f"127.0.0.1:{up_port}"),
            inspector=p.inspector or local,
        )
        cfg = workdir / f"envoy-{p.name}.json"
        cfg.write_text(json.dumps(to_json(p.build(exp, layout, f"127.0.0.1:{als_port}"))))
        procs.spawn(f"envoy-{p.name}", _envoy_argv(cfg, concurrency), env=envoy_env)
        run.envoys[p.name] = (listen, admin)

    _wait_envoy(run, "upstream", up_admin)
    if stream_port is not None:
        stack.wait_until(
            stack.http_ok(f"http://127.0.0.1:{stream_port}/healthz"),
            "stream model",
            alive=lambda: procs.check_running("stream-model"),
        )
    for name, port in waits:
        stack.wait_until(
            stack.tcp_ok("127.0.0.1", port),
            name,
            alive=lambda name=name: procs.check_running(name),  # type: ignore[misc]
        )
    for name, (_, admin) in run.envoys.items():
        _wait_envoy(run, f"envoy-{name}", admin)
    for p in proxies:
        if p.dataplane == "native":
            _wait_native_weights(run, p.name)
    return run


def _wait_native_weights(run: Running, name: str) -> None:
    """Envoy under ``dataplane: native`` starts with every request on stable (its static
    weights) and gets the real ones from the sidecar's RTDS layer, which may come after Envoy is
    ready (the layer's initial fetch times out after 2 s, then Envoy retries with back-off).
    Measuring before it holds them would put a round all on stable."""
    want = native_layer(run.experiments[name])
    admin = run.envoys[name][1]

    def holds() -> bool:
        got = envoy_runtime(admin)
        return all(got.get(k) == v for k, v in want.items())

    def alive() -> None:
        run.procs.check_running(f"envoy-{name}")
        run.procs.check_running(f"sidecar-{name}")

    try:
        stack.wait_until(holds, f"envoy-{name}: weights from RTDS", timeout_s=60, alive=alive)
    except stack.StackError as err:
        got = envoy_runtime(admin)
        raise stack.StackError(f"{err}; Envoy's runtime: {got}, wanted {want}") from None


# --- one load run ---------------------------------------------------------------------------


def proxy_pids(run: Running, proxy: Proxy) -> list[int]:
    """The processes that serve one configuration and nothing else."""
    names = [f"envoy-{proxy.name}"]
    if proxy.sidecar:
        names.append(f"sidecar-{proxy.name}")
    if proxy.helper:
        names.append(f"helper-{proxy.name}")
    return [run.pid(n) for n in names]


def proxy_cpu(run: Running, proxy: Proxy) -> int:
    return sum(cpu_ticks(p) for p in proxy_pids(run, proxy))


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def events_recorded(r: redis.Redis, exp: str) -> Counter[str]:
    """Events the configuration's telemetry wrote, per variant: the exact counters."""
    counts: dict[bytes, bytes] = r.hgetall(keys.counts(exp))  # type: ignore[assignment]
    return Counter({k.decode(): int(v) for k, v in counts.items()})


def load_run(
    run: Running,
    proxy: Proxy,
    connections: int,
    duration_s: float,
    tag: str,
) -> dict[str, Any]:
    """One wrk run against one configuration, with everything counted around it."""
    listen, admin = run.envoys[proxy.name]
    pids = proxy_pids(run, proxy)
    extra = {"redis": run.pid("redis"), "upstream": run.pid("upstream")}
    stats0 = envoy_stats(admin)
    cpu0 = sum(cpu_ticks(p) for p in pids)
    extra0 = {k: cpu_ticks(p) for k, p in extra.items()}
    wrk0 = children_cpu_s()
    out = subprocess.run(
        [
            need_wrk(),
            "-t1",
            f"-c{connections}",
            f"-d{round(duration_s)}s",  # wrk takes whole seconds
            "--timeout",
            "5s",
            "-s",
            str(LUA),
            f"http://127.0.0.1:{listen}",
            "--",
            tag,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    wrk_cpu = children_cpu_s() - wrk0
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out.stdout}\n{out.stderr}")
    w: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
    cpu = sum(cpu_ticks(p) for p in pids) - cpu0
    d = _delta(envoy_stats(admin), stats0)
    n = max(w["requests"], 1)
    received = d.get("http.llm.downstream_rq_total", 0)
    completed = d.get("http.llm.downstream_rq_completed", 0)
    return {
        "proxy": proxy.name,
        "connections": connections,
        "requests": w["requests"],
        "rps": w["requests"] / (w["duration_us"] / 1e6),
        "p50_ms": w["p50_us"] / 1000,
        "p90_ms": w["p90_us"] / 1000,
        "p99_ms": w["p99_us"] / 1000,
        "mean_ms": w["lat_mean_us"] / 1000,
        "wrk_errors": sum(v for k, v in w.items() if k.startswith("errors_")),
        "received": received,
        "non_2xx": completed - d.get("http.llm.downstream_rq_2xx", 0),
        "run_cpu_us_per_req": cpu / TICK * 1e6 / n,
        "redis_cpu_us_per_req": (cpu_ticks(extra["redis"]) - extra0["redis"]) / TICK * 1e6 / n,
        "upstream_cpu_us_per_req": (cpu_ticks(extra["upstream"]) - extra0["upstream"])
        / TICK
        * 1e6
        / n,
        "wrk_cpu_share": wrk_cpu / duration_s,
        "envoy": d,
    }


# --- aggregation ----------------------------------------------------------------------------


@dataclass
class LevelTotals:
    """One configuration's totals over one connection level (see ``summarise``)."""

    cpu_us: float
    envoy_cpu_us: float  # the configuration's Envoy alone
    worker_cpu_us: float  # its worker threads alone
    envoy: Counter[str]
    events: Counter[str]


class LevelMeter:
    """Snapshots each configuration's CPU, Envoy counters and events at a level's start."""

    def __init__(self, run: Running, r: redis.Redis, names: list[str]) -> None:
        self.run, self.r, self.names = run, r, names
        self.cpu = {n: proxy_cpu(run, PROXIES[n]) for n in names}
        self.envoy_cpu = {n: cpu_ticks(run.pid(f"envoy-{n}")) for n in names}
        self.worker_cpu = {n: worker_ticks(run.pid(f"envoy-{n}")) for n in names}
        self.stats = {n: envoy_stats(run.envoys[n][1]) for n in names}
        self.events = {n: events_recorded(r, run.experiments[n].name) for n in names}

    def totals(self) -> dict[str, LevelTotals]:
        out = {}
        for n in self.names:
            cpu = (proxy_cpu(self.run, PROXIES[n]) - self.cpu[n]) / TICK * 1e6
            pid = self.run.pid(f"envoy-{n}")
            envoy_cpu = (cpu_ticks(pid) - self.envoy_cpu[n]) / TICK * 1e6
            worker_cpu = (worker_ticks(pid) - self.worker_cpu[n]) / TICK * 1e6
            envoy = Counter(_delta(envoy_stats(self.run.envoys[n][1]), self.stats[n]))
            events = events_recorded(self.r, self.run.experiments[n].name) - self.events[n]
            out[n] = LevelTotals(cpu, envoy_cpu, worker_cpu, envoy, events)
        return out


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _span(xs: list[float]) -> tuple[float, float]:
    """min and max over rounds: how far one round can be from the median on this machine."""
    return (min(xs), max(xs)) if xs else (float("nan"), float("nan"))


def summarise(
    runs: list[dict[str, Any]],
    names: list[str],
    levels: list[int],
    totals: dict[int, dict[str, LevelTotals]],
) -> list[dict[str, Any]]:
    """Per configuration and connection count: medians over rounds, and the per-round paired
    ratio (or difference) against bare Envoy of the same round, medianed.

    Counts and CPU are exact totals rather than per round (``totals``): each configuration has
    processes of its own, so their CPU, Envoy's counters and the events in Redis from the start
    of the level to a linger after its end hold all of the level's work and nothing else,
    including work that ends after a run (streams Envoy closes 5 s later, batched logs)."""
    rows = []
    for c in levels:
        bare = {x["round"]: x for x in runs if x["proxy"] == "bare" and x["connections"] == c}
        for name in names:
            mine = [x for x in runs if x["proxy"] == name and x["connections"] == c]
            if not mine:
                continue
            paired = [(x, bare[x["round"]]) for x in mine if x["round"] in bare]
            total = sum(x["requests"] for x in mine)
            t = totals[c][name]
            envoy = t.envoy
            received = envoy["http.llm.downstream_rq_total"]
            completed = envoy["http.llm.downstream_rq_completed"]

            def per_req(stat: str, envoy: Counter[str] = envoy, received: int = received) -> float:
                return envoy[stat] / received if received else 0.0

            bare_t = totals[c]["bare"]
            bare_completed = max(bare_t.envoy["http.llm.downstream_rq_completed"], 1)
            bare_cpu = bare_t.cpu_us / bare_completed
            worker_cpu = t.worker_cpu_us / max(completed, 1)
            row: dict[str, Any] = {
                "proxy": name,
                "connections": c,
                "rounds": len(mine),
                "requests": total,
                "rps": _median([x["rps"] for x in mine]),
                "p50_ms": _median([x["p50_ms"] for x in mine]),
                "p90_ms": _median([x["p90_ms"] for x in mine]),
                "p99_ms": _median([x["p99_ms"] for x in mine]),
                "non_2xx": completed - envoy["http.llm.downstream_rq_2xx"],
                "wrk_errors": sum(x["wrk_errors"] for x in mine),
                "received": received,
                "completed": completed,
                "client_resets": envoy["http.llm.downstream_rq_rx_reset"],
                "events": t.events.total(),
                "canary_share": t.events["canary"] / max(t.events.total(), 1),
                # what Envoy actually sent to each variant's cluster: the routing ground truth
                "canary_routed": envoy["cluster.model_canary.upstream_rq_total"]
                / max(
                    envoy["cluster.model_canary.upstream_rq_total"]
                    + envoy["cluster.model_stable.upstream_rq_total"],
                    1,
                ),
                "proxy_cpu_us_per_req": t.cpu_us / max(completed, 1),
                "envoy_cpu_us_per_req": t.envoy_cpu_us / max(completed, 1),
                "helper_cpu_us_per_req": (t.cpu_us - t.envoy_cpu_us) / max(completed, 1),
                "worker_cpu_us_per_req": worker_cpu,
                # Envoy's throughput against bare's where its worker has a core to itself (the
                # sidecar on cores of its own): bare's worker CPU per request over this one's.
                "worker_capacity": bare_t.worker_cpu_us / bare_completed / max(worker_cpu, 1e-9),
                "redis_cpu_us_per_req": _median([x["redis_cpu_us_per_req"] for x in mine]),
                "wrk_cpu_share": _median([x["wrk_cpu_share"] for x in mine]),
                "rps_ratio": _median([x["rps"] / b["rps"] for x, b in paired]),
                "rps_ratio_span": _span([x["rps"] / b["rps"] for x, b in paired]),
                "added_p50_ms": _median([x["p50_ms"] - b["p50_ms"] for x, b in paired]),
                "added_p50_span": _span([x["p50_ms"] - b["p50_ms"] for x, b in paired]),
                "cpu_round_span": _span([x["run_cpu_us_per_req"] for x in mine]),
                "added_p99_ms": _median([x["p99_ms"] - b["p99_ms"] for x, b in paired]),
                "cpu_ratio": t.cpu_us / max(completed, 1) / bare_cpu,
                "route_msgs_per_req": per_req("http.llm.ext_proc.route.stream_msgs_sent"),
                "route_replies_per_req": per_req("http.llm.ext_proc.route.stream_msgs_received"),
                "streams_per_req": per_req("http.llm.ext_proc.route.streams_started"),
                "route_timeouts": envoy["http.llm.ext_proc.route.message_timeouts"],
                "failure_mode_allowed": envoy["http.llm.ext_proc.route.failure_mode_allowed"],
                "streams_failed": envoy["http.llm.ext_proc.route.streams_failed"],
                # Envoy's circuit breaker on the sidecar cluster: any overflow fails streams open
                "sidecar_overflow": envoy["cluster.extproc_sidecar.upstream_rq_active_overflow"]
                + envoy["cluster.extproc_sidecar.upstream_rq_pending_overflow"],
                "als_logs_written": envoy["access_logs.grpc_access_log.logs_written"],
                "als_logs_dropped": envoy["access_logs.grpc_access_log.logs_dropped"],
            }
            rows.append(row)
    return rows


# --- streaming ------------------------------------------------------------------------------


def stream_once(port: int, conv: str) -> tuple[float, float, int]:
    """One streamed chat completion on a fresh connection; returns (TTFT ms, last byte ms,
    body bytes). TTFT is the first received byte sequence holding a non-empty ``content``."""
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
        f"x-bench-stream: 1\r\nx-conversation-id: {conv}\r\n"
        f"content-length: {len(STREAM_BODY)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray()
        ttft = None
        t0 = time.perf_counter()
        s.sendall(head + STREAM_BODY)
        while True:
            chunk = s.recv(65536)
            now = time.perf_counter()
            if not chunk:
                raise RuntimeError("connection closed before the end of the stream")
            buf += chunk
            if ttft is None and FIRST_TOKEN.search(buf):
                ttft = now
            if buf.endswith(b"\r\n0\r\n\r\n"):
                break
    if not buf.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"stream answered {bytes(buf[:60])!r}")
    assert ttft is not None
    return (ttft - t0) * 1000, (now - t0) * 1000, len(buf)


def recorded_stream_telemetry(r: redis.Redis, exp: str, n: int) -> dict[str, Any]:
    """What the configuration's telemetry recorded for its last ``n`` (streamed) requests: the
    check that a cheaper telemetry path still measures TTFT and tokens."""
    entries: list[tuple[bytes, dict[bytes, bytes]]] = r.xrevrange(  # type: ignore[assignment]
        keys.events(exp), count=n
    )
    evs = [e for e in (decode_event(f) for _, f in entries) if e is not None]
    ttft = [e.first_token_ms for e in evs if e.HasField("first_token_ms")]
    tokens = [e.completion_tokens for e in evs if e.HasField("completion_tokens")]
    return {
        "events": len(evs),
        "ttft_p50_ms": _median(ttft) if ttft else None,
        "completion_tokens_p50": _median([float(t) for t in tokens]) if tokens else None,
    }


def streaming(
    run: Running, r: redis.Redis, names: list[str], pairs: int, linger_s: float
) -> dict[str, Any]:
    """Interleaved streams through each configuration (the order alternates per pair)."""
    ttft: dict[str, list[float]] = {n: [] for n in names}
    last: dict[str, list[float]] = {n: [] for n in names}
    for n in names:  # warm-up: connections to the upstream, the model's first answer
        stream_once(run.envoys[n][0], "warm")
    cpu0 = {n: proxy_cpu(run, PROXIES[n]) for n in names}
    stats0 = {n: envoy_stats(run.envoys[n][1]) for n in names}
    for i in range(pairs):
        order = names if i % 2 == 0 else names[::-1]
        for n in order:
            a, b, _ = stream_once(run.envoys[n][0], f"s{i}")
            ttft[n].append(a)
            last[n].append(b)
    time.sleep(linger_s)
    cpu = {n: proxy_cpu(run, PROXIES[n]) - cpu0[n] for n in names}
    sent = {
        n: _delta(envoy_stats(run.envoys[n][1]), stats0[n]).get(
            "http.llm.ext_proc.route.stream_msgs_sent", 0
        )
        for n in names
    }
    out: dict[str, Any] = {"pairs": pairs, "configs": {}}
    for n in names:
        out["configs"][n] = {
            "ttft_p50_ms": _median(ttft[n]),
            "ttft_max_ms": max(ttft[n]),
            "last_byte_p50_ms": _median(last[n]),
            "proxy_cpu_ms_per_stream": cpu[n] / TICK * 1000 / pairs,
            "route_msgs_per_stream": sent[n] / pairs,
            "added_ttft_ms": _median([a - b for a, b in zip(ttft[n], ttft["bare"], strict=True)]),
            "added_last_byte_ms": _median(
                [a - b for a, b in zip(last[n], last["bare"], strict=True)]
            ),
            "last_byte_ratio": _median([a / b for a, b in zip(last[n], last["bare"], strict=True)]),
        }
        if PROXIES[n].telemetry:
            got = recorded_stream_telemetry(r, run.experiments[n].name, pairs)
            out["configs"][n]["recorded"] = got
    return out


# --- profile --------------------------------------------------------------------------------


def _frame_name(frame: str) -> str:
    """``handler (extproc/dataplane/server.py:57)`` -> ``handler (extproc/dataplane/server.py)``:
    lines apart, a function is one entry."""
    return re.sub(r":\d+\)$", ")", frame)


def top_frames(collapsed: Path, n: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed (raw) output."""
    selfs: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack_text.split(";") if f]
        if not frames:
            continue
        total += count
        selfs[frames[-1]] += count
        for f in set(frames[1:]):  # the first entry is the thread
            incl[f] += count
    if not total:
        return {"samples": 0, "self": [], "inclusive": []}
    return {
        "samples": total,
        "self": [(f, round(100 * c / total, 1)) for f, c in selfs.most_common(n)],
        "inclusive": [(f, round(100 * c / total, 1)) for f, c in incl.most_common(n)],
    }


def profile(
    run: Running, proxy: Proxy, duration_s: float, out_dir: Path, native: bool
) -> dict[str, Any]:
    """py-spy on the sidecar of ``proxy`` while it carries 16-connection load."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {"error": "py-spy not installed: `.venv/bin/pip install py-spy`"}
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "sidecar-collapsed.txt"
    argv = [
        spy,
        "record",
        "--pid",
        str(run.pid(f"sidecar-{proxy.name}")),
        "--duration",
        f"{int(duration_s)}",
        "--rate",
        "200",
        "--format",
        "raw",
        "--output",
        str(raw),
        # --nonblocking reads without pausing the process (less distortion) but cannot unwind
        # native frames; --native pauses it for each sample.
        "--native" if native else "--nonblocking",
    ]
    spy_proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    load = load_run(run, proxy, 16, duration_s, "profile")
    _, err = spy_proc.communicate(timeout=duration_s + 30)
    if spy_proc.returncode != 0 or not raw.exists():
        return {"error": f"py-spy failed: {err.decode(errors='replace')[-500:]}"}
    return {
        "config": proxy.name,
        "file": str(raw),
        "rps": load["rps"],
        "native": native,
        **top_frames(raw),
    }


# --- output ---------------------------------------------------------------------------------


def render(result: dict[str, Any]) -> str:
    lines = [
        f"bench/run.py: {result['rounds']} interleaved rounds of {result['duration_s']:g} s per "
        f"configuration and connection count; Envoy --concurrency {result['concurrency']}; "
        f"{os.cpu_count()} CPUs",
        "",
    ]
    lines.append("Against bare Envoy, median over rounds [min-max of the rounds]:")
    lines.append(
        f"{'config':<17}{'conn':>5}{'req/s':>7}{'x bare':>7}{'[min-max]':>13}{'+p50 ms':>9}"
        f"{'[min-max]':>16}{'cpu us/req':>11}{'x bare':>7}{'[rounds]':>12}{'non2xx':>7}"
        f"{'events/reqs':>14}{'canary':>7}"
    )
    for row in result["summary"]:
        telemetry = PROXIES[row["proxy"]].telemetry
        ev = f"{row['events']}/{row['received']}" if telemetry else "-"
        r0, r1 = row["rps_ratio_span"]
        p0, p1 = row["added_p50_span"]
        c0, c1 = row["cpu_round_span"]
        lines.append(
            f"{row['proxy']:<17}{row['connections']:>5}{row['rps']:>7.0f}{row['rps_ratio']:>7.2f}"
            f"{f'[{r0:.2f}-{r1:.2f}]':>13}{row['added_p50_ms']:>+9.3f}"
            f"{f'[{p0:+.2f},{p1:+.2f}]':>16}{row['proxy_cpu_us_per_req']:>11.0f}"
            f"{row['cpu_ratio']:>7.2f}{f'[{c0:.0f}-{c1:.0f}]':>12}"
            f"{row['non_2xx'] + row['wrk_errors']:>7}{ev:>14}{100 * row['canary_routed']:>6.1f}%"
        )
    lines.append("")
    lines.append("Latency tails and ext_proc messages:")
    head = f"{'config':<16}{'conn':>5}{'p50 ms':>8}{'p90 ms':>8}{'p99 ms':>8}{'+p99':>8}{'msgs':>6}"
    lines.append(head)
    for row in result["summary"]:
        msgs = row["route_msgs_per_req"]
        lines.append(
            f"{row['proxy']:<16}{row['connections']:>5}"
            f"{row['p50_ms']:>8.3f}{row['p90_ms']:>8.3f}{row['p99_ms']:>8.3f}"
            f"{row['added_p99_ms']:>+8.2f}{msgs:>6.2f}"
        )
    lines.append("")
    lines.append(
        "x bare, +p50, +p99 (ms): per round against bare Envoy of the same round, median over "
        "rounds.\ncpu: Envoy (+ sidecar / helper) utime+stime per request over the level "
        "(rounds: each run's own window). "
        "events/reqs: events in Redis / requests Envoy received (wrk's last requests of a run, "
        "cut off when it stops, are received, logged and not completed). "
        "\ncanary: share of requests Envoy "
        "sent to the canary cluster (configured: 10%). msgs: ext_proc messages Envoy sent per "
        "request."
    )
    lines.append("")
    lines.append(
        "CPU per request, us (Envoy, its worker thread / sidecar or ALS sink; Redis apart), and "
        "Envoy's capacity against bare's with a core to itself (bare's worker CPU per request "
        "over this one's):"
    )
    for row in result["summary"]:
        envoy, helper = row["envoy_cpu_us_per_req"], row["helper_cpu_us_per_req"]
        lines.append(
            f"  {row['proxy']:<17}c={row['connections']:<3} Envoy {envoy:>6.0f}   worker "
            f"{row['worker_cpu_us_per_req']:>6.0f}   helper {helper:>6.0f}   Redis "
            f"{row['redis_cpu_us_per_req']:>4.0f}   wrk {100 * row['wrk_cpu_share']:>3.0f}% of a "
            f"core   capacity {row['worker_capacity']:.2f}"
        )
    notes = []
    for row in result["summary"]:
        bad = {
            k: row[k]
            for k in (
                "route_timeouts",
                "failure_mode_allowed",
                "streams_failed",
                "sidecar_overflow",
                "als_logs_dropped",
            )
            if row[k]
        }
        if bad:
            notes.append(f"  {row['proxy']} c={row['connections']}: {bad}")
        if row["wrk_cpu_share"] > 0.9:
            notes.append(
                f"  {row['proxy']} c={row['connections']}: wrk used {row['wrk_cpu_share']:.0%} "
                "of a core: the load generator may be the limit"
            )
    if notes:
        lines += ["Warnings:", *notes]
    s = result.get("streaming")
    if s:
        lines += [
            "",
            f"Streaming: 500-chunk SSE answer at {result['stream_tps']:g} tokens/s, {s['pairs']} "
            "interleaved streams per configuration",
            f"{'config':<16}{'TTFT p50':>10}{'+TTFT':>8}{'last p50':>10}{'+last':>8}"
            f"{'last x':>8}{'cpu ms/stream':>14}{'msgs':>6}",
        ]
        for n, c in s["configs"].items():
            rec = c.get("recorded")
            seen = ""
            if rec:
                ttft = rec["ttft_p50_ms"]
                seen = "   recorded TTFT p50 " + ("-" if ttft is None else f"{ttft:.2f} ms")
                seen += f", tokens p50 {rec['completion_tokens_p50']}"
            lines.append(
                f"{n:<16}{c['ttft_p50_ms']:>10.2f}{c['added_ttft_ms']:>+8.2f}"
                f"{c['last_byte_p50_ms']:>10.1f}{c['added_last_byte_ms']:>+8.2f}"
                f"{c['last_byte_ratio']:>8.4f}{c['proxy_cpu_ms_per_stream']:>14.2f}"
                f"{c['route_msgs_per_stream']:>6.0f}{seen}"
            )
    p = result.get("profile")
    if p:
        lines += [""]
        if "error" in p:
            lines.append(f"Profile: {p['error']}")
        else:
            lines.append(
                f"Profile of the sidecar (py-spy, {p['samples']} samples, {p['rps']:.0f} req/s "
                f"through {p['config']!r}; collapsed stacks: {p['file']})"
            )
            lines.append("  self time:")
            lines += [f"    {share:5.1f}%  {f}" for f, share in p["self"]]
            lines.append("  inclusive:")
            lines += [f"    {share:5.1f}%  {f}" for f, share in p["inclusive"]]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------


@contextlib.contextmanager
def workspace(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="extproc-bench-") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="bare, minimal, ext_proc and native only; no streaming, no profile (~2 min)",
    )
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument(
        "--configs",
        help=f"comma-separated, from {','.join(PROXIES)} "
        "(default: all; --quick: bare,minimal,ext_proc,native)",
    )
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--duration", type=int, help="whole seconds per wrk run (default 2)")
    ap.add_argument("--connections", default="1,16", help="comma-separated connection counts")
    ap.add_argument("--concurrency", type=int, default=1, help="Envoy worker threads per proxy")
    ap.add_argument("--stream-pairs", type=int, help="streams per config (default 16; --quick 6)")
    ap.add_argument("--stream-tps", type=float, default=1000.0, help="mock model tokens/s")
    ap.add_argument("--no-stream", action="store_true")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, help="py-spy the sidecar")
    ap.add_argument("--native-frames", action="store_true", help="py-spy --native (C frames too)")
    ap.add_argument("--keep", type=Path, help="keep configs, logs and the profile in this folder")
    args = ap.parse_args(argv)

    quick = args.quick
    names = (
        args.configs or ("bare,minimal,ext_proc,native" if quick else ",".join(PROXIES))
    ).split(",")
    unknown = [n for n in names if n not in PROXIES]
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {list(PROXIES)}")
    if "bare" not in names:
        names.insert(0, "bare")
    rounds = args.rounds
    duration = args.duration or 2
    levels = [int(c) for c in args.connections.split(",")]
    pairs = args.stream_pairs or (6 if quick else 16)
    do_profile = args.profile if args.profile is not None else not quick
    stream = not args.no_stream and not quick and len(names) > 1
    try:
        need_wrk()
    except BenchError as err:
        print(err, file=sys.stderr)
        return 2

    proxies = [PROXIES[n] for n in names]
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    result: dict[str, Any] = {
        "rounds": rounds,
        "duration_s": duration,
        "concurrency": args.concurrency,
        "connections": levels,
        "configs": {n: PROXIES[n].summary for n in names},
        "stream_tps": args.stream_tps,
        "cpus": os.cpu_count(),
    }
    started = time.monotonic()
    with workspace(args.keep) as work:
        run = start_all(work, proxies, args.concurrency, args.stream_tps if stream else None)
        r = redis.Redis.from_url(run.redis_url)
        try:
            took = time.monotonic() - started
            log(f"started {len(run.envoys)} proxies in {took:.1f}s; warming up")
            for p in proxies:
                load_run(run, p, 16, 1.0, "warm")
            # Work a run leaves behind is counted in its level: wait it out after each level.
            linger = LINGER_S
            time.sleep(linger)
            runs: list[dict[str, Any]] = []
            totals: dict[int, dict[str, LevelTotals]] = {}
            for c in levels:
                meter = LevelMeter(run, r, names)
                for rnd in range(rounds):
                    k = (rnd + c) % len(names)
                    for n in names[k:] + names[:k]:
                        x = load_run(run, PROXIES[n], c, duration, f"r{rnd}c{c}")
                        x["round"] = rnd
                        runs.append(x)
                        log(
                            f"c={c:<3} round {rnd + 1}/{rounds} {n:<16}{x['rps']:>8.0f} req/s "
                            f"p50 {x['p50_ms']:.3f} ms"
                        )
                time.sleep(linger)  # batched access logs
                totals[c] = meter.totals()
            result["runs"] = runs
            result["summary"] = summarise(runs, names, levels, totals)
            if stream:
                log("streaming")
                streamed = ("bare", "ext_proc", "native", "hash-als")
                shown = [n for n in streamed if n in names]
                result["streaming"] = streaming(run, r, shown, pairs, linger)
            target = next((n for n in ("ext_proc", "native") if n in names), None)
            if do_profile and target is not None:
                log(f"profiling the sidecar of {target}")
                result["profile"] = profile(
                    run,
                    PROXIES[target],
                    8.0 if not quick else 4.0,
                    work / "profile",
                    args.native_frames,
                )
                if not args.keep and "file" in result["profile"]:
                    keep = BENCH / "results"
                    keep.mkdir(exist_ok=True)
                    dest = keep / "sidecar-collapsed.txt"
                    shutil.copy(result["profile"]["file"], dest)
                    result["profile"]["file"] = str(dest)
        finally:
            r.close()
            run.procs.stop_all()
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(render(result))
        print(f"\n(total {result['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
