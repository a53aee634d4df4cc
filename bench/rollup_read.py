"""What a refresh costs when it reads rollups: the same at any traffic, for any range.

Why: `status`, `top` and the dashboard used to decode the newest raw events on every refresh,
a cost that grows with traffic and a window that shrinks with it. Rollups (``extproc.telemetry.
rollup``) are per-bucket aggregates written as events arrive; a refresh reads one hash per
bucket. This fills a real redis-server with the rollups of a simulated rollout (by default six
hours at 231 requests a second: 5M events, two variants, latencies and token counts drawn at
random) through the writer's own functions, then times the reads a refresh makes:

- the last 5 minutes in 10 s buckets (30 hashes): the live figures;
- the whole rollout in 5 min buckets (72 hashes): a chart of all six hours;
- each merged into per-variant figures (sketch quantiles included).

Run: ``.venv/bin/python bench/rollup_read.py`` (about a minute to fill; ``--events`` for more or
fewer). It prints the median and max of 20 reads of each, in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from extproc import store
from extproc.contract import keys
from extproc.dev import stack
from extproc.telemetry import rollup
from extproc.telemetry.v1.event_pb2 import ErrorClass, TelemetryEvent

START_S = 1_800_000_000


def bucket_events(rng: np.random.Generator, start_s: int, n: int) -> list[TelemetryEvent]:
    """``n`` requests starting within one 10 s bucket, 10% on the canary."""
    canary = rng.random(n) < 0.1
    latency = rng.lognormal(6.0, 0.5, n)
    tokens = rng.integers(50, 800, n)
    failed = rng.random(n) < 0.01
    return [
        TelemetryEvent(
            experiment="bench",
            variant="canary" if canary[i] else "stable",
            time_unix_ms=start_s * 1000 + int(i * 10_000 / n),
            duration_ms=float(latency[i]),
            first_token_ms=float(latency[i]) / 4,
            streamed=True,
            prompt_tokens=int(tokens[i]),
            completion_tokens=int(tokens[i]) * 2,
            refusal=False,
            answer_chars=int(tokens[i]) * 4,
            error=ErrorClass.ERROR_CLASS_UPSTREAM_5XX if failed[i] else ErrorClass.ERROR_CLASS_NONE,
        )
        for i in range(n)
    ]


async def fill(url: str, events: int, hours: float) -> None:
    r = store.connect(url, timeout_s=30)
    rng = np.random.default_rng(7)
    buckets = int(hours * 3600 / 10)
    per_bucket = events // buckets
    coarse: dict[int, rollup.Tally] = {}
    async with r.pipeline(transaction=False) as pipe:
        for b in range(buckets):
            evs = bucket_events(rng, START_S + 10 * b, per_bucket)
            for width in rollup.WIDTHS_S:
                for start, (ints, floats) in rollup.bucket_fields(evs, width).items():
                    key = keys.rollup("bench", width, start)
                    for k, v in ints.items():
                        pipe.hincrby(key, k, v)
                    for k, f in floats.items():
                        pipe.hincrbyfloat(key, k, f)
            if b % 30 == 29:
                await pipe.execute()
        await pipe.execute()
    del coarse
    await r.aclose()


async def time_reads(url: str, hours: float) -> dict[str, list[float]]:
    r = store.connect(url, timeout_s=30)
    end = START_S + int(hours * 3600)
    cases = {
        "last 5 min, 10 s buckets": (10, end - 300, end),
        "whole rollout, 5 min buckets": (300, START_S, end),
    }
    out: dict[str, list[float]] = {}
    for name, (width, since, until) in cases.items():
        for what in ("read", "read + figures"):
            took = []
            for _ in range(20):
                t0 = time.perf_counter()
                buckets = await rollup.read(r, "bench", width, since, until)
                if what != "read":
                    for t in rollup.merged(buckets).values():
                        t.figures()
                took.append((time.perf_counter() - t0) * 1000)
            out[f"{name}: {what} ({len(buckets)} hashes)"] = took
    await r.aclose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=5_000_000)
    ap.add_argument("--hours", type=float, default=6.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        procs = stack.Stack(Path(tmp))
        try:
            url = stack.start_redis(procs, stack.free_port(), Path(tmp))
            t0 = time.perf_counter()
            asyncio.run(fill(url, args.events, args.hours))
            print(
                f"filled the rollups of {args.events:,} events over {args.hours} h "
                f"in {time.perf_counter() - t0:.0f} s"
            )
            for name, took in asyncio.run(time_reads(url, args.hours)).items():
                print(
                    f"{name:62s} median {statistics.median(took):6.1f} ms  max {max(took):6.1f} ms"
                )
        finally:
            procs.stop_all()


if __name__ == "__main__":
    main()
