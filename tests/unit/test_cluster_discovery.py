"""On-demand clusters (delta CDS): what a stream answers as Envoy subscribes and as the
experiments change."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DeltaDiscoveryResponse
from redis.exceptions import ConnectionError as RedisConnectionError

from extproc.contract.clusters import variant_cluster
from extproc.dataplane.clusters import TYPE_URL, ClusterDiscovery

pytestmark = pytest.mark.timeout(10)


class Envoy:
    """The Envoy side of one stream: requests are sent when the test says."""

    def __init__(self) -> None:
        self.requests: asyncio.Queue[DeltaDiscoveryRequest | None] = asyncio.Queue()

    async def stream(self) -> AsyncIterator[DeltaDiscoveryRequest]:
        while (req := await self.requests.get()) is not None:
            yield req

    def subscribe(self, *names: str) -> None:
        self.requests.put_nowait(
            DeltaDiscoveryRequest(type_url=TYPE_URL, resource_names_subscribe=list(names))
        )


def names(resp: DeltaDiscoveryResponse) -> tuple[list[str], list[str]]:
    return [r.name for r in resp.resources], list(resp.removed_resources)


async def test_subscriptions_are_answered_and_changes_pushed() -> None:
    clusters = {"chat_canary": variant_cluster("chat_canary", "127.0.0.1:9001")}
    server = ClusterDiscovery(lambda: dict(clusters))
    envoy = Envoy()
    answers = server.DeltaClusters(envoy.stream(), None)  # type: ignore[arg-type]

    envoy.subscribe("chat_canary", "nope")
    first = await anext(answers)
    assert names(first) == (["chat_canary"], ["nope"])  # unknown: "does not exist", at once
    unpacked = Cluster()
    first.resources[0].resource.Unpack(unpacked)
    assert unpacked == clusters["chat_canary"]

    # An unchanged cluster is not sent again; a moved one is, a gone one is removed.
    clusters["chat_canary"] = variant_cluster("chat_canary", "127.0.0.1:9002")
    server.changed()
    assert names(await anext(answers)) == (["chat_canary"], [])
    del clusters["chat_canary"]
    clusters["nope"] = variant_cluster("nope", "127.0.0.1:9003")
    server.changed()
    assert names(await anext(answers)) == (["nope"], ["chat_canary"])

    envoy.requests.put_nowait(None)  # Envoy goes away: the stream ends
    with pytest.raises(StopAsyncIteration):
        await anext(answers)


async def test_an_unknown_cluster_is_looked_up_again_before_it_is_called_nonexistent() -> None:
    """Another replica may route to an experiment this one has not read yet: its clusters are
    read again, and only what is still unknown is answered "does not exist"."""
    clusters: dict[str, Cluster] = {}
    reads = 0

    async def refresh() -> None:
        nonlocal reads
        reads += 1
        clusters["legacy_stable"] = variant_cluster("legacy_stable", "127.0.0.1:9004")

    server = ClusterDiscovery(lambda: dict(clusters), refresh)
    envoy = Envoy()
    answers = server.DeltaClusters(envoy.stream(), None)  # type: ignore[arg-type]

    envoy.subscribe("legacy_stable")
    assert names(await anext(answers)) == (["legacy_stable"], [])
    assert reads == 1
    envoy.subscribe("nope")
    assert names(await anext(answers)) == ([], ["nope"])
    assert reads == 2
    envoy.requests.put_nowait(None)
    with pytest.raises(StopAsyncIteration):
        await anext(answers)


async def test_a_failed_lookup_answers_with_what_is_known() -> None:
    async def refresh() -> None:
        raise RedisConnectionError("redis went away")

    server = ClusterDiscovery(dict, refresh)
    envoy = Envoy()
    answers = server.DeltaClusters(envoy.stream(), None)  # type: ignore[arg-type]
    envoy.subscribe("legacy_stable")
    assert names(await anext(answers)) == ([], ["legacy_stable"])
    envoy.requests.put_nowait(None)
    with pytest.raises(StopAsyncIteration):
        await anext(answers)
