"""A fleet sidecar against a real Redis: it follows the experiments created and ended there, files
each request under one of them by its model, route or header, pins overrides, passes the rest
through, and files access-log entries (its own and those it never routed) under the same one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.struct_pb2 import Struct

from extproc import store
from extproc.config import Experiment, parse_experiment
from extproc.contract import headers as h
from extproc.contract import keys
from extproc.contract.envoy import (
    ATTRIBUTES_KEY,
    METADATA_NAMESPACE,
    MODEL_KEY,
    PASSED_KEY,
    ROUTE_ATTRIBUTE,
)
from extproc.dataplane.clusters import TYPE_URL
from extproc.dataplane.router import PASS_THROUGH
from extproc.dataplane.server import ExternalProcessor, Sidecar, SidecarSettings
from extproc.telemetry.v1.event_pb2 import Assignment

pytestmark = pytest.mark.timeout(30)


def experiment(name: str, **extra: Any) -> Experiment:
    return parse_experiment(
        {
            "name": name,
            "salt": name,
            "stable": "stable",
            "variants": {
                "stable": {"cluster": f"{name}_stable", "address": "127.0.0.1:9001", "weight": 0},
                "canary": {
                    "cluster": f"{name}_canary",
                    "address": "127.0.0.1:9002",
                    "weight": 100,
                },
            },
            "rollout": {"stages": [50]},
            **extra,
        }
    )


# The alias is one of chat's models, pinned to stable by an override.
CHAT = experiment(
    "chat",
    match={"models": ["chat-1", "chat-1-legacy"]},
    overrides=[
        {"variant": "stable", "headers": [{"name": "x-llm-category", "values": ["coding"]}]},
        {"variant": "stable", "models": ["chat-1-legacy"]},
    ],
)
CODE = experiment("code", match={"routes": ["code"]})
TENANT = experiment("tenant", match={"headers": [{"name": "x-tenant", "values": ["acme"]}]})


def request(
    model: str | None = None, route: str | None = None, **hdrs: str
) -> pb.ProcessingRequest:
    hm = HeaderMap(
        headers=[
            HeaderValue(key=k.replace("_", "-"), raw_value=v.encode()) for k, v in hdrs.items()
        ]
    )
    req = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=hm))
    if model is not None:
        md = Struct()
        md.update({MODEL_KEY: model})
        req.metadata_context.filter_metadata[METADATA_NAMESPACE].CopyFrom(md)
    if route is not None:
        attrs = Struct()
        attrs.update({ROUTE_ATTRIBUTE: route})
        req.attributes[ATTRIBUTES_KEY].CopyFrom(attrs)
    return req


def set_headers(answer: pb.ProcessingResponse) -> dict[str, str]:
    mutation = answer.request_headers.response.header_mutation
    return {o.header.key: o.header.raw_value.decode() for o in mutation.set_headers}


@pytest.fixture
async def fleet(client: aioredis.Redis, redis_url: str) -> AsyncIterator[Sidecar]:
    sidecar = Sidecar(None, SidecarSettings(redis_url=redis_url, instance="fleet-test"))
    yield sidecar
    await sidecar.redis.aclose()


async def test_requests_are_filed_by_model_route_and_header(
    client: aioredis.Redis, fleet: Sidecar
) -> None:
    for exp in (CHAT, CODE, TENANT):
        await store.register_experiment(client, exp)
    await fleet.catalog.refresh()
    proc = ExternalProcessor(fleet.catalog)

    lane, answer = proc.route(request(model="chat-1", x_conversation_id="c1"))
    assert lane is not None
    assert lane.name == "chat"
    assert set_headers(answer) == {
        h.VARIANT: "canary",
        h.EXPERIMENT: "chat",
        h.CLUSTER: "chat_canary",
    }
    # The gateway route, then a header: each picks its own experiment.
    lane, answer = proc.route(request(model="chat-1", route="code"))
    assert lane is not None
    assert lane.name == "code"
    assert set_headers(answer)[h.CLUSTER] == "code_canary"
    lane, _ = proc.route(request(model="chat-1", route="code", x_tenant="acme"))
    assert lane is not None
    assert lane.name == "tenant"

    # Nothing takes it: untouched (no header set) and counted.
    lane, answer = proc.route(request(model="embed-3", route="embeddings"))
    assert lane is None
    assert answer is PASS_THROUGH
    assert fleet.catalog.unmatched == 1


async def test_overrides_pin_a_class_before_the_hash(
    client: aioredis.Redis, fleet: Sidecar
) -> None:
    await store.register_experiment(client, CHAT)
    await fleet.catalog.refresh()
    proc = ExternalProcessor(fleet.catalog)
    # Every assigned request goes to canary (weight 100): the pinned ones go to stable.
    for req in (
        request(model="chat-1", x_llm_category="coding"),
        request(model="chat-1-legacy"),
    ):
        _, answer = proc.route(req)
        assert set_headers(answer) == {
            h.VARIANT: "stable",
            h.FORCED: "override",
            h.EXPERIMENT: "chat",
            h.CLUSTER: "chat_stable",
        }
    _, answer = proc.route(request(model="chat-1", x_llm_category="chat"))
    assert set_headers(answer)[h.VARIANT] == "canary"


def log_entry(model: str | None, route: str, **hdrs: str) -> al.HTTPAccessLogEntry:
    entry = al.HTTPAccessLogEntry()
    entry.request.request_id = "r1"
    entry.request.request_headers.update(hdrs)
    entry.common_properties.route_name = route
    entry.response.response_code.value = 200
    if model is not None:
        md = Struct()
        md.update({MODEL_KEY: model})
        entry.common_properties.metadata.filter_metadata[METADATA_NAMESPACE].CopyFrom(md)
    return entry


async def test_access_log_entries_are_filed_like_their_requests(
    client: aioredis.Redis, fleet: Sidecar
) -> None:
    for exp in (CHAT, CODE):
        await store.register_experiment(client, exp)
    await fleet.catalog.refresh()

    def event_of(entry: al.HTTPAccessLogEntry) -> tuple[str, str, int] | None:
        mapper = fleet._mapper_for(entry)
        if mapper is None:
            return None
        ev = mapper.event(entry)
        return ev.experiment, ev.variant, ev.assignment

    routed = log_entry("chat-1", "experiment", **{h.EXPERIMENT: "code", h.VARIANT: "canary"})
    assert event_of(routed) == ("code", "canary", Assignment.ASSIGNMENT_RANDOM)
    pinned = log_entry(
        "chat-1", "experiment", **{h.EXPERIMENT: "chat", h.VARIANT: "stable", h.FORCED: "override"}
    )
    assert event_of(pinned) == ("chat", "stable", Assignment.ASSIGNMENT_OVERRIDE)
    # The sidecar never answered (down, late): the gateway's route served it, and the entry is
    # filed under the experiment the request would have gone to, as a fallback to stable.
    fell_back = log_entry("chat-1", "chat")
    assert event_of(fell_back) == ("chat", "stable", Assignment.ASSIGNMENT_FALLBACK)
    assert event_of(log_entry("embed-3", "embeddings")) is None
    # The sidecar passed it through (chat did not exist yet on the replica that answered):
    # another replica that knows chat by now must not file it under chat.
    passed = log_entry("chat-1", "chat")
    passed.common_properties.metadata.filter_metadata[METADATA_NAMESPACE].fields[
        PASSED_KEY
    ].bool_value = True
    assert event_of(passed) is None


async def test_created_and_ended_experiments_are_followed_without_a_restart(
    client: aioredis.Redis, fleet: Sidecar
) -> None:
    await store.register_experiment(client, CHAT)
    await fleet.catalog.refresh()
    proc = ExternalProcessor(fleet.catalog)
    assert proc.route(request(route="code"))[0] is None
    assert set(fleet._clusters()) == {"chat_stable", "chat_canary"}

    await store.register_experiment(client, CODE)
    await fleet.catalog.refresh()
    lane, _ = proc.route(request(route="code"))
    assert lane is not None
    assert lane.name == "code"
    assert set(fleet._clusters()) == {"chat_stable", "chat_canary", "code_stable", "code_canary"}

    assert await store.end_experiment(client, "code")
    await fleet.catalog.refresh()
    assert proc.route(request(route="code"))[0] is None
    # A request it routed before it ended still has its entry filed under it.
    late = log_entry(None, "experiment", **{h.EXPERIMENT: "code", h.VARIANT: "canary"})
    mapper = fleet._mapper_for(late)
    assert mapper is not None
    assert mapper.event(late).experiment == "code"
    # Ended, its definition stays for reading, and the sidecar does not bring it back.
    assert await store.get_definition(client, "code") is not None
    assert not await client.sismember("extproc:experiments", "code")


async def test_a_weight_change_reaches_the_fleet(client: aioredis.Redis, fleet: Sidecar) -> None:
    await store.register_experiment(client, CHAT)
    await fleet.catalog.refresh()
    await store.set_weights(client, CHAT, {"stable": 100, "canary": 0}, reason="t", actor="t")
    await fleet.catalog.refresh()
    _, answer = ExternalProcessor(fleet.catalog).route(request(model="chat-1"))
    assert set_headers(answer)[h.VARIANT] == "stable"


async def test_an_unusable_definition_is_skipped_and_the_rest_served(
    client: aioredis.Redis, fleet: Sidecar
) -> None:
    await store.register_experiment(client, CODE)
    await client.sadd("extproc:experiments", "broken")
    await client.set(keys.definition("broken"), '{"name": "broken"}')
    await fleet.catalog.refresh()
    assert set(fleet.catalog.lanes) == {"code"}


async def test_a_variant_envoy_cannot_learn_is_not_served_unless_envoy_knows_it(
    client: aioredis.Redis, redis_url: str, fleet: Sidecar
) -> None:
    doc = CODE.to_json_dict()
    del doc["variants"]["canary"]["address"]
    await store.register_experiment(client, parse_experiment(doc))
    await fleet.catalog.refresh()
    assert fleet.catalog.lanes == {}  # every request of it would meet a 503
    istio = Sidecar(None, SidecarSettings(redis_url=redis_url, known_clusters=True))
    try:
        await istio.catalog.refresh()
        assert set(istio.catalog.lanes) == {"code"}
    finally:
        await istio.redis.aclose()


async def test_clusters_of_an_experiment_not_yet_read_are_found_not_refused(
    client: aioredis.Redis, fleet: Sidecar
) -> None:
    """Another replica read a new experiment first and routes to its clusters; Envoy asks this
    one, which has not: it reads Redis again rather than answer "does not exist" (a 503)."""
    await fleet.catalog.refresh()
    await store.register_experiment(client, CODE)  # in Redis; this replica has not read it

    answered = asyncio.Event()

    async def subscribe() -> AsyncIterator[DeltaDiscoveryRequest]:
        yield DeltaDiscoveryRequest(type_url=TYPE_URL, resource_names_subscribe=["code_canary"])
        await answered.wait()  # then Envoy goes away

    answers = fleet.clusters.DeltaClusters(subscribe(), None)  # type: ignore[arg-type]
    first = await anext(answers)
    answered.set()
    assert [r.name for r in first.resources] == ["code_canary"]
    assert list(first.removed_resources) == []
    with pytest.raises(StopAsyncIteration):
        await anext(answers)
