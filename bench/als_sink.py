"""An access-log sink for bench/run.py: Envoy's gRPC access log (ALS) into telemetry events.

Why it exists: the ``hash-als`` configuration of ``bench/proxies.py`` sends Envoy's ``http_grpc``
access log (one entry per request, many to a message over one long-lived stream) somewhere other
than the package's sidecar: it runs no sidecar at all. This process receives those
entries and serves them with the package's own code:
``extproc.dataplane.accesslog.AccessLogService`` and ``EntryMapper`` (the mapping ``dataplane:
native`` ships: variant from the echoed header, assignment and keyed hash of the sticky key, status,
timings, bytes, error class, and TTFT, tokens and answer signals when a Lua filter put them in
dynamic metadata), writing with the package's ``TelemetryWriter``. So the benchmark measures the
whole cost of that design (Envoy's side, the Python side and Redis) with the mapping written once,
and changes nothing in the package. The configuration has no Lua filter, so its events lack TTFT
and tokens.

With ``--discard`` it receives and decodes every message and maps none of its entries (the
``native-sink`` configuration): what Envoy's access log costs with a sidecar that costs nothing.

    .venv/bin/python bench/als_sink.py --experiment exp.json --listen 127.0.0.1:50061 \
        --redis-url redis://127.0.0.1:6390/0
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import grpc
from envoy.service.accesslog.v3 import als_pb2_grpc

from extproc import store
from extproc.config import Experiment, load_experiment
from extproc.dataplane.accesslog import AccessLogService, EntryMapper
from extproc.dataplane.event import EventBuilder
from extproc.telemetry.writer import TelemetryWriter

log = logging.getLogger("als_sink")
RECORDER = "als-sink"


async def serve(experiment: Experiment, listen: str, redis_url: str, discard: bool) -> None:
    """Serve until SIGTERM/SIGINT, then flush what is buffered."""
    redis = store.connect(redis_url)
    writer = TelemetryWriter(redis)
    server = grpc.aio.server(
        options=[
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.max_ping_strikes", 0),
        ]
    )
    mapper = EntryMapper.for_experiment(
        experiment, EventBuilder.for_experiment(experiment, RECORDER)
    )
    # One experiment: every entry is its (or, discarding, none is).
    mapper_for = (lambda _entry: None) if discard else (lambda _entry: mapper)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(
        AccessLogService(mapper_for, writer.submit), server
    )
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    task = asyncio.create_task(writer.run())
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop(grace=1.0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await redis.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--listen", required=True, help="host:port")
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--discard", action="store_true", help="decode every entry, map none")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve(load_experiment(args.experiment), args.listen, args.redis_url, args.discard))


if __name__ == "__main__":
    main()
