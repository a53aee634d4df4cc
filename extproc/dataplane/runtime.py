"""Live weights for ``dataplane: native``: the sidecar serves Envoy's runtime layer over RTDS.

Envoy routes by itself with weights read from its runtime (``extproc.routing.<cluster>``, basis
points). Each sidecar replica follows the live routing in Redis as before and pushes every change
to the Envoys connected to it: one message per change, none per request. Until a replica has read
Redis it sends nothing, and Envoy keeps its static weights (all on stable) or the last layer it
got; when the replica goes away Envoy keeps the last layer and reconnects to another replica.

The protocol is xDS state of the world for one resource: Envoy asks for the layer, the server
answers with the whole layer, Envoy acknowledges (or rejects, with ``error_detail``), the server
sends again when the routing changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
from envoy.service.runtime.v3 import rtds_pb2, rtds_pb2_grpc
from google.protobuf import any_pb2
from google.protobuf.struct_pb2 import Struct

from extproc.contract.envoy import RUNTIME_LAYER
from extproc.routing.lanes import runtime_weights
from extproc.routing.live import LiveRouting, Routing

log = logging.getLogger(__name__)

TYPE_URL = "type.googleapis.com/envoy.service.runtime.v3.Runtime"
_Context = grpc.aio.ServicerContext[DiscoveryRequest, DiscoveryResponse]


def layer_response(routing: Routing) -> DiscoveryResponse:
    """The whole runtime layer for a routing; the routing version is the xDS version."""
    layer = Struct()
    layer.update(runtime_weights(routing.experiment, routing.weights))
    resource = any_pb2.Any()
    resource.Pack(rtds_pb2.Runtime(name=RUNTIME_LAYER, layer=layer))
    version = str(routing.version)
    return DiscoveryResponse(
        version_info=version, resources=[resource], type_url=TYPE_URL, nonce=version
    )


class RuntimeService(rtds_pb2_grpc.RuntimeDiscoveryServiceServicer):
    """Serves the runtime layer to every Envoy that asks, and pushes each routing change."""

    def __init__(self, live: LiveRouting) -> None:
        self.live = live
        self._changed = asyncio.Event()

    def routing_changed(self) -> None:
        """Wake every stream; called by the sidecar when the live routing changes."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def StreamRuntime(
        self, request_iterator: AsyncIterator[DiscoveryRequest], context: _Context
    ) -> AsyncIterator[DiscoveryResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        if RUNTIME_LAYER not in first.resource_names:
            log.warning("RTDS asks for %s; served: %r", first.resource_names, RUNTIME_LAYER)
        acks = asyncio.create_task(self._read_acks(request_iterator))
        try:
            await self.live.loaded.wait()
            sent = -1
            while True:
                changed = self._changed
                routing = self.live.current
                if routing.version != sent:
                    yield layer_response(routing)
                    sent = routing.version
                await changed.wait()
        finally:
            acks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acks

    # Envoy is configured for the state-of-the-world stream only; the incremental and polling
    # forms keep the generated base's answer, UNIMPLEMENTED.
    DeltaRuntime = rtds_pb2_grpc.RuntimeDiscoveryServiceServicer.DeltaRuntime
    FetchRuntime = rtds_pb2_grpc.RuntimeDiscoveryServiceServicer.FetchRuntime

    async def _read_acks(self, requests: AsyncIterator[DiscoveryRequest]) -> None:
        """Envoy acknowledges each layer; a rejection names the reason, which goes to the log."""
        async for req in requests:
            if req.HasField("error_detail"):
                log.error(
                    "Envoy rejected runtime layer version %s: %s",
                    req.response_nonce,
                    req.error_detail.message,
                )
