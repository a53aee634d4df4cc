"""``dataplane: native`` piece by piece: the experiment checks, the lanes Envoy routes by, the
generated config (run through ``envoy --mode validate``), the access-log mapping and RTDS."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.config.core.v3.base_pb2 import Metadata
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest
from envoy.service.runtime.v3 import rtds_pb2, rtds_pb2_grpc
from google.protobuf.struct_pb2 import Struct

from extproc.config import EXAMPLE_EXPERIMENT, ConfigError, Experiment, parse_experiment
from extproc.contract.assignment import compile_table
from extproc.contract.envoy import RUNTIME_LAYER, RUNTIME_PREFIX
from extproc.dataplane.accesslog import EntryMapper, decode_text
from extproc.dataplane.event import EventBuilder
from extproc.dataplane.runtime import TYPE_URL, RuntimeService
from extproc.envoyconf.bootstrap import render, to_yaml
from extproc.envoyconf.common import EnvoyLayout
from extproc.envoyconf.native import build_native
from extproc.routing.lanes import runtime_weights
from extproc.routing.live import LiveRouting
from extproc.store import RoutingState
from extproc.telemetry.v1.event_pb2 import ApiFormat, Assignment, ErrorClass
from tests.component.test_envoy_config import envoy_validate

pytestmark = pytest.mark.timeout(60)


def experiment(**changes: Any) -> Experiment:
    doc = yaml.safe_load(EXAMPLE_EXPERIMENT.read_text())
    doc["dataplane"] = "native"
    doc.update(changes)
    return parse_experiment(doc)


def three_variants(**changes: Any) -> Experiment:
    variants = {
        "stable": {"cluster": "model_stable", "address": "127.0.0.1:8001", "weight": 100},
        "a": {"cluster": "model_a", "address": "127.0.0.1:8002", "weight": 0},
        "b": {"cluster": "model_b", "address": "127.0.0.1:8003", "weight": 0},
    }
    return experiment(variants=variants, rollout={"stages": [5, 25, 50]}, **changes)


def test_what_only_the_sidecar_path_can_do_is_refused_at_once() -> None:
    doc = yaml.safe_load(EXAMPLE_EXPERIMENT.read_text())
    doc["dataplane"] = "native"
    doc["capture"] = {"sample": 10}
    doc["forced_routing"] = {"secret_env": "FORCE_KEY"}
    with pytest.raises(ConfigError) as err:
        parse_experiment(doc)
    assert [p.split(":")[0] for p in err.value.problems] == [
        "capture.sample",
        "forced_routing.secret_env",
    ]


def shares(exp: Experiment, weights: dict[str, float]) -> dict[str, float]:
    """Percent of the hash space each variant gets from the runtime weights Envoy reads."""
    by_cluster = {v.cluster: n for n, v in exp.spec.variants.items()}
    out = dict.fromkeys(exp.variant_names, 0.0)
    for key, bp in runtime_weights(exp, weights).items():
        cluster = key.removeprefix(RUNTIME_PREFIX + ".")
        out[by_cluster.get(cluster, exp.stable)] += bp / 100
    return out


@pytest.mark.parametrize(
    "weights",
    [{"stable": 95, "canary": 5}, {"stable": 0, "canary": 100}, {"stable": 99.99, "canary": 0.01}],
)
def test_runtime_weights_give_each_variant_its_share(weights: dict[str, float]) -> None:
    exp = experiment()
    layer = runtime_weights(exp, weights)
    assert sum(layer.values()) == 10_000  # a constant total: Envoy's hash modulo never moves
    assert shares(exp, weights) == pytest.approx(weights)


def lane_ranges(exp: Experiment, weights: dict[str, float]) -> dict[str, set[int]]:
    """Hash values (mod 10,000) each candidate owns, walking the list as Envoy does."""
    by_cluster = {v.cluster: n for n, v in exp.spec.variants.items()}
    out: dict[str, set[int]] = {}
    at = 0
    for key, bp in runtime_weights(exp, weights).items():
        name = by_cluster.get(key.removeprefix(RUNTIME_PREFIX + "."), exp.stable)
        out.setdefault(name, set()).update(range(at, at + bp))
        at += bp
    return out


def test_lanes_are_those_of_the_sidecar_and_ramps_are_monotone() -> None:
    exp = three_variants()
    ramps = [(1, 0), (5, 0), (5, 10), (25, 10), (25, 50), (50, 50), (0, 50)]
    prev = {"a": 0.0, "b": 0.0}
    held: dict[str, set[int]] = {"a": set(), "b": set()}
    for wa, wb in ramps:
        weights = {"stable": 100.0 - wa - wb, "a": float(wa), "b": float(wb)}
        ranges = lane_ranges(exp, weights)
        table = compile_table(exp.variant_names, exp.stable, weights)
        for name in ("a", "b"):
            now = ranges.get(name, set())
            # The buckets of the ext_proc path's table: both data planes lay lanes out alike
            # (the hash differs: Envoy's xxHash of the salted key).
            assert now == {i for i, v in enumerate(table.table) if table.variants[v] == name}
            if weights[name] >= prev[name]:
                assert held[name] <= now, (name, wa, wb)  # a ramp only adds
            else:
                assert now <= held[name], (name, wa, wb)  # a cut only removes
            held[name], prev[name] = now, weights[name]


@pytest.mark.timeout(90)
def test_generated_native_configs_validate(tmp_path: Path) -> None:
    exps = [
        experiment(),
        three_variants(
            shadow={"variant": "b", "share": 10}, forced_routing={"allow": ["stable", "a"]}
        ),
    ]
    for i, exp in enumerate(exps):
        p = tmp_path / f"envoy-{i}.yaml"
        p.write_text(render(exp, EnvoyLayout()))
        envoy_validate(p)


def test_native_config_routes_by_hash_and_never_reaches_the_sidecar() -> None:
    exp = three_variants(
        shadow={"variant": "b", "share": 10}, forced_routing={"allow": ["stable", "a"]}
    )
    doc = yaml.safe_load(to_yaml(build_native(exp, EnvoyLayout())))
    manager = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    cfg = manager["typed_config"]
    assert [f["name"] for f in cfg["http_filters"]] == [
        "envoy.filters.http.lua",
        "envoy.filters.http.router",
    ]
    routes = {r["name"]: r for r in cfg["route_config"]["virtual_hosts"][0]["routes"]}
    assert list(routes) == ["forced_stable", "forced_a", "refused_b", "refused_unknown", "weighted"]
    assert routes["refused_b"]["direct_response"]["status"] == 403
    body = json.loads(routes["refused_unknown"]["direct_response"]["body"]["inline_string"])
    assert body["error"]["valid_variants"] == ["stable", "a", "b"]
    weighted = routes["weighted"]["route"]["weighted_clusters"]
    # Until the sidecar's layer arrives every hash is on stable.
    assert {c["name"]: c.get("weight", 0) for c in weighted["clusters"]} == {
        "model_a": 0,
        "model_stable_lane_a": 5000,
        "model_b": 0,
        "model_stable": 5000,
    }
    keys = [p["header"]["header_name"] for p in routes["weighted"]["route"]["hash_policy"]]
    assert keys == exp.spec.sticky_keys
    rewrite = routes["weighted"]["route"]["hash_policy"][0]["header"]["regex_rewrite"]
    assert rewrite["substitution"] == exp.spec.salt + ":"
    layers = doc["layered_runtime"]["layers"]
    assert layers[0]["rtds_layer"]["name"] == RUNTIME_LAYER
    clusters = {c["name"] for c in doc["static_resources"]["clusters"]}
    assert "model_stable_lane_a" in clusters


def entry(
    *,
    variant: str | None,
    status: int = 200,
    route: str = "weighted",
    md: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    **flags: bool,
) -> al.HTTPAccessLogEntry:
    e = al.HTTPAccessLogEntry()
    e.request.request_id = "rid-1"
    e.request.request_headers["x-conversation-id"] = "conv-9"
    e.request.request_headers.update(headers or {})
    e.response.response_code.value = status
    e.response.response_code_details = "via_upstream"
    e.response.response_body_bytes = 321
    if variant is not None:
        e.response.response_headers["x-llm-variant"] = variant
    e.response.response_headers["content-type"] = "text/event-stream"
    c = e.common_properties
    c.start_time.FromMilliseconds(1_700_000_000_000)
    c.time_to_first_downstream_tx_byte.FromMilliseconds(40)
    c.time_to_last_downstream_tx_byte.FromMilliseconds(900)
    c.route_name = route
    for name, value in flags.items():
        setattr(c.response_flags, name, value)
    if md is not None:
        s = Struct()
        s.update(md)
        c.metadata.CopyFrom(Metadata(filter_metadata={"extproc": s}))
    return e


def mapper() -> EntryMapper:
    """The sidecar's mapping for the example, with the canary as its shadow variant."""
    exp = experiment(shadow={"variant": "canary", "share": 10})
    return EntryMapper.for_experiment(exp, EventBuilder.for_experiment(exp, "test"))


def test_an_access_log_entry_becomes_the_observers_event() -> None:
    m = mapper()
    tail = '..."finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":34}}'
    ev = m.event(
        entry(
            variant="canary",
            md={
                "format": "chat",
                "first_token_us": 1_700_000_000_000_000 + 55_000,
                "text": "I\\u2019m sorry, but I can\\u2019t help with that.",
                "tail": tail,
            },
        )
    )
    assert (ev.variant, ev.assignment, ev.status, ev.error) == (
        "canary",
        Assignment.ASSIGNMENT_STICKY,
        200,
        ErrorClass.ERROR_CLASS_NONE,
    )
    assert ev.key_hash
    assert "conv" not in ev.key_hash
    assert (ev.headers_ms, ev.first_token_ms, ev.duration_ms) == (40, 55, 900)
    assert (ev.prompt_tokens, ev.completion_tokens, ev.finish_reason) == (12, 34, "stop")
    assert ev.streamed
    assert ev.refusal
    assert not ev.empty_answer
    assert ev.answer_chars == len("I\u2019m sorry, but I can\u2019t help with that.")
    assert ev.time_unix_ms == 1_700_000_000_000
    assert ev.api_format == ApiFormat.API_FORMAT_CHAT_COMPLETIONS


def test_forced_shadow_and_failed_entries() -> None:
    m = mapper()
    forced = m.event(entry(variant="canary", route="forced_canary"))
    assert forced.assignment == Assignment.ASSIGNMENT_FORCED
    copy = m.event(entry(variant="stable", headers={"x-llm-shadow-copy": "1"}))
    assert (copy.variant, copy.shadow) == ("canary", True)
    reset = m.event(entry(variant="canary", upstream_remote_reset=True))
    assert reset.error == ErrorClass.ERROR_CLASS_RESET
    timeout = m.event(entry(variant="canary", status=504, upstream_request_timeout=True))
    assert timeout.error == ErrorClass.ERROR_CLASS_TIMEOUT
    gone = m.event(entry(variant="canary", downstream_connection_termination=True))
    assert gone.error == ErrorClass.ERROR_CLASS_CLIENT_DISCONNECT
    refused = m.event(entry(variant=None, status=400, route="refused_unknown"))
    assert (refused.variant, refused.assignment, refused.error) == (
        "stable",
        Assignment.ASSIGNMENT_FALLBACK,
        ErrorClass.ERROR_CLASS_CLIENT_ERROR,
    )
    # Signals only for answers: an error body's text says nothing about the model.
    failed = m.event(entry(variant="canary", status=500, md={"text": "sorry"}))
    assert not failed.HasField("refusal")


@pytest.mark.parametrize(
    ("escaped", "text"),
    [
        ('Hello \\"world\\"\\n', 'Hello "world"\n'),
        ("caf\\u00e9 \\u26", "café "),  # cut inside an escape: the whole escape goes
        ("", ""),
        ("bad \\q escape", None),
    ],
)
def test_decode_text(escaped: str, text: str | None) -> None:
    assert decode_text(escaped) == text


def test_rtds_serves_the_layer_and_pushes_each_change() -> None:
    async def scenario() -> list[rtds_pb2.Runtime]:
        exp = experiment()
        live = LiveRouting(exp, redis=None)  # type: ignore[arg-type]  # never touched here
        service = RuntimeService(live)
        server = grpc.aio.server()
        rtds_pb2_grpc.add_RuntimeDiscoveryServiceServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        got: list[rtds_pb2.Runtime] = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = rtds_pb2_grpc.RuntimeDiscoveryServiceStub(channel)
                acks: asyncio.Queue[DiscoveryRequest | None] = asyncio.Queue()
                await acks.put(DiscoveryRequest(resource_names=[RUNTIME_LAYER], type_url=TYPE_URL))

                async def requests() -> AsyncIterator[DiscoveryRequest]:
                    while (req := await acks.get()) is not None:
                        yield req

                call = stub.StreamRuntime(requests())
                live._apply(RoutingState(3, {"stable": 90, "canary": 10}, "", "", 0))
                live.loaded.set()  # nothing is sent before the routing was read from Redis
                for weights in ({"stable": 50, "canary": 50}, None):
                    resp = await asyncio.wait_for(call.read(), 10)
                    runtime = rtds_pb2.Runtime()
                    resp.resources[0].Unpack(runtime)
                    got.append(runtime)
                    await acks.put(
                        DiscoveryRequest(response_nonce=resp.nonce, version_info=resp.version_info)
                    )
                    if weights is not None:
                        live._apply(RoutingState(4, weights, "", "", 0))
                        service.routing_changed()
                await acks.put(None)
                call.cancel()
        finally:
            await server.stop(None)
        return got

    layers = asyncio.run(scenario())
    assert [rt.name for rt in layers] == [RUNTIME_LAYER, RUNTIME_LAYER]
    canary = f"{RUNTIME_PREFIX}.model_canary"
    assert [rt.layer[canary] for rt in layers] == [1000, 5000]
