"""How long the evaluator takes over a large stage window: ingest, then one evaluation.

Why: a stage at 50% of a busy service can hold a million events, and the live evaluator ingests
and judges on one asyncio loop every ``cadence_s`` (5 s): if one look takes longer than that, the
evaluator falls behind, and rollback (the part that protects users) waits with it. The target is
one evaluation over 1,000,000 events in at most 1 s.

What is timed, done exactly as ``extproc/evaluator/service.py`` does it:

1. decode: ``status.decode_event`` on each stream entry's fields (``{b"e": protobuf bytes}``), as
   ``Evaluator._read_events`` does for every entry it reads from Redis;
2. add: ``StageWindow.add`` for each decoded event (the window of ``machine.new_window``);
3. evaluate: ``machine.evaluate`` (``judge`` with every guardrail of the bundled experiment, the
   sample-ratio check, then the transition), first look and a second look with no new events
   (the steady state between ticks, where the window's array caches are warm);
4. with ``--incremental N``: N more events added, then one more look (the per-tick cost at a
   steady arrival rate);
5. with ``--redis``: the whole read path of a leader that takes over mid-stage,
   ``Evaluator._read_events`` itself (``XRANGE`` in batches of 5,000 from a real redis-server,
   decode, add), over the same events written to a stream first.

Each is timed twice: with the package's ``StageWindow`` and with ``FastStageWindow`` below, a
prototype of the change docs/PERFORMANCE.md proposes for ``extproc/evaluator/window.py`` (the
same samples, so the verdicts must agree, which is checked).

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
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from extproc import keys, stack, store
from extproc.assignment import key_hash, salt_key
from extproc.cli import EXAMPLE_EXPERIMENT
from extproc.config import Experiment, load_experiment
from extproc.evaluator import machine
from extproc.evaluator.service import Evaluator
from extproc.evaluator.window import SERVER_ERRORS, StageWindow, VariantWindow
from extproc.status import decode_event
from extproc.telemetry.v1.event_pb2 import Assignment, ErrorClass, TelemetryEvent

T = TypeVar("T")
T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
TARGET_S = 1.0


_NONE = int(ErrorClass.ERROR_CLASS_NONE)
_FORCED = int(Assignment.ASSIGNMENT_FORCED)
_SERVER = frozenset(int(e) for e in SERVER_ERRORS)


class FastVariantWindow(VariantWindow):
    """The proposed ``VariantWindow``: samples in ``array('d')`` columns instead of lists.

    Why: the judge needs numpy arrays. From a list, each float is converted one by one (~75 ns
    each: 0.3-0.6 s for the 8 columns of a 1M-event window at the first look); from an
    ``array('d')`` it is one memcpy (~0.4 ms per 500k). Appending to an ``array('d')`` costs
    about as much as to a list. Enum constants are module-level ints, because
    ``ErrorClass.ERROR_CLASS_NONE`` goes through protobuf's ``EnumTypeWrapper.__getattr__``
    (~1.3 us per event). (``summary()`` is left as inherited: this prototype is for timing.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.columns: dict[str, array[float]] = {
            m: array("d") for m in ("latency", "ttft", "completion_tokens", "response_bytes")
        }
        self.columns["answer_chars"] = array("d")

    def add(self, ev: TelemetryEvent) -> None:
        self.requests += 1
        err = ev.error
        if err in _SERVER:
            self.errors += 1
        elif err == _NONE:
            c = self.columns
            if ev.HasField("duration_ms"):
                c["latency"].append(ev.duration_ms)
            if ev.HasField("first_token_ms"):
                c["ttft"].append(ev.first_token_ms)
            if ev.HasField("completion_tokens"):
                c["completion_tokens"].append(ev.completion_tokens)
            c["response_bytes"].append(ev.response_bytes)
            if ev.HasField("refusal"):
                self.answered += 1
                self.refusals += ev.refusal
            if ev.HasField("answer_chars"):
                c["answer_chars"].append(ev.answer_chars)
        kh = ev.key_hash
        if kh:
            self.keys.add(kh)
        else:
            self.unkeyed += 1

    def samples(self, metric: str) -> np.ndarray[Any, np.dtype[np.float64]]:
        out = np.frombuffer(self.columns[metric], dtype=np.float64).copy()
        out.flags.writeable = False
        return out


class FastStageWindow(StageWindow):
    """The proposed ``StageWindow.add``: no throw-away ``VariantWindow()`` per event (the
    ``setdefault`` argument is built on every call, ~0.8 us) and int enum constants."""

    def add(self, ev: TelemetryEvent) -> None:
        if ev.time_unix_ms < self.started_ms:
            return
        variant = ev.variant
        if not variant:
            return
        if ev.shadow:
            self.shadow += 1
            if not self.shadow_as_candidate:
                return
        elif ev.assignment == _FORCED:
            self.forced += 1
            return
        w = self.variants.get(variant)
        if w is None:
            w = self.variants[variant] = FastVariantWindow()
        w.add(ev)
        if not ev.shadow:  # who served what, for feedback attribution (as StageWindow.add)
            rid, kh = ev.request_id, ev.key_hash
            if rid:
                self.by_request[rid] = variant
            if kh:
                self.by_key[kh] = variant


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


def read_path_s(exp: Experiment, entries: list[dict[bytes, bytes]], window: StageWindow) -> float:
    """Seconds ``Evaluator._read_events`` takes to read ``entries`` from a real Redis stream."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = stack.Stack(Path(tmp))
        port = stack.free_port()
        procs.spawn(
            "redis",
            [stack.redis_binary(), "--port", str(port), "--save", "", "--appendonly", "no"],
        )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            stack.wait_until(stack.redis_ok(url), "redis")

            async def go() -> float:
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
                await ev._read_events()
                took = time.perf_counter() - t0
                await r.aclose()
                return took

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

    def measure(window: StageWindow) -> dict[str, Any]:
        decoded, t_decode = timed(lambda: [decode_event(f) for f in head])
        events = [e for e in decoded if e is not None]

        def add_all() -> None:
            add = window.add
            for ev in events:
                add(ev)

        _, t_add = timed(add_all)
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
        return {
            "events": len(events),
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
            "checks": [c.to_json() for c in verdict.checks] if verdict else [],
            "meets_target": t_eval1 <= TARGET_S,
        }

    shipped = measure(machine.new_window(spec, start_s))
    proposed = measure(FastStageWindow(started_ms=round(start_s * 1000)))
    same = [(c["metric"], c["status"], c["estimate"], c["bound"]) for c in shipped["checks"]] == [
        (c["metric"], c["status"], c["estimate"], c["bound"]) for c in proposed["checks"]
    ]
    result: dict[str, Any] = {
        "events": shipped["events"],
        "canary_share": share,
        "stage": stage,
        "generate_s": round(t_gen, 3),
        "target_s": TARGET_S,
        "shipped": shipped,
        "proposed": proposed,
        "same_verdict": same and shipped["action"] == proposed["action"],
    }
    if args.redis:
        for name, window in (
            ("shipped", machine.new_window(spec, start_s)),
            ("proposed", FastStageWindow(started_ms=round(start_s * 1000))),
        ):
            result[name]["read_from_redis_s"] = round(read_path_s(exp, head, window), 3)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{result['events']:,} events ({share:g}% canary, stage {stage + 1}); "
        f"generated in {t_gen:.1f} s (not counted)\n"
    )
    print(f"{'':<34}{'shipped':>10}{'proposed':>10}")
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
        print(f"{label:<34}{shipped[key]:>10}{proposed[key]:>10}")
    checks = ", ".join(f"{c['metric']} {c['status']}" for c in shipped["checks"])
    print(f"\nverdict: {shipped['action']} ({checks}); proposed agrees: {result['same_verdict']}")
    for name in ("shipped", "proposed"):
        r = result[name]
        status = "meets" if r["meets_target"] else "MISSES"
        print(
            f"target (one evaluation over 1M events <= {TARGET_S:g} s), {name}: {status} "
            f"({r['evaluate_first_s']} s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
