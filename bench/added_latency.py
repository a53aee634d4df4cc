"""Added latency of the sidecar over bare Envoy weighted routing, measured in one run.

Starts one fast upstream (the stand-in with no delays), a bare Envoy that splits traffic with
``weighted_clusters`` at the experiment's weights (the limit: no decision logic, no telemetry), and
the full local stack (Envoy + sidecar with telemetry on + Redis) in front of the same upstream.
Then, over one keep-alive connection, it sends requests in interleaved rounds (bare, full, bare,
full, ...) so that machine noise falls on both alike, and prints per-path p50/p90/p99 and the
differences. The same client and upstream serve both paths, so the differences are what the
sidecar adds.

    .venv/bin/python bench/added_latency.py --rounds 5 --requests 400
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from extproc import store
from extproc.config import EXAMPLE_EXPERIMENT, load_experiment
from extproc.contract import keys
from extproc.dev import stack
from extproc.envoyconf.bootstrap import to_yaml
from extproc.envoyconf.common import EnvoyLayout
from extproc.envoyconf.ext_proc import build_baseline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import experiment_at, start_fast_upstream

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


def measure(port: int, n: int, conv_prefix: str) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    out = []
    try:
        for i in range(n):
            headers = {"content-type": "application/json", "x-conversation-id": f"{conv_prefix}{i}"}
            t0 = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", BODY, headers)
            resp = conn.getresponse()
            resp.read()
            out.append((time.perf_counter() - t0) * 1000)
            if resp.status != 200:
                raise RuntimeError(f"status {resp.status}")
    finally:
        conn.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=400, help="per path per round")
    args = ap.parse_args()

    exp = load_experiment(EXAMPLE_EXPERIMENT)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        st = stack.Stack(d / "bench")
        up_port = start_fast_upstream(st)
        upstreams = dict.fromkeys(exp.variant_names, f"127.0.0.1:{up_port}")
        bare_port, bare_admin = stack.free_port(), stack.free_port()
        layout = EnvoyLayout(
            listen_host="127.0.0.1",
            listen_port=bare_port,
            admin_port=bare_admin,
            upstreams=upstreams,
        )
        cfg = d / "bare.yaml"
        cfg.write_text(to_yaml(build_baseline(exp, layout)))
        st.spawn(
            "bare-envoy",
            [
                stack.envoy_binary(),
                "-c",
                str(cfg),
                "--disable-hot-restart",
                "--log-level",
                "warning",
                "--concurrency",
                "1",
            ],
        )
        stack.wait_until(stack.http_ok(f"http://127.0.0.1:{bare_admin}/ready"), "bare envoy")
        full = d / "full"
        exp_path = d / "exp.json"
        state = stack.up(
            stack.UpOptions(
                experiment=experiment_at(exp, up_port, exp_path),
                experiment_path=exp_path,
                state_dir=full,
                auto_ports=True,
            )
        )
        full_port = int(state["endpoints"]["listener"].rsplit(":", 1)[1])
        try:
            bare: list[float] = []
            ours: list[float] = []
            measure(bare_port, 200, "warm-")
            measure(full_port, 200, "warm-")
            for r in range(args.rounds):
                bare += measure(bare_port, args.requests, f"r{r}-")
                ours += measure(full_port, args.requests, f"r{r}-")
            time.sleep(1.0)  # let the last telemetry batch land before counting
            rc = store.connect_sync(state["endpoints"]["redis"])
            recorded = sum(int(v) for v in rc.hgetall(keys.counts(exp.name)).values())
        finally:
            stack.down(full)
            st.stop_all()

    def pct(xs: list[float], q: float) -> float:
        return float(np.percentile(xs, q))

    print(f"{'path':<34}{'n':>7}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'mean':>8}")
    for name, xs in (
        ("bare Envoy weighted_clusters", bare),
        ("Envoy + extproc (telemetry on)", ours),
    ):
        print(
            f"{name:<34}{len(xs):>7}{pct(xs, 50):>9.3f}{pct(xs, 90):>9.3f}{pct(xs, 99):>9.3f}"
            f"{statistics.fmean(xs):>8.3f}"
        )
    print(
        f"added p50: {pct(ours, 50) - pct(bare, 50):+.3f} ms   "
        f"added p99: {pct(ours, 99) - pct(bare, 99):+.3f} ms   "
        f"p50 ratio: {pct(ours, 50) / pct(bare, 50):.2f}x"
    )
    print(
        f"telemetry events recorded: {recorded} for {len(ours) + 200} requests through the sidecar"
    )


if __name__ == "__main__":
    main()
