"""The gRPC server: dispatch each ext_proc stream to the router or the observer, nothing more.

Envoy opens one stream per request per ext_proc filter. The first message tells which filter it
came from (``observability_mode`` is set only by the observing filter), so one service serves both.
Background tasks follow the live routing in Redis, flush telemetry, and publish this replica's
counters with a TTL so that operators can see which replicas are alive.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from redis.exceptions import RedisError

from extproc import keys, store
from extproc.config import Experiment
from extproc.live import LiveRouting
from extproc.metrics import SidecarMetrics, serve_metrics
from extproc.quality import QualityRules
from extproc.sidecar.observer import Observation, ObserverContext
from extproc.sidecar.router import Router
from extproc.telemetry.writer import TelemetryWriter

log = logging.getLogger(__name__)

# Envoy pings idle HTTP/2 connections; grpcio answers pings more often than it allows with GOAWAY
# too_many_pings unless told to accept them (DESIGN.md, "Envoy facts that bite").
GRPC_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_concurrent_streams", 10_000),
    ("grpc.so_reuseport", 1),
]


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, router: Router, observer: ObserverContext) -> None:
        self.router = router
        self.observer = observer

    async def Process(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        req = await context.read()
        if req is grpc.aio.EOF:
            return
        if req.observability_mode:
            await self._observe(req, context)
            return
        answer = self.router.answer
        while req is not grpc.aio.EOF:
            await context.write(answer(req))
            req = await context.read()

    async def _observe(self, req: pb.ProcessingRequest, context: grpc.aio.ServicerContext) -> None:
        obs = Observation(self.observer)
        try:
            while req is not grpc.aio.EOF:
                obs.on_message(req)
                req = await context.read()
        finally:
            obs.close()


@dataclass(frozen=True)
class SidecarSettings:
    listen: str = "127.0.0.1:50051"  # host:port or unix:/path
    redis_url: str = store.DEFAULT_REDIS_URL
    instance: str = ""
    max_buffer: int = 100_000
    heartbeat_s: float = 1.0
    metrics: str | None = None  # host:port of the Prometheus endpoint; None = off


class Sidecar:
    def __init__(self, experiment: Experiment, settings: SidecarSettings) -> None:
        self.settings = settings
        self.instance = settings.instance or f"{socket.gethostname()}-{os.getpid()}"
        self.redis = store.connect(settings.redis_url)
        self.live = LiveRouting(experiment, self.redis)
        self.writer = TelemetryWriter(self.redis, max_buffer=settings.max_buffer)
        self.router = Router(self.live)
        self.metrics = SidecarMetrics()
        self.metrics.declare(experiment.name, experiment.variant_names)
        self.observer = ObserverContext(
            experiment=experiment.name,
            stable=experiment.stable,
            variants=tuple(experiment.variant_names),
            policy=self.router.policy,
            recorder=self.instance,
            emit=self.metrics.tee(self.writer.submit),
            rules=QualityRules.compile(experiment.spec),
            shadow_variant=experiment.spec.shadow.variant,
            capture=self.writer.submit_capture if experiment.spec.capture.sample > 0 else None,
            capture_ttl_s=experiment.spec.capture.ttl_s,
            capture_max_pairs=experiment.spec.capture.max_pairs,
        )
        self.started = time.time()

    async def _heartbeat(self) -> None:
        key = keys.sidecar(self.instance)
        while True:
            s = self.writer.stats
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.hset(
                        key,
                        mapping={
                            "experiment": self.live.experiment.name,
                            "routing_version": self.live.current.version,
                            "submitted": s.submitted,
                            "written": s.written,
                            "dropped": s.dropped,
                            "buffered": self.writer.buffered,
                            "pid": os.getpid(),
                            "started": self.started,
                        },
                    )
                    pipe.expire(key, max(3, int(self.settings.heartbeat_s * 5)))
                    await pipe.execute()
            except (RedisError, OSError):
                log.debug("heartbeat failed", exc_info=True)
            await asyncio.sleep(self.settings.heartbeat_s)

    def _refresh_gauges(self) -> None:
        """Gauges read at scrape time: no work on the request path for them."""
        m, routing = self.metrics, self.live.current
        m.set_telemetry(dropped_total=self.writer.stats.dropped, buffered=self.writer.buffered)
        m.set_routing(self.live.experiment.name, routing.version, routing.weights)
        m.set_redis_up(self.live.redis_ok and self.writer.stats.redis_ok)

    async def run(self, ready: Callable[[str], None] | None = None) -> None:
        """Serve until SIGTERM/SIGINT or cancellation; drain streams, then flush telemetry."""
        server = grpc.aio.server(options=GRPC_OPTIONS)
        pb_grpc.add_ExternalProcessorServicer_to_server(
            ExternalProcessor(self.router, self.observer), server
        )
        bound = server.add_insecure_port(self.settings.listen)
        if not self.settings.listen.startswith("unix:") and bound == 0:
            raise OSError(f"cannot listen on {self.settings.listen}")
        tasks = [
            asyncio.create_task(self.live.run(), name="live-routing"),
            asyncio.create_task(self.writer.run(), name="telemetry"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
        ]
        await server.start()
        runner = None
        if self.settings.metrics:
            host, _, port = self.settings.metrics.rpartition(":")
            runner = await serve_metrics(
                self.metrics.registry, host, int(port), before_scrape=self._refresh_gauges
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        where = self.settings.listen
        if not where.startswith("unix:"):
            where = f"{where.rpartition(':')[0]}:{bound}"
        log.info("sidecar %s serving %s on %s", self.instance, self.live.experiment.name, where)
        if ready is not None:
            ready(where)
        try:
            await stop.wait()
        finally:
            await server.stop(grace=2.0)
            if runner is not None:
                await runner.cleanup()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.redis.aclose()
