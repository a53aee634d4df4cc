"""Pieces the benchmarks share: one fast upstream, an experiment pointed at it, CPU, Envoy stats.

Every path under test talks to the same upstream (the stand-in with every delay at zero), so
differences between paths are the proxy's, not the model's.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from extproc.config import Experiment, load_experiment
from extproc.dev import stack

TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def start_fast_upstream(st: stack.Stack) -> int:
    """The OpenAI stand-in with no delays, recorded in ``st``; returns its port."""
    port = stack.free_port()
    st.spawn(
        "upstream", [sys.executable, "-m", "extproc", "mock-model", "--port", str(port), "--fast"]
    )
    stack.wait_until(stack.http_ok(f"http://127.0.0.1:{port}/healthz"), "upstream")
    return port


def experiment_at(
    exp: Experiment, upstream_port: int, path: Path, changes: dict[str, Any] | None = None
) -> Experiment:
    """A copy of ``exp`` with every variant served by the upstream (and the top-level
    ``changes``), written to ``path``."""
    doc = exp.to_json_dict() | (changes or {})
    for v in doc["variants"].values():
        v["address"] = f"127.0.0.1:{upstream_port}"
    path.write_text(json.dumps(doc))
    return load_experiment(path)


def cpu_s(pids: Iterable[int]) -> float:
    """utime + stime of these processes (all their threads), in seconds, from /proc."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks * TICK_S


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a sidecar started with --workers has one per worker)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it exited meanwhile
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def envoy_stats(admin_url: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{admin_url}/stats", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.isdigit():
            out[name] = int(value)
    return out
