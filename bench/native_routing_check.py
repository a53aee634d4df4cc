"""Check that Envoy alone can do the sidecar's routing: sticky, monotone ramps, live weights.

Why: docs/PERFORMANCE.md recommends moving the routing decision from the ext_proc sidecar into
Envoy (``weighted_clusters`` with ``use_hash_policy``, a salted hash of the sticky header, weights
from the runtime). That is only a replacement if it keeps the properties users rely on, so this
script checks them against a real Envoy 1.40 (the ``hash-als`` configuration of
``bench/proxies.py`` without its access log):

* the config passes ``envoy --mode validate``;
* a conversation gets the same variant every time (sticky);
* ramping the candidate 10% -> 25% keeps every conversation that was on it there, and
  5% is a subset of 10% (monotone), with weights changed at run time through the runtime
  (here the admin layer, ``/runtime_modify``; RTDS in production).

The total weight must stay constant (basis points, 10,000): Envoy takes the hash modulo the
total, so a ramp that changed the total would reshuffle conversations. The candidate is listed
first, so its lane grows from hash 0.

    .venv/bin/python bench/native_routing_check.py
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from envoy.config.bootstrap.v3.bootstrap_pb2 import LayeredRuntime, RuntimeLayer

from extproc import stack
from extproc.cli import EXAMPLE_EXPERIMENT
from extproc.config import load_experiment
from extproc.envoy_config import EnvoyLayout

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxies import _manager, _store, hash_als, to_json, upstream_config

PREFIX = "routing"  # runtime keys: routing.<cluster> = weight in basis points
CONVERSATIONS = 4000


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        procs = stack.Stack(d / "procs")
        up, up_admin = stack.free_port(), stack.free_port()
        (d / "upstream.json").write_text(json.dumps(upstream_config(up, up_admin, None)))
        envoy = [stack.envoy_binary(), "--disable-hot-restart", "--concurrency", "1"]
        procs.spawn("upstream", [*envoy, "-c", str(d / "upstream.json")])

        doc = load_experiment(EXAMPLE_EXPERIMENT).to_json_dict()
        stable = doc["stable"]
        cand = next(v for v in doc["variants"] if v != stable)
        doc["variants"] = {cand: doc["variants"][cand], stable: doc["variants"][stable]}
        doc["variants"][cand]["weight"], doc["variants"][stable]["weight"] = 10, 90
        (d / "experiment.json").write_text(json.dumps(doc))
        exp = load_experiment(d / "experiment.json")
        clusters = {v.cluster: name for name, v in exp.spec.variants.items()}

        port, admin = stack.free_port(), stack.free_port()
        layout = EnvoyLayout(
            listen_host="127.0.0.1",
            listen_port=port,
            admin_port=admin,
            upstreams=dict.fromkeys(exp.variant_names, f"127.0.0.1:{up}"),
        )
        boot = hash_als(exp, layout, "127.0.0.1:1")
        manager = _manager(boot)
        del manager.access_log[:]  # routing only
        route = manager.route_config.virtual_hosts[0].routes[0].route
        route.weighted_clusters.runtime_key_prefix = PREFIX
        _store(boot, manager)
        boot.layered_runtime.CopyFrom(
            LayeredRuntime(
                layers=[RuntimeLayer(name="admin", admin_layer=RuntimeLayer.AdminLayer())]
            )
        )
        boot.static_resources.clusters.pop()  # the unused access-log cluster
        cfg = d / "native.json"
        cfg.write_text(json.dumps(to_json(boot)))
        check = subprocess.run(
            [stack.envoy_binary(), "--mode", "validate", "-c", str(cfg)],
            capture_output=True,
            text=True,
        )
        print(f"envoy --mode validate: {'OK' if check.returncode == 0 else check.stdout}")
        procs.spawn("native", [*envoy, "-c", str(cfg)])
        try:
            stack.wait_until(stack.http_ok(f"http://127.0.0.1:{admin}/ready"), "envoy")
            stack.wait_until(stack.http_ok(f"http://127.0.0.1:{up_admin}/ready"), "upstream")

            def set_share(percent: int) -> None:
                weights = {cand: percent * 100, stable: (100 - percent) * 100}
                query = "&".join(f"{PREFIX}.{c}={weights[name]}" for c, name in clusters.items())
                req = urllib.request.Request(
                    f"http://127.0.0.1:{admin}/runtime_modify?{query}", method="POST"
                )
                with urllib.request.urlopen(req) as resp:
                    resp.read()

            def assign() -> dict[int, str]:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                out = {}
                for i in range(CONVERSATIONS):
                    conn.request(
                        "POST", "/v1/chat/completions", b"{}", {"x-conversation-id": f"c{i}"}
                    )
                    resp = conn.getresponse()
                    resp.read()
                    out[i] = resp.getheader("x-llm-variant") or "?"
                conn.close()
                return out

            def on(a: dict[int, str]) -> set[int]:
                return {i for i, v in a.items() if v == cand}

            set_share(10)
            at10 = assign()
            again = assign()
            set_share(25)
            at25 = assign()
            set_share(5)
            at5 = assign()
            ok = [
                ("sticky: same variant for every conversation twice", at10 == again),
                ("ramp 10% -> 25% keeps the 10% on the candidate", on(at10) <= on(at25)),
                ("5% is a subset of 10%", on(at5) <= on(at10)),
            ]
            for share, a in ((10, at10), (25, at25), (5, at5)):
                print(f"weights {share}%: candidate got {100 * len(on(a)) / CONVERSATIONS:.1f}%")
            for what, good in ok:
                print(f"{'PASS' if good else 'FAIL'}  {what}")
            return 0 if check.returncode == 0 and all(g for _, g in ok) else 1
        finally:
            procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
