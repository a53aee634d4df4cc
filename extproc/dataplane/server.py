"""The gRPC server: route each ext_proc stream, capture the sampled ones, turn the access log into
telemetry.

Envoy opens one ext_proc stream per request, for routing alone: the router answers the request
headers and the stream ends. A request in the captured sample was answered with a
``mode_override``, so its stream goes on with its bodies, which the observer reads for the
capture. Every request's telemetry event comes from Envoy's access log (one long-lived stream per
Envoy), on both data planes; for ``dataplane: native`` the server also serves Envoy's runtime
layer (RTDS, the live weights) and no ext_proc stream is opened at all.
Background tasks follow the live routing in Redis, flush telemetry, and publish this replica's
counters with a TTL so that operators can see which replicas are alive.

Background tasks run supervised (``extproc.supervise``): one that dies of an unexpected error is
logged and restarted with backoff, and the replica reports NOT_SERVING until it runs again.

The standard gRPC health service answers probes (Kubernetes ``grpc`` probes, Envoy's gRPC health
check): NOT_SERVING until the live routing has been read from Redis once, because a replica that
only knows the file's weights could send users to a candidate that was rolled back meanwhile;
SERVING from then on, also while Redis is away (the last good routing stays right), except while
a background task is down (a dead routing follower would never apply a rollback); NOT_SERVING
again when it drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import uvloop
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.cluster.v3 import cds_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.service.runtime.v3 import rtds_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from extproc import store
from extproc.config import Experiment
from extproc.contract import headers as h
from extproc.contract import keys
from extproc.contract.clusters import variant_cluster
from extproc.contract.envoy import (
    ATTRIBUTES_KEY,
    METADATA_NAMESPACE,
    MODEL_KEY,
    PASSED_KEY,
    ROUTE_ATTRIBUTE,
    SIDECAR_SERVICE,
)
from extproc.contract.selection import RequestTraits
from extproc.dataplane.accesslog import AccessLogService, EntryMapper, model_of
from extproc.dataplane.catalog import Catalog, Lane
from extproc.dataplane.clusters import ClusterDiscovery
from extproc.dataplane.observer import Observation, ObserverContext
from extproc.dataplane.router import PASS_THROUGH, continue_answer
from extproc.dataplane.runtime import RuntimeService
from extproc.routing.decide import read_headers
from extproc.routing.live import Routing
from extproc.supervise import TaskGroup, raise_if_cancelled
from extproc.telemetry.prometheus import SidecarMetrics, serve_metrics
from extproc.telemetry.writer import MAX_CAPTURE_BYTES, TelemetryWriter

log = logging.getLogger(__name__)

# Envoy pings idle HTTP/2 connections; grpcio answers pings more often than it allows with GOAWAY
# too_many_pings unless told to accept them.
GRPC_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_concurrent_streams", 10_000),
    ("grpc.so_reuseport", 1),
]


_Context = grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse]


async def _next(context: _Context) -> pb.ProcessingRequest | None:
    """The stream's next message; None at its end (grpc.aio's EOF, which the stubs' ``read``
    leaves out of its type)."""
    msg: object = await context.read()
    return msg if isinstance(msg, pb.ProcessingRequest) else None


def _model(req: pb.ProcessingRequest) -> str | None:
    """The body's model, forwarded by a fleet listener (Envoy's JSON-to-metadata filter)."""
    md = req.metadata_context.filter_metadata.get(METADATA_NAMESPACE)
    if md is None or MODEL_KEY not in md.fields:
        return None
    return md.fields[MODEL_KEY].string_value or None


def _route_name(req: pb.ProcessingRequest) -> str | None:
    """The gateway route the request matched before the sidecar routed it (fleet listener)."""
    attrs = req.attributes.get(ATTRIBUTES_KEY)
    if attrs is None or ROUTE_ATTRIBUTE not in attrs.fields:
        return None
    return attrs.fields[ROUTE_ATTRIBUTE].string_value or None


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, catalog: Catalog, unmatched: Callable[[], None] = lambda: None) -> None:
        self.catalog = catalog
        self.unmatched = unmatched

    def route(self, req: pb.ProcessingRequest) -> tuple[Lane | None, pb.ProcessingResponse]:
        """The lane a stream's first message belongs to, and the answer to it. A fleet sidecar
        files the request under an experiment first; a request none takes passes through."""
        catalog = self.catalog
        only = catalog.only
        if only is not None:
            return only, only.router.answer(req)
        if req.WhichOneof("request") != "request_headers":
            # Not sent by a fleet listener's configuration: let it through unchanged.
            return None, continue_answer(req) or PASS_THROUGH
        try:
            hdrs = read_headers(req.request_headers.headers, catalog.wanted)
            if h.SHADOW_COPY in hdrs:  # a mirrored copy: its primary named the experiment
                lane = catalog.lane_named(hdrs.get(h.EXPERIMENT, b"").decode("utf-8", "replace"))
                return lane, PASS_THROUGH if lane is None else lane.router.decide(hdrs)
            traits = RequestTraits(_model(req), _route_name(req), hdrs)
            lane = catalog.lane_for(traits)
        except Exception:
            log.exception("filing the request under an experiment failed; passing it through")
            return None, PASS_THROUGH
        if lane is None:
            catalog.unmatched += 1
            self.unmatched()
            return None, PASS_THROUGH
        return lane, lane.router.decide(hdrs, traits.model, traits.route)

    # grpc.aio also takes a coroutine that reads and writes through the context, which the
    # generated stub's signature (an iterator of answers) does not describe.
    async def Process(  # type: ignore[override]
        self, request_iterator: object, context: _Context
    ) -> None:
        req = await _next(context)
        if req is None:
            return
        lane, answer = self.route(req)
        await context.write(answer)
        if lane is not None and answer.HasField("mode_override"):
            await self._capture(lane.observer, req, context)
        # Otherwise the request headers were the only message: ending the stream here, rather
        # than waiting in read() until Envoy resets it, avoids a cancelled pending receive,
        # which leaks native memory in grpc.aio (grpc/grpc#43360; ~100 B a request).

    async def _capture(
        self, observer: ObserverContext, first: pb.ProcessingRequest, context: _Context
    ) -> None:
        """Answer a captured request's remaining messages, reading them for its capture, until
        its response ended; then end the stream. Envoy waits for each answer, so each is sent
        before anything else is done with the message."""
        obs = Observation(observer)
        try:
            obs.on_message(first)
            while not obs.emitted:
                req = await _next(context)
                if req is None:
                    return
                obs.on_message(req)
                await context.write(obs.answer(req))
        finally:
            obs.close()


@dataclass(frozen=True)
class TlsFiles:
    """The sidecar's certificate and key (PEM); with ``client_ca``, clients must present a
    certificate it signed (mutual TLS). Read once at start: rotate by restarting replicas."""

    cert: str
    key: str
    client_ca: str | None = None

    def credentials(self) -> grpc.ServerCredentials:
        def read(path: str) -> bytes:
            with open(path, "rb") as f:
                return f.read()

        ca = None if self.client_ca is None else read(self.client_ca)
        return grpc.ssl_server_credentials(
            [(read(self.key), read(self.cert))],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


@dataclass(frozen=True)
class SidecarSettings:
    listen: str = "127.0.0.1:50051"  # host:port or unix:/path
    redis_url: str = store.DEFAULT_REDIS_URL
    instance: str = ""
    max_buffer: int = 100_000
    max_capture_bytes: int = MAX_CAPTURE_BYTES  # captured texts buffered while Redis is away
    heartbeat_s: float = 1.0
    metrics: str | None = None  # host:port of the Prometheus endpoint; None = off
    tls: TlsFiles | None = None  # None: plaintext (Unix socket, or a network you trust)
    known_clusters: bool = False  # fleet: variants may name clusters Envoy has (no address)


class Sidecar:
    """One replica: a sidecar for ``experiment`` (run from its file), or, with None, a fleet
    sidecar serving every live experiment in Redis (see :mod:`extproc.dataplane.catalog`)."""

    def __init__(self, experiment: Experiment | None, settings: SidecarSettings) -> None:
        self.settings = settings
        self.instance = settings.instance or f"{socket.gethostname()}-{os.getpid()}"
        self.redis = store.connect(settings.redis_url)
        self._beat = asyncio.Event()
        self.writer = TelemetryWriter(
            self.redis,
            max_buffer=settings.max_buffer,
            max_capture_bytes=settings.max_capture_bytes,
        )
        self.metrics = SidecarMetrics()
        self.emit = self.metrics.tee(self.writer.submit)
        self.fleet = experiment is None
        self.catalog = Catalog(
            self.redis,
            self._lane,
            fixed=experiment,
            on_change=self._catalog_changed,
            known_clusters=settings.known_clusters,
        )
        only = self.catalog.only
        self.native = only is not None and only.experiment.spec.dataplane == "native"
        self.runtime = None if only is None else RuntimeService(only.live)
        # A fleet reads the experiments again before telling Envoy a cluster does not exist.
        catalog = self.catalog
        self.clusters = ClusterDiscovery(self._clusters, catalog.refresh if catalog.fleet else None)
        self.started = time.time()
        self.health = health.aio.HealthServicer()
        self.tasks = TaskGroup(self._report_health)

    def _lane(self, experiment: Experiment, digest: str) -> Lane:
        self.metrics.declare(
            experiment.name,
            experiment.variant_names,
            {v: spec.price for v, spec in experiment.spec.variants.items()},
        )
        return Lane.build(
            experiment,
            redis=self.redis,
            instance=self.instance,
            writer=self.writer,
            fleet=self.fleet,
            on_change=self._routing_changed,
            digest=digest,
        )

    def _routing_changed(self, _routing: Routing) -> None:
        """Push a new routing to the Envoys that read weights from us (dataplane native), and
        report it at once: operators (and tests) wait for every replica."""
        if self.runtime is not None:
            self.runtime.routing_changed()
        self._beat.set()

    def _catalog_changed(self) -> None:
        """A fleet's experiments changed: the clusters Envoy may discover, the heartbeat."""
        self.clusters.changed()
        self._beat.set()

    def _clusters(self) -> dict[str, Cluster]:
        return {c: variant_cluster(c, a) for c, a in self.catalog.variant_addresses().items()}

    def _mapper_for(self, entry: HTTPAccessLogEntry) -> EntryMapper | None:
        """A fleet's entries name their experiment (the sidecar set the header); one the
        sidecar did not route (down, late) is filed by its model and route as the request
        would have been, so that its fallback to the gateway route is counted."""
        catalog = self.catalog
        only = catalog.only
        if only is not None:
            return only.mapper
        name = entry.request.request_headers.get(h.EXPERIMENT)
        md = entry.common_properties.metadata.filter_metadata.get(METADATA_NAMESPACE)
        if md is not None and PASSED_KEY in md.fields:
            return None  # the sidecar passed it through: no experiment took it
        if name is not None:
            lane = catalog.lane_named(name)
        else:
            traits = RequestTraits(model_of(entry), entry.common_properties.route_name or None)
            lane = catalog.lane_for(traits)
        return None if lane is None else lane.mapper

    def _add_services(self, server: grpc.aio.Server) -> None:
        """ext_proc and the access log for the default data plane (and on-demand clusters for a
        fleet); RTDS and the access log for the native one."""
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(
            AccessLogService(self._mapper_for, self.emit), server
        )
        if self.runtime is not None and self.native:
            rtds_pb2_grpc.add_RuntimeDiscoveryServiceServicer_to_server(self.runtime, server)
            return
        pb_grpc.add_ExternalProcessorServicer_to_server(
            ExternalProcessor(self.catalog, self.metrics.unmatched.inc), server
        )
        if self.fleet:
            cds_pb2_grpc.add_ClusterDiscoveryServiceServicer_to_server(self.clusters, server)

    async def _heartbeat(self) -> None:
        key = keys.sidecar(self.instance)
        while True:
            raise_if_cancelled()
            self._beat.clear()
            s = self.writer.stats
            try:
                await store.heartbeat(
                    self.redis,
                    key,
                    keys.SIDECARS,
                    self.instance,
                    {
                        **self._serving(),
                        "tasks_down": ",".join(sorted(self.tasks.down)),
                        "submitted": s.submitted,
                        "written": s.written,
                        "dropped": s.dropped,
                        "captures_dropped": s.captures_dropped,
                        "buffered": self.writer.buffered,
                        "pid": os.getpid(),
                        "started": self.started,
                    },
                    max(3, int(self.settings.heartbeat_s * 5)),
                )
            except (RedisError, OSError):
                log.debug("heartbeat failed", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat.wait(), self.settings.heartbeat_s)

    def _serving(self) -> dict[FieldT, EncodableT]:
        """What the heartbeat says of the routing applied: the experiment and its routing
        version; for a fleet, ``*`` and every experiment's version (JSON)."""
        catalog = self.catalog
        only = catalog.only
        if only is not None:
            return {
                "experiment": only.name,
                "routing_version": only.live.current.version,
                "routing_error": only.live.routing_error or "",
            }
        versions = {n: lane.live.current.version for n, lane in catalog.lanes.items()}
        return {
            "experiment": "*",
            "versions": json.dumps(versions, sort_keys=True),
            "unmatched": catalog.unmatched,
            "routing_error": catalog.routing_error or "",
        }

    async def _report_health(self) -> None:
        """SERVING once the live routing was read and while every background task runs."""
        ok = self.catalog.is_loaded and self.tasks.healthy
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ok
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SIDECAR_SERVICE):
            await self.health.set(service, status)

    async def _serving_once_loaded(self) -> None:
        await self.catalog.wait_loaded()
        await self._report_health()

    def _refresh_gauges(self) -> None:
        """Gauges read at scrape time: no work on the request path for them."""
        m, catalog = self.metrics, self.catalog
        m.set_telemetry(dropped_total=self.writer.stats.dropped, buffered=self.writer.buffered)
        for name, lane in catalog.lanes.items():
            routing = lane.live.current
            m.set_routing(name, routing.version, routing.weights)
        for name in catalog.retired:
            m.forget_routing(name)
        m.experiments.set(len(catalog.lanes))
        m.set_redis_up(catalog.reaches_redis and self.writer.stats.redis_ok)

    async def run(self, ready: Callable[[str], None] | None = None) -> None:
        """Serve until SIGTERM/SIGINT or cancellation; drain streams, then flush telemetry."""
        server = grpc.aio.server(options=GRPC_OPTIONS)
        self._add_services(server)
        servicer = self.health
        await self._report_health()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        tls = self.settings.tls
        if tls is None:
            bound = server.add_insecure_port(self.settings.listen)
        else:
            bound = server.add_secure_port(self.settings.listen, tls.credentials())
        if not self.settings.listen.startswith("unix:") and bound == 0:
            raise OSError(f"cannot listen on {self.settings.listen}")
        self.tasks.start("live-routing", self.catalog.run)
        self.tasks.start("telemetry", self.writer.run)
        self.tasks.start("heartbeat", self._heartbeat)
        self.tasks.start("health", self._serving_once_loaded)
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
        only = self.catalog.only
        serving = only.name if only is not None else "every experiment in Redis"
        log.info("sidecar %s serving %s on %s", self.instance, serving, where)
        if ready is not None:
            ready(where)
        try:
            await stop.wait()
        finally:
            await servicer.enter_graceful_shutdown()
            await server.stop(grace=2.0)
            if runner is not None:
                await runner.cleanup()
            await self.tasks.close()
            await self.redis.aclose()


def run_sidecar(sidecar: Sidecar, ready: Callable[[str], None] | None = None) -> None:
    """Run ``sidecar`` until it stops, on uvloop's event loop.

    Why uvloop: every routed request is a gRPC stream whose events (a new call, its message, the
    answer, its end) each wake the event loop; uvloop's libuv loop wakes and dispatches them for
    less than the standard library's, which shows in the latency Envoy waits for the answer
    (docs/PERFORMANCE.md, "The event loop"). grpc.aio runs on any asyncio loop.
    """
    uvloop.run(sidecar.run(ready))
