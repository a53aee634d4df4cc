"""Check that the shipped ``dataplane: native`` keeps the sidecar's routing properties.

Why: with ``dataplane: native`` Envoy routes by itself (``envoyconf.native.build_native``: weighted
clusters with ``use_hash_policy`` on a salted hash of the first sticky header, weights in basis
points from the sidecar's RTDS layer), and the sidecar only serves those weights. That replaces
the sidecar's decision only if it keeps the properties users rely on, so this script checks them
end to end against a real Envoy, driven the way production drives it: Redis, ``extproc serve``
(which serves the RTDS layer for a native experiment), and ``store.set_weights`` for each change,
as ``extproc experiment set-weights`` or the evaluator would make it. Nothing is poked into
Envoy's admin runtime.

* the bootstrap passes ``envoy --mode validate``;
* each weight change reaches Envoy's runtime over RTDS (the time it took is printed);
* a conversation gets the same variant every time (sticky);
* ramping the candidate 10% -> 25% keeps every conversation that was on it there, and 5% is a
  subset of 10% (monotone): the lanes keep a constant total of 10,000, since Envoy takes the
  hash modulo the total, and the candidate comes first, so its lane grows from hash 0;
* at 0% no conversation reaches the candidate (a rollback takes every one back).

    .venv/bin/python bench/native_routing_check.py
"""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from extproc import store
from extproc.config import EXAMPLE_EXPERIMENT, Experiment, load_experiment
from extproc.dev import stack
from extproc.envoyconf.common import EnvoyLayout
from extproc.envoyconf.native import build_native
from extproc.routing.lanes import runtime_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxies import envoy_runtime, to_json, upstream_config

CONVERSATIONS = 4000


async def _set_weights(redis_url: str, exp: Experiment, weights: dict[str, float]) -> int:
    r = store.connect(redis_url)
    try:
        state = await store.set_weights(
            r, exp, weights, reason="bench/native_routing_check.py", actor="bench"
        )
        return state.version
    finally:
        await r.aclose()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        procs = stack.Stack(d / "procs")
        try:
            return check(d, procs)
        finally:
            procs.stop_all()


def check(d: Path, procs: stack.Stack) -> int:
    redis_port = stack.free_port()
    redis_url = stack.start_redis(procs, redis_port, d)
    up, up_admin = stack.free_port(), stack.free_port()
    (d / "upstream.json").write_text(json.dumps(upstream_config(up, up_admin, None)))
    envoy = [stack.envoy_binary(), "--disable-hot-restart", "--concurrency", "1"]
    procs.spawn("upstream", [*envoy, "-c", str(d / "upstream.json")])

    doc = load_experiment(EXAMPLE_EXPERIMENT).to_json_dict()
    stable = doc["stable"]
    cand = next(v for v in doc["variants"] if v != stable)
    doc["variants"][cand]["weight"], doc["variants"][stable]["weight"] = 10, 90
    doc["name"], doc["dataplane"] = "native-check", "native"
    (d / "experiment.json").write_text(json.dumps(doc))
    exp = load_experiment(d / "experiment.json")

    sidecar, port, admin = stack.free_port(), stack.free_port(), stack.free_port()
    layout = EnvoyLayout(
        listen_host="127.0.0.1",
        listen_port=port,
        admin_port=admin,
        sidecar=f"127.0.0.1:{sidecar}",
        upstreams=dict.fromkeys(exp.variant_names, f"127.0.0.1:{up}"),
    )
    cfg = d / "native.json"
    cfg.write_text(json.dumps(to_json(build_native(exp, layout))))
    valid = subprocess.run(
        [stack.envoy_binary(), "--mode", "validate", "-c", str(cfg)],
        capture_output=True,
        text=True,
    )
    print(f"envoy --mode validate: {'OK' if valid.returncode == 0 else valid.stdout}")

    procs.spawn(
        "sidecar",
        [
            sys.executable,
            "-m",
            "extproc",
            "serve",
            "--experiment",
            str(d / "experiment.json"),
            "--redis-url",
            redis_url,
            "--listen",
            f"127.0.0.1:{sidecar}",
            "--instance",
            "native-check",
        ],
    )
    procs.spawn("native", [*envoy, "-c", str(cfg)])
    stack.wait_until(stack.http_ok(f"http://127.0.0.1:{admin}/ready"), "envoy")
    stack.wait_until(stack.http_ok(f"http://127.0.0.1:{up_admin}/ready"), "upstream")

    def alive() -> None:
        procs.check_running("sidecar")
        procs.check_running("native")

    def wait_layer(weights: dict[str, float], what: str) -> float:
        """Until Envoy's runtime holds the layer for ``weights``; returns the seconds it took."""
        want = runtime_weights(exp, weights)
        t0 = time.monotonic()
        stack.wait_until(
            lambda: all(envoy_runtime(admin).get(k) == v for k, v in want.items()),
            what,
            alive=alive,
        )
        return time.monotonic() - t0

    took = wait_layer(exp.file_weights(), "the file's weights in Envoy's runtime over RTDS")
    print(f"file weights (candidate 10%) in Envoy's runtime {1e3 * took:.1f} ms after it was ready")

    def set_share(percent: int) -> None:
        weights = {cand: float(percent), stable: float(100 - percent)}
        version = asyncio.run(_set_weights(redis_url, exp, weights))
        took = wait_layer(weights, f"routing version {version} in Envoy's runtime")
        print(f"set-weights {cand}={percent}: in Envoy's runtime (RTDS) {1e3 * took:.1f} ms later")

    def assign() -> dict[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        out = {}
        for i in range(CONVERSATIONS):
            conn.request("POST", "/v1/chat/completions", b"{}", {"x-conversation-id": f"c{i}"})
            resp = conn.getresponse()
            resp.read()
            out[i] = resp.getheader("x-llm-variant") or "?"
        conn.close()
        return out

    def on(a: dict[int, str]) -> set[int]:
        return {i for i, v in a.items() if v == cand}

    set_share(10)  # the file's weights, set again through Redis
    at10 = assign()
    again = assign()
    set_share(25)
    at25 = assign()
    set_share(5)
    at5 = assign()
    set_share(0)
    at0 = assign()
    passes = (at10, again, at25, at5, at0)
    answered = all(v in exp.variant_names for a in passes for v in a.values())
    ok = [
        ("envoy --mode validate", valid.returncode == 0),
        ("every answer names its variant (x-llm-variant)", answered),
        ("sticky: same variant for every conversation twice", at10 == again),
        ("ramp 10% -> 25% keeps the 10% on the candidate", on(at10) <= on(at25)),
        ("5% is a subset of 10%", on(at5) <= on(at10)),
        ("0%: no conversation on the candidate", not on(at0)),
    ]
    for share, a in ((10, at10), (25, at25), (5, at5), (0, at0)):
        print(f"weights {share}%: candidate got {100 * len(on(a)) / CONVERSATIONS:.2f}%")
    for what, good in ok:
        print(f"{'PASS' if good else 'FAIL'}  {what}")
    return 0 if all(g for _, g in ok) else 1


if __name__ == "__main__":
    sys.exit(main())
