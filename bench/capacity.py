"""CPU the sidecar needs per 1,000 requests/s, measured through Envoy on the local stack.

The figure for sizing (docs/PRODUCTION.md, "Capacity"): CPU seconds the sidecar process(es)
spent, from /proc/<pid>/stat, per 1,000 requests it handled. CPU seconds per 1,000 requests is
the number of cores 1,000 requests/s keep busy.

How: the local stack (Redis, the sidecar with telemetry on, the evaluator, Envoy) in front of one
fast upstream, with the experiment's data plane (``--dataplane``). A paced client sends ``--rate``
requests/s, each with a new conversation id, for ``--duration`` seconds per round, over a few
keep-alive connections. Every request costs the sidecar its telemetry (one access-log entry
mapped to one event, written to Redis) and, on the ext_proc plane, its routing stream. A round
counts the sidecar's CPU from just before the load until every request's event is in Redis and
no more arrives. The sidecar's idle CPU (heartbeat, routing follower) is reported apart; the
figure includes it, as a real replica pays it too. At a low rate requests arrive one by one
(small access-log batches), so the figure errs on the high side for busier replicas;
`bench/run.py` measures saturation.

    .venv/bin/python bench/capacity.py                        # 3 rounds of 20 s at 150 req/s
    .venv/bin/python bench/capacity.py --dataplane native --rate 400
    .venv/bin/python bench/capacity.py --workers 2 --rate 150
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from extproc import store
from extproc.config import EXAMPLE_EXPERIMENT, load_experiment
from extproc.contract import keys
from extproc.dev import stack

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_s, envoy_stats, experiment_at, process_tree, start_fast_upstream

IDLE_S = 5.0
QUIET_S = 0.5
SETTLE_TIMEOUT_S = 30.0
CONNECTIONS = 4
SIDECAR = "cluster.extproc_sidecar"
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


def paced_load(port: int, rate: float, duration_s: float) -> dict[str, float]:
    """``rate`` requests/s for ``duration_s`` over CONNECTIONS connections; late ones go at once."""
    interval = CONNECTIONS / rate
    start = time.monotonic() + 0.05
    counts = {"sent": 0, "errors": 0}
    lock = threading.Lock()

    def client(offset: float) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        sent = errors = 0
        try:
            due = start + offset
            while due < start + duration_s:
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)  # pacing, not synchronisation
                headers = {
                    "content-type": "application/json",
                    "x-conversation-id": str(uuid.uuid4()),
                }
                conn.request("POST", "/v1/chat/completions", BODY, headers)
                resp = conn.getresponse()
                resp.read()
                sent += 1
                errors += resp.status != 200
                due += interval
        finally:
            conn.close()
            with lock:
                counts["sent"] += sent
                counts["errors"] += errors

    threads = [
        threading.Thread(target=client, args=(i * interval / CONNECTIONS,))
        for i in range(CONNECTIONS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    return {"sent": counts["sent"], "errors": counts["errors"], "rate": counts["sent"] / elapsed}


def recorded(state: dict[str, Any], experiment: str) -> int:
    r = store.connect_sync(state["endpoints"]["redis"], timeout_s=5)
    try:
        return sum(int(v) for v in r.hgetall(keys.counts(experiment)).values())
    finally:
        r.close()


def settle(state: dict[str, Any], experiment: str, expected: int) -> None:
    """Wait until ``expected`` events are in Redis and no more arrive (the access log flushes
    every 100 ms, the writer every 50 ms); a request whose event never comes fails the round."""
    last = {"events": -1, "since": time.monotonic()}

    def done() -> bool:
        n, now = recorded(state, experiment), time.monotonic()
        if n != last["events"]:
            last.update(events=n, since=now)
        return n >= expected and now - last["since"] >= QUIET_S

    stack.wait_until(done, f"{expected} events in Redis", SETTLE_TIMEOUT_S)


def one_round(
    state: dict[str, Any], experiment: str, pids: list[int], envoy: int, args: argparse.Namespace
) -> dict[str, float]:
    admin = state["endpoints"]["envoy_admin"]
    port = int(state["endpoints"]["listener"].rsplit(":", 1)[1])
    before, recorded0 = envoy_stats(admin), recorded(state, experiment)
    cpu0, envoy0 = cpu_s(pids), cpu_s([envoy])
    load = paced_load(port, args.rate, args.duration)
    settle(state, experiment, recorded0 + int(load["sent"]))
    sidecar, envoy_cpu = cpu_s(pids) - cpu0, cpu_s([envoy]) - envoy0
    after = envoy_stats(admin)
    overflow = after.get(f"{SIDECAR}.upstream_rq_active_overflow", 0) - before.get(
        f"{SIDECAR}.upstream_rq_active_overflow", 0
    )
    return {
        **load,
        "overflow": overflow,
        "events": recorded(state, experiment) - recorded0,
        "sidecar_cpu_s": sidecar,
        "sidecar_per_1000": sidecar / load["sent"] * 1000,
        "envoy_per_1000": envoy_cpu / load["sent"] * 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=20, help="seconds of load per round")
    ap.add_argument("--rate", type=float, default=150, help="requests per second")
    ap.add_argument("--workers", type=int, default=1, help="extproc serve --workers")
    ap.add_argument("--dataplane", choices=("ext_proc", "native"), default="ext_proc")
    args = ap.parse_args()

    exp = load_experiment(EXAMPLE_EXPERIMENT)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        st = stack.Stack(d / "bench")
        exp_path = d / "experiment.json"
        exp = experiment_at(exp, start_fast_upstream(st), exp_path, {"dataplane": args.dataplane})
        state = stack.up(
            stack.UpOptions(
                experiment=exp,
                experiment_path=exp_path,
                state_dir=d / "stack",
                auto_ports=True,
                sidecar_args=("--workers", str(args.workers)),
            )
        )
        try:
            sidecar = int(state["processes"]["sidecar"]["pid"])
            envoy = int(state["processes"]["envoy"]["pid"])
            stack.wait_until(  # a supervisor has its workers (and a resource tracker) by now
                lambda: len(process_tree(sidecar)) > args.workers or args.workers == 1,
                "the sidecar's workers",
            )
            pids = process_tree(sidecar)
            port = int(state["endpoints"]["listener"].rsplit(":", 1)[1])
            before = recorded(state, exp.name)
            warm = paced_load(port, args.rate, 2)
            settle(state, exp.name, before + int(warm["sent"]))
            cpu0 = cpu_s(pids)
            time.sleep(IDLE_S)  # measuring an idle period: nothing to wait for
            idle = (cpu_s(pids) - cpu0) / IDLE_S
            rounds = [one_round(state, exp.name, pids, envoy, args) for _ in range(args.rounds)]
        finally:
            stack.down(d / "stack")
            st.stop_all()

    print(
        f"dataplane: {args.dataplane}; sidecar: {args.workers} worker(s); load: {args.rate:g} "
        f"requests/s for "
        f"{args.duration:g} s per round; idle sidecar CPU {idle * 1000:.1f} ms per second"
    )
    print(
        f"{'round':<7}{'sent':>7}{'req/s':>8}{'errors':>8}{'overflow':>10}"
        f"{'events':>8}{'sidecar CPU s':>15}{'sidecar s/1k':>14}{'envoy s/1k':>12}"
    )
    for i, r in enumerate(rounds, 1):
        print(
            f"{i:<7}{r['sent']:>7.0f}{r['rate']:>8.1f}{r['errors']:>8.0f}"
            f"{r['overflow']:>10.0f}{r['events']:>8.0f}{r['sidecar_cpu_s']:>15.2f}"
            f"{r['sidecar_per_1000']:>14.3f}{r['envoy_per_1000']:>12.3f}"
        )
    med = statistics.median(r["sidecar_per_1000"] for r in rounds)
    envoy_med = statistics.median(r["envoy_per_1000"] for r in rounds)
    print(
        f"sidecar CPU per 1,000 requests/s: {med:.2f} cores (median of {len(rounds)} rounds); "
        f"Envoy: {envoy_med:.2f} cores"
    )
    if any(r["overflow"] for r in rounds):
        print("overflow > 0: Envoy turned routing streams away from the sidecar; lower --rate")


if __name__ == "__main__":
    main()
