"""What a refresh costs when it reads rollups: the same at any traffic, for any range.

Why: `status`, `top` and the dashboard used to decode the newest raw events on every refresh,
a cost that grows with traffic and a window that shrinks with it. Rollups (``extproc.telemetry.
rollup``) are per-bucket aggregates written as events arrive; a refresh reads one hash per
bucket. This fills a real redis-server with the rollups of a simulated rollout (by default six
hours at 231 requests a second: 5M events, two variants, latencies and token counts drawn at
random) through the writer's own functions, then times the reads a refresh makes:

- the last 5 minutes in 10 s buckets (30 hashes): the live figures;
- the whole rollout in 5 min buckets (72 hashes): a chart of all six hours;
- each merged into per-variant figures (sketch quantiles included);
- and whole refreshes, through the functions the surfaces call: `extproc status --json`'s
  document, the dashboard's experiment document (table, comparison, ladder) and its chart
  series over the whole rollout (the page's default range).

The simulated rollout ends now, so the surfaces' own clocks find it. The event stream is not
filled: no refresh reads it. Run: ``.venv/bin/python bench/rollup_read.py`` (about a minute to
fill; ``--events`` for more or fewer). It prints the median and max of 20 reads of each, in
milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from extproc import store
from extproc.config import EXAMPLE_EXPERIMENT, load_experiment, parse_experiment
from extproc.contract import keys
from extproc.dev import stack
from extproc.evaluator.rollout import RolloutState
from extproc.ops import status
from extproc.ops.dashboard import views
from extproc.telemetry import rollup
from extproc.telemetry.v1.event_pb2 import ErrorClass, TelemetryEvent

NAME = "bench"


def bucket_events(rng: np.random.Generator, start_s: int, n: int) -> list[TelemetryEvent]:
    """``n`` requests starting within one 10 s bucket, 10% on the canary."""
    canary = rng.random(n) < 0.1
    latency = rng.lognormal(6.0, 0.5, n)
    tokens = rng.integers(50, 800, n)
    failed = rng.random(n) < 0.01
    return [
        TelemetryEvent(
            experiment=NAME,
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


async def fill(url: str, events: int, hours: float, start_s: int) -> None:
    """The experiment, a rollout state begun at ``start_s``, and the rollups of ``events``
    requests from then until now."""
    r = store.connect(url, timeout_s=30)
    example = load_experiment(EXAMPLE_EXPERIMENT).to_json_dict()
    await store.register_experiment(r, parse_experiment({**example, "name": NAME}))
    state = RolloutState(
        status="running",
        stage=3,
        stage_started=start_s + hours * 3600 / 2,
        strategy="canary",
        attempt_started=start_s,
    )
    await r.set(keys.rollout(NAME), state.to_json())
    rng = np.random.default_rng(7)
    buckets = int(hours * 3600 / 10)
    per_bucket = events // buckets
    async with r.pipeline(transaction=False) as pipe:
        for b in range(buckets):
            evs = bucket_events(rng, start_s + 10 * b, per_bucket)
            for width in rollup.WIDTHS_S:
                for start, (ints, floats) in rollup.bucket_fields(evs, width).items():
                    key = keys.rollup(NAME, width, start)
                    for k, v in ints.items():
                        pipe.hincrby(key, k, v)
                    for k, f in floats.items():
                        pipe.hincrbyfloat(key, k, f)
            if b % 30 == 29:
                await pipe.execute()
        await pipe.execute()
    await r.aclose()


async def _timed(what: Callable[[], Awaitable[object]], times: int = 20) -> list[float]:
    took = []
    for _ in range(times):
        t0 = time.perf_counter()
        await what()
        took.append((time.perf_counter() - t0) * 1000)
    return took


async def time_reads(url: str, hours: float, start_s: int) -> dict[str, list[float]]:
    r = store.connect(url, timeout_s=30)
    end = start_s + int(hours * 3600)
    cases = {
        "last 5 min, 10 s buckets": (10, end - 300, end),
        "whole rollout, 5 min buckets": (300, start_s, end),
    }
    out: dict[str, list[float]] = {}
    for name, (width, since, until) in cases.items():
        n = len(range(since - since % width, until, width))

        async def read(w: int = width, a: int = since, b: int = until) -> object:
            return await rollup.read(r, NAME, w, a, b)

        async def figures(w: int = width, a: int = since, b: int = until) -> object:
            merged = rollup.merged(await rollup.read(r, NAME, w, a, b))
            return [t.figures() for t in merged.tallies.values()]

        out[f"{name}: read ({n} hashes)"] = await _timed(read)
        out[f"{name}: read + figures"] = await _timed(figures)
    out["refresh: `extproc status --json` document"] = await _timed(
        lambda: status.status_doc(r, NAME)
    )
    out["refresh: dashboard experiment document"] = await _timed(lambda: views.experiment(r, NAME))
    out["refresh: dashboard chart series, whole rollout"] = await _timed(
        lambda: views.experiment_series(r, NAME)
    )
    series = await views.experiment_series(r, NAME)
    assert series is not None
    requests = sum(sum(x or 0 for x in c["window_requests"]) for c in series["variants"].values())
    print(
        f"chart series: {len(series['t'])} points of {series['step_s']} s spanning "
        f"{series['span_s'] / 3600:.1f} h, {requests:,} requests"
    )
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
            start_s = int(time.time() - args.hours * 3600) // 300 * 300
            asyncio.run(fill(url, args.events, args.hours, start_s))
            print(
                f"filled the rollups of {args.events:,} events over {args.hours} h "
                f"in {time.perf_counter() - t0:.0f} s"
            )
            for name, took in asyncio.run(time_reads(url, args.hours, start_s)).items():
                print(
                    f"{name:62s} median {statistics.median(took):6.1f} ms  max {max(took):6.1f} ms"
                )
        finally:
            procs.stop_all()


if __name__ == "__main__":
    main()
