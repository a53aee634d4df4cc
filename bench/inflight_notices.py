"""What the observer's in-flight notices cost per request.

Why: every observed request registers with the process's sweeper when its headers arrive and
leaves it when it ends (``extproc.dataplane.observer.InflightNotices``), at 1,000 req/s and more
per process. The alternative, a timer per stream, costs a timer handle, a heap push and a cancel
per request. This times both on a running asyncio loop over the real ``Observation`` objects:

1. ``sweeper``: ``opened`` + ``closed`` per request with ``--open`` requests already open (the
   steady state of long requests), i.e. the bookkeeping each request adds;
2. ``timer``: ``loop.call_later`` + ``cancel`` per request, the design it replaces;
3. the sweep itself: noticing ``--open`` requests that are all past the bound at once.

Run: ``.venv/bin/python bench/inflight_notices.py`` (a few seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import time

from extproc.config import parse_experiment
from extproc.dataplane.event import EventBuilder
from extproc.dataplane.observer import InflightNotices, Observation, ObserverContext
from extproc.telemetry.v1.event_pb2 import TelemetryEvent

EXPERIMENT = parse_experiment(
    {
        "name": "exp",
        "salt": "s",
        "stable": "stable",
        "variants": {
            "stable": {"cluster": "a", "weight": 50},
            "canary": {"cluster": "b", "weight": 50},
        },
    }
)


async def main(requests: int, open_requests: int) -> None:
    sent: list[TelemetryEvent] = []
    notices = InflightNotices(notice_ms=60_000)
    ctx = ObserverContext(
        events=EventBuilder.for_experiment(EXPERIMENT, "bench"), emit=sent.append, notices=notices
    )
    standing = [Observation(ctx) for _ in range(open_requests)]
    for obs in standing:
        notices.opened(obs)
    batch = [Observation(ctx) for _ in range(requests)]

    t = time.perf_counter()
    for obs in batch:
        notices.opened(obs)
        notices.closed(obs)
    sweeper = (time.perf_counter() - t) / requests

    loop = asyncio.get_running_loop()
    t = time.perf_counter()
    for _ in range(requests):
        loop.call_later(60.0, lambda: None).cancel()
    timer = (time.perf_counter() - t) / requests

    for obs in standing:
        obs.start_ns -= 120 * 1_000_000_000  # all past the bound
    t = time.perf_counter()
    notices.sweep()
    sweep = (time.perf_counter() - t) / max(open_requests, 1)
    if len(sent) != open_requests or notices.open:
        raise SystemExit("the sweep did not notice every open request exactly once")

    print(f"{requests} requests, {open_requests} open meanwhile")
    print(f"  sweeper (opened + closed):      {sweeper * 1e9:7.0f} ns per request")
    print(f"  timer per stream (arm + cancel): {timer * 1e9:7.0f} ns per request")
    print(f"  sweep, per notice sent:          {sweep * 1e9:7.0f} ns")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--open", type=int, default=5_000)
    ns = p.parse_args()
    asyncio.run(main(ns.requests, ns.open))
