"""The clusters of every live experiment's variants, served to Envoy on demand (delta CDS).

A fleet Envoy routes a request the sidecar filed under an experiment to the cluster the sidecar
named (``x-llm-cluster``). A new experiment's clusters are in no bootstrap: Envoy's on-demand
filter asks for a cluster it does not know over delta CDS, holding the request until the answer
(or its timeout), and this server answers from the experiments in Redis. So a rollout created
while traffic flows needs no Envoy restart and no config push.

Protocol (delta xDS, one stream per Envoy): Envoy subscribes to names as requests need them; the
server answers each subscribed name it knows with the cluster and a version (a hash of the
cluster's definition), and lists a name it does not know in ``removed_resources``, which tells
Envoy the cluster does not exist, so that the request fails at once rather than at the
discovery timeout; but first it reads the experiments again (``refresh``): another replica may
already route requests to an experiment this one has not read yet, and Envoy would answer 503 to
each of them. When the experiments change, every stream gets the new version of each
subscribed cluster whose definition changed, and the removal of each that no live experiment
names any more (a request already on its way to it finishes). A rejection (``error_detail``)
goes to the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import grpc
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.service.cluster.v3 import cds_pb2_grpc
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    Resource,
)
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

TYPE_URL = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
_Context = grpc.aio.ServicerContext[DeltaDiscoveryRequest, DeltaDiscoveryResponse]


def version_of(cluster: Cluster) -> str:
    return hashlib.sha256(cluster.SerializeToString(deterministic=True)).hexdigest()[:16]


class _Stream:
    """What one Envoy subscribed to and what it was last told of each name (a version, or
    ``""`` for "does not exist")."""

    def __init__(self) -> None:
        self.subscribed: set[str] = set()
        self.told: dict[str, str] = {}
        self.wake = asyncio.Event()

    def read(self, req: DeltaDiscoveryRequest) -> None:
        if req.HasField("error_detail"):
            log.error(
                "Envoy rejected clusters (nonce %s): %s",
                req.response_nonce,
                req.error_detail.message,
            )
        for name in req.resource_names_unsubscribe:
            self.subscribed.discard(name)
            self.told.pop(name, None)
        for name in req.resource_names_subscribe:
            self.subscribed.add(name)
            # What Envoy holds after a reconnection (it may have it from another replica).
            self.told.pop(name, None)
            known = req.initial_resource_versions.get(name)
            if known:
                self.told[name] = known
        if req.resource_names_subscribe:
            self.wake.set()

    def asks_unknown(self, clusters: Mapping[str, Cluster]) -> bool:
        """Whether Envoy asks for a cluster it was not told of and ``clusters`` lacks."""
        return any(n not in self.told and n not in clusters for n in self.subscribed)

    def answer(self, clusters: Mapping[str, Cluster], nonce: int) -> DeltaDiscoveryResponse | None:
        """The changes Envoy has not been told yet; None when there are none."""
        out = DeltaDiscoveryResponse(type_url=TYPE_URL, nonce=str(nonce))
        for name in sorted(self.subscribed):
            cluster = clusters.get(name)
            version = "" if cluster is None else version_of(cluster)
            if self.told.get(name) == version:
                continue
            if cluster is None:
                out.removed_resources.append(name)
            else:
                r = Resource(name=name, version=version)
                r.resource.Pack(cluster)
                out.resources.append(r)
            self.told[name] = version
        if not out.resources and not out.removed_resources:
            return None
        return out


class ClusterDiscovery(cds_pb2_grpc.ClusterDiscoveryServiceServicer):
    """Serves ``provider()`` (cluster name -> Cluster, what exists now) on demand; ``refresh``
    reads the experiments again before a cluster Envoy asks for is called nonexistent."""

    def __init__(
        self,
        provider: Callable[[], Mapping[str, Cluster]],
        refresh: Callable[[], Awaitable[object]] | None = None,
        *,
        refresh_timeout_s: float = 1.0,
    ) -> None:
        self.provider = provider
        self.refresh = refresh
        self.refresh_timeout_s = refresh_timeout_s
        self._streams: set[_Stream] = set()
        self._nonce = 0
        self._refreshing = asyncio.Lock()
        self._refreshes = 0  # reads begun

    async def _catch_up(self) -> None:
        """Read the experiments again, once for every stream that asks meanwhile. On Redis
        trouble the clusters stay as they are (Envoy then hears "does not exist")."""
        if self.refresh is None:
            return
        asked = self._refreshes
        async with self._refreshing:
            if self._refreshes > asked:  # a read that began after this asked has ended
                return
            self._refreshes += 1
            try:
                await asyncio.wait_for(self.refresh(), self.refresh_timeout_s)
            # KeyError: redis-py's cluster client while its slot map is being rebuilt.
            except (RedisError, OSError, TimeoutError, KeyError) as err:
                log.warning("clusters: reading the experiments again failed: %s", err)

    def changed(self) -> None:
        """Wake every stream: the experiments, so the clusters, changed."""
        for stream in self._streams:
            stream.wake.set()

    async def DeltaClusters(
        self, request_iterator: AsyncIterator[DeltaDiscoveryRequest], context: _Context
    ) -> AsyncIterator[DeltaDiscoveryResponse]:
        stream = _Stream()
        self._streams.add(stream)

        async def read() -> None:
            async for req in request_iterator:
                if req.type_url and req.type_url != TYPE_URL:
                    log.warning("delta CDS stream asks for %s; served: clusters", req.type_url)
                    continue
                stream.read(req)

        reader = asyncio.create_task(read())
        try:
            while not reader.done():
                waiting = asyncio.create_task(stream.wake.wait())
                try:
                    await asyncio.wait({waiting, reader}, return_when=asyncio.FIRST_COMPLETED)
                finally:  # cancelled here too (Envoy reset the stream): no task left waiting
                    waiting.cancel()
                stream.wake.clear()
                clusters = self.provider()
                if stream.asks_unknown(clusters):
                    await self._catch_up()
                    clusters = self.provider()
                self._nonce += 1
                answer = stream.answer(clusters, self._nonce)
                if answer is not None:
                    yield answer
        finally:
            self._streams.discard(stream)
            reader.cancel()
            # The stream's end, however it came (Envoy went away, a broken message), ends it.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    # Envoy is configured for on-demand (delta) discovery only; the state-of-the-world and
    # polling forms keep the generated base's answer, UNIMPLEMENTED.
    StreamClusters = cds_pb2_grpc.ClusterDiscoveryServiceServicer.StreamClusters
    FetchClusters = cds_pb2_grpc.ClusterDiscoveryServiceServicer.FetchClusters
