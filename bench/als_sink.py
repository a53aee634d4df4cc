"""A prototype telemetry path for bench/run.py: Envoy's gRPC access log (ALS) instead of ext_proc.

Why it exists: the shipped sidecar observes every request over its own ext_proc stream (request
headers, response headers, each body chunk: one gRPC message each, one stream per request). An
``http_grpc`` access logger sends one entry per request instead, batched many to a message over
one long-lived stream, after the response is done. This server receives those entries, turns each
into the same ``TelemetryEvent`` the observer builds (variant, assignment kind, keyed hash of the
sticky key, status, time to headers, duration, bytes, error class) and hands it to the package's
own :class:`~extproc.telemetry.writer.TelemetryWriter`, so the benchmark measures the whole cost
of that design: Envoy's side, the Python side and Redis. It imports the package and changes none
of it.

Time to first *token* and ``usage`` token counts need the response body, which an access log does
not carry; with the ``hash-lua-als`` variant a Lua filter puts them in dynamic metadata
(``extproc``: ``first_token_us``, ``prompt_tokens``, ``completion_tokens``), which the entry
carries and this sink reads. Without it those fields stay unset. Refusal and answer checks (the
answer's text) are out of reach of both.

    .venv/bin/python bench/als_sink.py --experiment exp.json --listen 127.0.0.1:50061 \
        --redis-url redis://127.0.0.1:6390/0
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import AsyncIterator

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf.duration_pb2 import Duration

from extproc import headers as h
from extproc import store
from extproc.config import Experiment, load_experiment
from extproc.sidecar.decide import Policy, attribute
from extproc.sidecar.observer import classify
from extproc.telemetry.v1.event_pb2 import TelemetryEvent
from extproc.telemetry.writer import TelemetryWriter

log = logging.getLogger("als_sink")


def _ms(d: Duration) -> float:
    return d.seconds * 1e3 + d.nanos / 1e6


class AccessLogSink(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """One TelemetryEvent per HTTP access-log entry, submitted to the package's writer."""

    def __init__(self, experiment: Experiment, writer: TelemetryWriter, recorder: str) -> None:
        self.experiment = experiment
        self.policy = Policy.compile(experiment)
        self.variants = tuple(experiment.variant_names)
        self.writer = writer
        self.recorder = recorder
        self.entries = 0

    def event(self, entry: al.HTTPAccessLogEntry) -> TelemetryEvent:
        req, resp, common = entry.request, entry.response, entry.common_properties
        hdrs = {k: v.encode() for k, v in req.request_headers.items()}
        variant = resp.response_headers.get(h.VARIANT)
        if variant is not None:
            hdrs[h.VARIANT] = variant.encode()
        who = attribute(self.policy, self.experiment.stable, hdrs, self.variants)
        ev = TelemetryEvent(
            experiment=self.experiment.name,
            recorder=self.recorder,
            variant=who.variant,
            assignment=who.assignment,
            key_hash=who.key_hash,
            request_id=req.request_id,
            status=resp.response_code.value,
            time_unix_ms=common.start_time.seconds * 1000 + common.start_time.nanos // 1_000_000,
            response_bytes=resp.response_body_bytes,
        )
        got_headers = common.HasField("time_to_first_downstream_tx_byte")
        completed = common.HasField("time_to_last_downstream_tx_byte")
        if got_headers:
            ev.headers_ms = _ms(common.time_to_first_downstream_tx_byte)
        if completed:
            ev.duration_ms = _ms(common.time_to_last_downstream_tx_byte)
        ev.error = classify(  # type: ignore[assignment]
            ev.status, resp.response_code_details, completed, got_headers
        )
        md = common.metadata.filter_metadata.get("extproc")
        if md is not None:
            f = md.fields
            if "first_token_us" in f:
                start_us = common.start_time.seconds * 1e6 + common.start_time.nanos / 1e3
                ev.first_token_ms = (f["first_token_us"].number_value - start_us) / 1e3
            if "prompt_tokens" in f:
                ev.prompt_tokens = int(f["prompt_tokens"].number_value)
            if "completion_tokens" in f:
                ev.completion_tokens = int(f["completion_tokens"].number_value)
        return ev

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> als_pb2.StreamAccessLogsResponse:
        submit = self.writer.submit
        async for msg in request_iterator:
            for entry in msg.http_logs.log_entry:
                submit(self.event(entry))
                self.entries += 1
        return als_pb2.StreamAccessLogsResponse()


async def serve(experiment: Experiment, listen: str, redis_url: str) -> None:
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
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(
        AccessLogSink(experiment, writer, "als-sink"), server
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
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve(load_experiment(args.experiment), args.listen, args.redis_url))


if __name__ == "__main__":
    main()
