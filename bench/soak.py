"""Soak: a bounded run at moderate load, watching for slow leaks in the sidecar.

Starts the local stack with fast stand-ins, keeps ``--clients`` HTTP clients busy through Envoy
for ``--minutes``, and every ``--every`` seconds samples the sidecar's resident memory, the gRPC
streams open to the sidecar (Envoy's gauge) and the telemetry totals. At the end it waits for the
telemetry writer to flush and compares the events recorded in Redis with the requests the
clients saw answered.

    .venv/bin/python bench/soak.py --minutes 10 --clients 4

Pass/fail is printed, not asserted: flat memory after warm-up (last sample within 10% of the
sample at 20% of the run), open streams back to the number of clients' in-flight requests at
the end, no stream Envoy gave up on, and events == requests.
"""

from __future__ import annotations

import argparse
import http.client
import json
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from extproc.config import EXAMPLE_EXPERIMENT, load_experiment
from extproc.contract import keys
from extproc.contract.envoy import SIDECAR_CLUSTER
from extproc.dev import stack

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def envoy_stats(admin: str) -> dict[str, int]:
    """Envoy's counters and gauges of the ext_proc filters and the sidecar's cluster."""
    host, port = admin.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.request("GET", f"/stats?format=json&filter=(ext_proc|{SIDECAR_CLUSTER})")
    stats = json.loads(conn.getresponse().read())["stats"]
    conn.close()
    return {s["name"]: int(s["value"]) for s in stats if "value" in s}


def open_streams(admin: str) -> int:
    """gRPC streams to the sidecar open right now (Envoy's active-request gauge)."""
    return envoy_stats(admin)[f"cluster.{SIDECAR_CLUSTER}.upstream_rq_active"]


def failed_streams(admin: str) -> int:
    """Streams Envoy gave up on (and so routed by failure_mode_allow): the sidecar's faults."""
    return sum(v for k, v in envoy_stats(admin).items() if k.endswith("ext_proc.streams_failed"))


class Clients:
    def __init__(self, port: int, n: int) -> None:
        self.port, self.ok, self.bad = port, 0, 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(n)]

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stop.is_set():
            headers = {"content-type": "application/json", "x-conversation-id": str(uuid.uuid4())}
            try:
                conn.request("POST", "/v1/chat/completions", BODY, headers)
                resp = conn.getresponse()
                resp.read()
                good = resp.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                good = False
            with self.lock:
                if good:
                    self.ok += 1
                else:
                    self.bad += 1
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--every", type=float, default=30, help="seconds between samples")
    args = ap.parse_args()
    exp = load_experiment(EXAMPLE_EXPERIMENT)
    with tempfile.TemporaryDirectory() as tmp:
        opts = stack.UpOptions(
            experiment=exp,
            experiment_path=EXAMPLE_EXPERIMENT,
            state_dir=Path(tmp),
            mock_models=True,
            auto_ports=True,
            mock_args={v: ["--fast"] for v in exp.variant_names},
        )
        state = stack.up(opts)
        try:
            run(state, args)
        finally:
            stack.down(Path(tmp))


def run(state: dict[str, Any], args: argparse.Namespace) -> None:
    ep = state["endpoints"]
    port = int(ep["listener"].rsplit(":", 1)[1])
    pid = int(state["processes"]["sidecar"]["pid"])
    r = redis.Redis.from_url(ep["redis"])
    clients = Clients(port, args.clients)
    for t in clients.threads:
        t.start()
    t0 = time.monotonic()
    samples: list[tuple[float, int, int, int]] = []
    print("| minute | requests | sidecar RSS (MiB) | gRPC streams open | events in Redis |")
    print("|---|---|---|---|---|")
    while True:
        elapsed = time.monotonic() - t0
        streams = open_streams(ep["envoy_admin"])
        events = int(r.xlen(keys.events(exp_name(r))))
        with clients.lock:
            done = clients.ok + clients.bad
        samples.append((elapsed, rss_kib(pid), streams, done))
        print(
            f"| {elapsed / 60:.1f} | {done} | {samples[-1][1] / 1024:.1f} | {streams} | {events} |",
            flush=True,
        )
        if elapsed >= args.minutes * 60:
            break
        clients.stop.wait(args.every)
    clients.stop.set()
    for t in clients.threads:
        t.join(timeout=30)
    name = exp_name(r)
    counts = {k.decode(): int(v) for k, v in r.hgetall(keys.counts(name)).items()}
    deadline = time.monotonic() + 30
    while sum(counts.values()) < clients.ok and time.monotonic() < deadline:
        time.sleep(0.2)  # the writer flushes every 50 ms; this is a report, not a test
        counts = {k.decode(): int(v) for k, v in r.hgetall(keys.counts(name)).items()}
    streams, failed = open_streams(ep["envoy_admin"]), failed_streams(ep["envoy_admin"])
    warm = next(s for s in samples if s[0] >= 0.2 * args.minutes * 60)
    growth = samples[-1][1] / warm[1] - 1
    print(
        f"\nrequests answered 200: {clients.ok}, failed: {clients.bad}; "
        f"events counted in Redis: {sum(counts.values())} {counts}; "
        f"gRPC streams open after the load stopped: {streams}, failed during the run: {failed}; "
        f"sidecar RSS after warm-up {warm[1] / 1024:.1f} -> {samples[-1][1] / 1024:.1f} MiB "
        f"({growth:+.1%})"
    )
    flat = abs(growth) <= 0.10
    verdict = flat and clients.bad == 0 and sum(counts.values()) == clients.ok
    verdict = verdict and streams == 0 and failed == 0
    print("soak:", "PASS" if verdict else "CHECK THE FIGURES")


def exp_name(r: redis.Redis) -> str:
    names = sorted(n.decode() for n in r.smembers(keys.EXPERIMENTS))
    return names[0]


if __name__ == "__main__":
    main()
