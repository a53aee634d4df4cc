"""The reference row of bench/run.py: the least a Python ext_proc server can do to route.

Why it exists: what the ext_proc data plane costs is only meaningful next to what any ext_proc
routing in Python costs (grpcio's per-stream price, Envoy's side of the stream). This server
answers each stream's request headers with a prebuilt answer (``x-llm-variant``, 90% stable, 10%
canary, route cache cleared) and ends the stream: no header reading, no stickiness, no telemetry,
no Redis. The package's sidecar aims to cost no more than this. ``--uvloop`` runs it on the event
loop the sidecar uses (the ``minimal-uvloop`` row).

    .venv/bin/python bench/minimal_extproc.py --listen 127.0.0.1:50071
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal

import grpc
import uvloop
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc


def _answer(variant: str) -> pb.ProcessingResponse:
    header = HeaderValueOption(
        header=HeaderValue(key="x-llm-variant", raw_value=variant.encode()),
        append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )
    return pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(
            response=pb.CommonResponse(
                header_mutation=pb.HeaderMutation(set_headers=[header]), clear_route_cache=True
            )
        )
    )


STABLE, CANARY = _answer("stable"), _answer("canary")


class Minimal(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    async def Process(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        if await context.read() is grpc.aio.EOF:
            return
        await context.write(CANARY if random.random() < 0.1 else STABLE)


async def serve(listen: str) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.max_ping_strikes", 0),
            ("grpc.max_concurrent_streams", 10_000),
        ]
    )
    pb_grpc.add_ExternalProcessorServicer_to_server(Minimal(), server)
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, help="host:port")
    ap.add_argument("--uvloop", action="store_true", help="on uvloop's loop, as the sidecar runs")
    args, _ = ap.parse_known_args()  # bench/run.py passes every helper the same arguments
    (uvloop.run if args.uvloop else asyncio.run)(serve(args.listen))


if __name__ == "__main__":
    main()
