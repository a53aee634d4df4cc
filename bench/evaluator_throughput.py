"""How long the evaluator takes over a large stage window: ingest, then one evaluation.

Why: a stage at 50% of a busy service can hold a million events, and the live evaluator ingests
and judges on one asyncio loop every ``cadence_s`` (5 s): if one look takes longer than that, the
evaluator falls behind, and rollback (the part that protects users) waits with it. The target is
one evaluation over 1,000,000 events in at most 1 s.

What is timed, done exactly as ``extproc/evaluator/service.py`` does it:

1. decode: ``events.decode_event`` on each stream entry's fields (``{b"e": protobuf bytes}``), as
   ``Evaluator._read_events`` does for every entry it reads from Redis;
2. add: ``StageWindow.add`` for each decoded event (the window of ``machine.new_window``);
3. evaluate: ``machine.evaluate`` (``judge`` with every guardrail of the bundled experiment, the
   sample-ratio check, then the transition), first look and a second look with no new events
   (the steady state between ticks);
4. with ``--incremental N``: N more events added, then one more look (the per-tick cost at a
   steady arrival rate);
5. with ``--redis``: the whole read path of a leader that takes over mid-stage,
   ``Evaluator._read_events`` itself (``XRANGE`` in batches of 5,000 from a real redis-server,
   decode, add), over the same events written to a stream first.

The figures are only worth reading if the evaluator judged what it was given, so the script
checks it (exit status 1 otherwise): the window counted every event, the ``--redis`` read
reached the end of the stream, and the verdict is one an A/A stage can get (no guardrail failed,
no rollback or hold).

Synthetic traffic: two variants (``--canary-share``, default 50: the largest candidate sample a
canary stage has), about four requests per conversation, 1% server errors, lognormal latency and
TTFT, Poisson tokens, 2% refusals. Both variants are drawn from the same distributions (an A/A
stage), so every guardrail runs to completion instead of stopping at a failure.

    .venv/bin/python bench/evaluator_throughput.py [--events 1000000] [--json]
    .venv/bin/py-spy record -o eval.svg -- .venv/bin/python bench/evaluator_throughput.py
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from extproc import store
from extproc.config import EXAMPLE_EXPERIMENT, Experiment, load_experiment
from extproc.contract import keys
from extproc.contract.assignment import key_hash, salt_key
from extproc.dev import stack
from extproc.evaluator import machine
from extproc.evaluator.service import Evaluator
from extproc.evaluator.window import StageWindow
from extproc.telemetry.events import decode_event
from extproc.telemetry.v1.event_pb2 import Assignment, ErrorClass, TelemetryEvent

T = TypeVar("T")
T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
TARGET_S = 1.0


def synthetic_entries(
    n: int, canary_share: float, seed: int, experiment: str
) -> list[dict[bytes, bytes]]:
    """``n`` stream entries' fields as Redis returns them: one serialized event each."""
    rng = np.random.default_rng(seed)
    canary = rng.random(n) < canary_share
    conversations = rng.integers(0, max(1, n // 4), n)
    error = rng.random(n) < 0.01
    latency = rng.lognormal(np.log(800.0), 0.8, n)
    ttft = rng.lognormal(np.log(250.0), 0.5, n)
    tokens = rng.poisson(150, n)
    refusal = rng.random(n) < 0.02
    arrival = T0_MS + np.sort(rng.integers(0, 4 * 3600 * 1000, n))  # a 4-hour stage
    salt = salt_key("bench")
    hashes: dict[int, str] = {}
    out = []
    field = keys.EVENT_FIELD
    for i in range(n):
        conv = int(conversations[i])
        kh = hashes.get(conv)
        if kh is None:
            kh = hashes[conv] = key_hash(salt, str(conv).encode())
        ev = TelemetryEvent(
            experiment=experiment,
            recorder="bench",
            variant="canary" if canary[i] else "stable",
            assignment=Assignment.ASSIGNMENT_STICKY,
            key_hash=kh,
            request_id=f"req-{i}",
            time_unix_ms=int(arrival[i]),
            streamed=True,
        )
        if error[i]:
            ev.status = 503
            ev.error = ErrorClass.ERROR_CLASS_UPSTREAM_5XX
            ev.duration_ms = float(latency[i])
        else:
            ev.status = 200
            ev.error = ErrorClass.ERROR_CLASS_NONE
            ev.headers_ms = float(ttft[i]) * 0.5
            ev.first_token_ms = float(ttft[i])
            ev.duration_ms = float(latency[i] + ttft[i])
            ev.prompt_tokens = 40
            ev.completion_tokens = int(tokens[i])
            ev.response_bytes = int(tokens[i]) * 180
            ev.refusal = bool(refusal[i])
            ev.answer_chars = int(tokens[i]) * 4
            ev.finish_reason = "stop"
        out.append({field: ev.SerializeToString()})
    return out


def read_path_s(
    exp: Experiment, entries: list[dict[bytes, bytes]], window: StageWindow
) -> tuple[float, int]:
    """Seconds ``Evaluator._read_events`` takes to read ``entries`` from a real Redis stream, and
    how many entries it read (fewer than written if it lost the lease on the way)."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = stack.Stack(Path(tmp))
        try:
            url = stack.start_redis(procs, stack.free_port(), Path(tmp))

            async def go() -> tuple[float, int]:
                r = store.connect(url, timeout_s=30)
                stream = keys.events(exp.name)
                for i in range(0, len(entries), 10_000):
                    async with r.pipeline(transaction=False) as pipe:
                        for f in entries[i : i + 10_000]:
                            pipe.xadd(stream, f)  # type: ignore[arg-type]
                        await pipe.execute()
                ev = Evaluator(exp, r, "bench")
                ev.window = window
                gc.collect()
                t0 = time.perf_counter()
                read = await ev._read_events()
                took = time.perf_counter() - t0
                await r.aclose()
                return took, read

            return asyncio.run(go())
        finally:
            procs.stop_all()


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    gc.collect()
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--canary-share", type=float, default=50.0, help="percent of events")
    ap.add_argument("--incremental", type=int, default=5_000, help="events added before look 3")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--redis", action="store_true", help="also time the read path from Redis")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    exp = load_experiment(EXAMPLE_EXPERIMENT)
    spec = exp.spec
    share = args.canary_share
    stage = max(i for i, s in enumerate(spec.rollout.stages) if s <= share)
    weights = {exp.stable: 100 - share, "canary": share}
    t_gen = time.perf_counter()
    entries = synthetic_entries(args.events + args.incremental, share / 100, args.seed, exp.name)
    t_gen = time.perf_counter() - t_gen
    head, tail = entries[: args.events], entries[args.events :]

    start_s = T0_MS / 1000
    state = machine.start(spec, start_s).state
    state.stage = stage  # the stage whose share the synthetic split is
    now = start_s + 4 * 3600

    window = machine.new_window(spec, start_s)
    decoded, t_decode = timed(lambda: [decode_event(f) for f in head])
    events = [e for e in decoded if e is not None]

    def add_all() -> None:
        add = window.add
        for ev in events:
            add(ev)

    _, t_add = timed(add_all)
    counted = sum(w.requests for w in window.variants.values())
    first, t_eval1 = timed(lambda: machine.evaluate(spec, state, window, weights, now))
    _, t_eval2 = timed(lambda: machine.evaluate(spec, state, window, weights, now + 5))

    def more() -> None:
        for f in tail:
            ev = decode_event(f)
            if ev is not None:
                window.add(ev)

    _, t_more = timed(more)
    _, t_eval3 = timed(lambda: machine.evaluate(spec, state, window, weights, now + 10))
    verdict = first.verdict
    checks = [c.to_json() for c in verdict.checks] if verdict else []
    problems: list[str] = []
    if counted != len(events):
        problems.append(f"the window counted {counted:,} of {len(events):,} events")
    if verdict is None or verdict.action in ("rollback", "hold"):
        problems.append(f"an A/A stage got {verdict.action if verdict else 'no verdict'}")
    problems += [f"{c['metric']} failed on A/A traffic" for c in checks if c["status"] == "fail"]
    result: dict[str, Any] = {
        "events": len(events),
        "canary_share": share,
        "stage": stage,
        "generate_s": round(t_gen, 3),
        "target_s": TARGET_S,
        "decode_s": round(t_decode, 3),
        "add_s": round(t_add, 3),
        "ingest_s": round(t_decode + t_add, 3),
        "ingest_us_per_event": round(1e6 * (t_decode + t_add) / max(len(events), 1), 2),
        "evaluate_first_s": round(t_eval1, 3),
        "evaluate_again_s": round(t_eval2, 3),
        "incremental_events": len(tail),
        "incremental_ingest_s": round(t_more, 4),
        "evaluate_after_increment_s": round(t_eval3, 3),
        "action": verdict.action if verdict else None,
        "checks": checks,
        "meets_target": t_eval1 <= TARGET_S,
    }
    if args.redis:
        took, read = read_path_s(exp, head, machine.new_window(spec, start_s))
        result["read_from_redis_s"] = round(took, 3)
        if read != len(head):
            problems.append(f"_read_events read {read:,} of {len(head):,} entries")
    result["problems"] = problems
    if args.json:
        print(json.dumps(result, indent=2))
        return 1 if problems else 0
    print(
        f"{result['events']:,} events ({share:g}% canary, stage {stage + 1}); "
        f"generated in {t_gen:.1f} s (not counted)\n"
    )
    rows = [
        ("ingest: decode_event (s)", "decode_s"),
        ("ingest: StageWindow.add (s)", "add_s"),
        ("ingest: total (s)", "ingest_s"),
        ("ingest: us per event", "ingest_us_per_event"),
        ("evaluate: first look (s)", "evaluate_first_s"),
        ("evaluate: second look (s)", "evaluate_again_s"),
        (f"ingest {len(tail):,} more (s)", "incremental_ingest_s"),
        ("evaluate after them (s)", "evaluate_after_increment_s"),
    ]
    if args.redis:
        rows.append(("takeover: _read_events (s)", "read_from_redis_s"))
    for label, key in rows:
        print(f"{label:<34}{result[key]:>10}")
    listed = ", ".join(f"{c['metric']} {c['status']}" for c in checks)
    print(f"\nverdict: {result['action']} ({listed})")
    status = "meets" if result["meets_target"] else "MISSES"
    print(
        f"target (one evaluation over 1M events <= {TARGET_S:g} s): {status} "
        f"({result['evaluate_first_s']} s)"
    )
    for p in problems:
        print(f"NOT SANE: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
