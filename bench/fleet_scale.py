"""What serving many experiments costs: a fleet gateway with 1 and with 50 experiments in Redis,
against bare Envoy, in one run.

    .venv/bin/python bench/fleet_scale.py              # 5 interleaved rounds, 1 and 16 connections
    .venv/bin/python bench/fleet_scale.py --rounds 3 --duration 2 --json

Three Envoys share one upstream (Envoy answering ``direct_response``, as in ``bench/run.py``):

``bare``
    the gateway file's own route and nothing else: no filter but the router, no access log.
``fleet-1``
    ``extproc envoy-config --gateway`` with its fleet sidecar (``serve --all``) over a Redis
    database holding one experiment, which takes the benchmark's requests (model ``m``).
``fleet-50``
    the same over a database holding that experiment and 49 more (models ``m1`` ... ``m49``),
    each with its own clusters: what the sidecar looks up per request and follows in Redis.

Only one Envoy carries load at a time; rounds interleave the three in a rotating order, and every
ratio is taken against bare Envoy of the same round, then the median over rounds (min-max
beside it). The claim to check: fleet-50 within noise of fleet-1, in added latency and in
throughput. Telemetry completeness compares each fleet's events in Redis with the requests its
Envoy completed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import redis
from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)

from extproc.contract import keys
from extproc.contract.clusters import typed
from extproc.dev import stack
from extproc.envoyconf.common import EnvoyLayout
from extproc.envoyconf.fleet import build_fleet
from extproc.envoyconf.gateway import parse_gateway

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxies import to_json, upstream_config
from run import LUA, BenchError, _envoy_argv, envoy_stats, need_wrk

CONFIGS = ("bare", "fleet-1", "fleet-50")
MODEL = "m"  # what bench/wrk_conversations.lua asks for


def experiment(name: str, model: str, upstream: str) -> dict[str, Any]:
    return {
        "name": name,
        "salt": f"{name}-salt",
        "stable": "stable",
        "variants": {
            "stable": {"cluster": f"{name}_stable", "address": upstream, "weight": 90},
            "canary": {"cluster": f"{name}_canary", "address": upstream, "weight": 10},
        },
        "match": {"models": [model]},
    }


def in_db(redis_url: str, db: int) -> str:
    """The same server, another database (each fleet has its own experiments)."""
    return f"{redis_url.rsplit('/', 1)[0]}/{db}"


def bare(boot: Bootstrap) -> dict[str, Any]:
    """The fleet bootstrap with everything of ours taken out: the gateway's route alone."""
    del boot.static_resources.clusters[0]  # the sidecar
    manager = hcm.HttpConnectionManager()
    listener = boot.static_resources.listeners[0]
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    del manager.route_config.virtual_hosts[0].routes[0]  # the experiment route
    del manager.http_filters[:-1]
    manager.ClearField("early_header_mutation_extensions")
    manager.ClearField("access_log")
    manager.ClearField("access_log_options")
    listener.filter_chains[0].filters[0].typed_config.CopyFrom(typed(manager))
    del boot.static_resources.listeners[1:]
    kept = [c for c in boot.static_resources.clusters if c.name == "gateway"]
    del boot.static_resources.clusters[:]
    boot.static_resources.clusters.extend(kept)
    return to_json(boot)


def wrk(port: int, connections: int, duration_s: int, tag: str) -> dict[str, Any]:
    out = subprocess.run(
        [need_wrk(), "-t1", f"-c{connections}", f"-d{duration_s}s", "--timeout", "5s",
         "-s", str(LUA), f"http://127.0.0.1:{port}", "--", tag],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    line = next(x for x in out.stdout.splitlines() if x.startswith("BENCH_JSON "))
    w: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
    return {
        "rps": w["requests"] / (w["duration_us"] / 1e6),
        "p50_ms": w["p50_us"] / 1000,
        "errors": sum(v for k, v in w.items() if k.startswith("errors_")),
    }


def median_span(xs: list[float]) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def run(rounds: int, duration: int, levels: list[int], work: Path) -> dict[str, Any]:
    procs = stack.Stack(work / "procs")
    free = stack.free_port
    py = [sys.executable, "-m", "extproc"]
    try:
        redis_url = stack.start_redis(procs, free(), work)
        up_port, up_admin = free(), free()
        (work / "upstream.json").write_text(json.dumps(upstream_config(up_port, up_admin, None)))
        procs.spawn("upstream", _envoy_argv(work / "upstream.json", 1))
        upstream = f"127.0.0.1:{up_port}"
        gateway = parse_gateway(
            {"routes": [{"name": "default", "cluster": "gateway", "address": upstream}],
             "shadow": False}
        )  # fmt: skip
        envoys: dict[str, tuple[int, int]] = {}
        dbs = {"fleet-1": 1, "fleet-50": 2}
        for name in CONFIGS:
            listen, admin = free(), free()
            envoys[name] = (listen, admin)
            sidecar = free()
            layout = EnvoyLayout(
                listen_host="127.0.0.1", listen_port=listen, admin_port=admin,
                sidecar=f"127.0.0.1:{sidecar}",
            )  # fmt: skip
            boot = build_fleet(gateway, layout)
            cfg = work / f"envoy-{name}.json"
            if name == "bare":
                cfg.write_text(json.dumps(bare(boot)))
            else:
                db = in_db(redis_url, dbs[name])
                r = redis.Redis.from_url(db)
                count = 1 if name == "fleet-1" else 50
                for i in range(count):
                    doc = experiment(f"bench-{i}", MODEL if i == 0 else f"m{i}", upstream)
                    path = work / f"{name}-{i}.json"
                    path.write_text(json.dumps(doc))
                    subprocess.run(
                        [*py, "experiment", "create", str(path), "--redis-url", db],
                        check=True, capture_output=True,
                    )  # fmt: skip
                r.close()
                procs.spawn(
                    f"sidecar-{name}",
                    [*py, "serve", "--all", "--redis-url", db, "--listen",
                     f"127.0.0.1:{sidecar}", "--instance", name],
                )  # fmt: skip
                stack.wait_until(stack.tcp_ok("127.0.0.1", sidecar), f"sidecar {name}")
                cfg.write_text(json.dumps(to_json(boot)))
            procs.spawn(f"envoy-{name}", _envoy_argv(cfg, 1))
        for name, (_, admin) in [("upstream", (0, up_admin)), *envoys.items()]:
            stack.wait_until(stack.http_ok(f"http://127.0.0.1:{admin}/ready"), name)
        for listen, _ in envoys.values():  # warm up: connections, on-demand clusters
            wrk(listen, 16, 1, "warm")
        runs: list[dict[str, Any]] = []
        for c in levels:
            for rnd in range(rounds):
                k = (rnd + c) % len(CONFIGS)
                for name in CONFIGS[k:] + CONFIGS[:k]:
                    x = wrk(envoys[name][0], c, duration, f"r{rnd}c{c}")
                    runs.append({"config": name, "connections": c, "round": rnd, **x})
                    print(f"c={c:<3} round {rnd + 1}/{rounds} {name:<9}{x['rps']:>8.0f} req/s "
                          f"p50 {x['p50_ms']:.3f} ms", file=sys.stderr, flush=True)  # fmt: skip
        time.sleep(1.5)  # the last batched access logs
        # Totals since start, warm-up included: every request the fleet's Envoy received (a run's
        # end cuts some short: those are events too).
        completed = {
            n: envoy_stats(a).get("http.llm.downstream_rq_total", 0) for n, (_, a) in envoys.items()
        }
        events = {n: _events(redis_url, dbs[n]) for n in dbs}
        fifty = (envoys["fleet-50"][0], in_db(redis_url, dbs["fleet-50"]))
        live_s = [time_to_live(*fifty, upstream, i, work) for i in range(5)]
    finally:
        procs.stop_all()
    return {"runs": runs, "completed": completed, "events": events, "live_s": live_s}


def time_to_live(port: int, db: str, upstream: str, i: int, work: Path) -> float:
    """Seconds from `extproc experiment create` returning to the first request the new
    experiment routes (the sidecars' notice, and Envoy discovering its clusters on demand)."""
    name = f"late-{i}"
    path = work / f"{name}.json"
    path.write_text(json.dumps(experiment(name, name, upstream)))
    body = json.dumps({"model": name, "messages": [{"role": "user", "content": "hi"}]}).encode()
    subprocess.run(
        [sys.executable, "-m", "extproc", "experiment", "create", str(path), "--redis-url",
         str(db)], check=True, capture_output=True, text=True,
    )  # fmt: skip
    created = time.monotonic()
    while True:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=body,
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            if resp.headers.get("x-llm-experiment") == name:
                return time.monotonic() - created
        time.sleep(0.01)


def _events(redis_url: str, db: int) -> int:
    r = redis.Redis.from_url(in_db(redis_url, db))
    try:
        return sum(int(v) for v in r.hgetall(keys.counts("bench-0")).values())
    finally:
        r.close()


def summarise(result: dict[str, Any], levels: list[int]) -> list[dict[str, Any]]:
    runs = result["runs"]
    rows = []
    for c in levels:
        by = {(x["config"], x["round"]): x for x in runs if x["connections"] == c}
        rounds = sorted({r for _, r in by})
        for name in CONFIGS:
            mine = [by[(name, r)] for r in rounds]
            row: dict[str, Any] = {
                "config": name,
                "connections": c,
                "rps": median_span([x["rps"] for x in mine]),
                "p50_ms": median_span([x["p50_ms"] for x in mine]),
                "errors": sum(x["errors"] for x in mine),
            }
            if name != "bare":
                bare_ = [by[("bare", r)] for r in rounds]
                row["rps_ratio"] = median_span(
                    [x["rps"] / b["rps"] for x, b in zip(mine, bare_, strict=True)]
                )
                row["added_p50_ms"] = median_span(
                    [x["p50_ms"] - b["p50_ms"] for x, b in zip(mine, bare_, strict=True)]
                )
            if name == "fleet-50":
                one = [by[("fleet-1", r)] for r in rounds]
                row["vs_fleet_1_rps"] = median_span(
                    [x["rps"] / o["rps"] for x, o in zip(mine, one, strict=True)]
                )
                row["vs_fleet_1_p50_ms"] = median_span(
                    [x["p50_ms"] - o["p50_ms"] for x, o in zip(mine, one, strict=True)]
                )
            rows.append(row)
    return rows


def _fmt(m: tuple[float, float, float], spec: str) -> str:
    return f"{m[0]:{spec}} ({m[1]:{spec}}..{m[2]:{spec}})"


def render(rows: list[dict[str, Any]], result: dict[str, Any]) -> str:
    lines = [
        f"{'config':<9} {'conns':>5}  {'req/s':>22}  {'vs bare':>20}  {'added p50 ms':>24}",
    ]
    for row in rows:
        ratio = _fmt(row["rps_ratio"], ".2f") if "rps_ratio" in row else "1"
        added = _fmt(row["added_p50_ms"], "+.3f") if "added_p50_ms" in row else "0"
        lines.append(
            f"{row['config']:<9} {row['connections']:>5}  {_fmt(row['rps'], '.0f'):>22}  "
            f"{ratio:>20}  {added:>24}"
        )
    lines.append("")
    lines.append("fleet-50 against fleet-1 of the same round (median, min..max):")
    for row in rows:
        if row["config"] == "fleet-50":
            lines.append(
                f"  {row['connections']:>2} conns: req/s x{_fmt(row['vs_fleet_1_rps'], '.3f')}, "
                f"p50 {_fmt(row['vs_fleet_1_p50_ms'], '+.3f')} ms"
            )
    lines.append("")
    for name in ("fleet-1", "fleet-50"):
        lines.append(
            f"{name}: {result['events'][name]} events for {result['completed'][name]} "
            "requests received"
        )
    live = result["live_s"]
    lines.append(
        f"a new experiment routing its first request after `experiment create`: "
        f"{statistics.median(live):.2f} s median of {len(live)} (max {max(live):.2f} s)"
    )
    errors = sum(r["errors"] for r in rows)
    lines.append(f"wrk errors: {errors}; CPUs: {os.cpu_count()}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=2, help="whole seconds per wrk run")
    ap.add_argument("--connections", default="1,16")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        need_wrk()
    except BenchError as err:
        print(err, file=sys.stderr)
        return 2
    levels = [int(c) for c in args.connections.split(",")]
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        result = run(args.rounds, args.duration, levels, Path(tmp))
    rows = summarise(result, levels)
    if args.json:
        shown = ("completed", "events", "live_s")
        print(json.dumps({"summary": rows, **{k: result[k] for k in shown}}))
    else:
        print(render(rows, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
