"""The fleet bootstrap against a real Envoy, with a sidecar written here: a real gRPC server
hosting ClusterDiscovery (clusters from a dict) and an ext_proc servicer that names the cluster
a request asked for in ``x-want``. What it proves is Envoy's side of fleet mode: on-demand
clusters (also one added after start), the model and route name reaching the sidecar, client
cluster headers stripped, the gateway's routes when no sidecar answers (by path and by model),
and a cluster nobody knows failing at once, not after the discovery timeout."""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.cluster.v3 import cds_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf.json_format import MessageToDict

from extproc.contract import headers as h
from extproc.contract.clusters import variant_cluster
from extproc.dataplane.clusters import ClusterDiscovery
from extproc.dev import stack
from extproc.envoyconf.bootstrap import render_fleet
from extproc.envoyconf.common import EnvoyLayout
from extproc.envoyconf.gateway import parse_gateway
from tests.conftest import fixed_upstream, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
DISCOVERY_TIMEOUT_MS = 20_000  # far longer than any answer here: a fast 503 did not wait it out


@dataclass
class Sidecar(pb_grpc.ExternalProcessorServicer):
    """Names the cluster ``x-want`` asks for; records what Envoy sent with the headers."""

    seen: list[dict[str, Any]] = field(default_factory=list)

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Any
    ) -> AsyncIterator[pb.ProcessingResponse]:
        async for req in request_iterator:
            if not req.HasField("request_headers"):
                continue
            hdrs = {
                x.key: x.raw_value.decode() or x.value for x in req.request_headers.headers.headers
            }
            self.seen.append(
                {
                    "headers": hdrs,
                    "metadata": MessageToDict(req.metadata_context),
                    "attributes": {k: MessageToDict(v) for k, v in req.attributes.items()},
                }
            )
            out = pb.ProcessingResponse()
            common = out.request_headers.response
            common.clear_route_cache = True
            if want := hdrs.get("x-want"):
                common.header_mutation.set_headers.append(
                    HeaderValueOption(header=HeaderValue(key=h.CLUSTER, raw_value=want.encode()))
                )
            yield out


@dataclass
class Fleet:
    url: str
    admin: str
    clusters: dict[str, Cluster]
    discovery: ClusterDiscovery
    sidecar: Sidecar
    loop: asyncio.AbstractEventLoop
    upstreams: dict[str, str]
    server: grpc.aio.Server

    def stat(self, name: str) -> int:
        for line in httpx.get(f"{self.admin}/stats?filter={name}").text.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        raise AssertionError(f"no stat {name}")

    def stop_sidecar(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)

    def add(self, name: str) -> None:
        self.clusters[name] = variant_cluster(name, self.upstreams[name])
        self.loop.call_soon_threadsafe(self.discovery.changed)


def _answering(name: str) -> Any:
    return fixed_upstream({"/v1/chat/completions": ("application/json", f'"{name}"'.encode())})


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with (
        _answering("gw_chat") as gw_chat,
        _answering("gw_default") as gw_default,
        _answering("exp_a") as exp_a,
        _answering("exp_b") as exp_b,
    ):
        sidecar_port, listen, admin = stack.free_port(), stack.free_port(), stack.free_port()
        gateway = parse_gateway(
            {
                "routes": [
                    {
                        "name": "chat",
                        "models": ["chat-1"],
                        "cluster": "gw_chat",
                        "address": gw_chat,
                    },
                    {"name": "default", "cluster": "gw_default", "address": gw_default},
                ],
                "shadow": False,
                "message_timeout_ms": 5000,
                "discovery_timeout_ms": DISCOVERY_TIMEOUT_MS,
            }
        )
        layout = EnvoyLayout(
            listen_host="127.0.0.1",
            listen_port=listen,
            admin_port=admin,
            sidecar=f"127.0.0.1:{sidecar_port}",
        )
        cfg = tmp_path / "envoy.yaml"
        cfg.write_text(render_fleet(gateway, layout, "test"))
        clusters = {"exp_a": variant_cluster("exp_a", exp_a)}
        discovery = ClusterDiscovery(lambda: dict(clusters))
        sidecar = Sidecar()
        loop = asyncio.new_event_loop()
        server: list[grpc.aio.Server] = []
        ready = threading.Event()

        async def serve() -> None:
            s = grpc.aio.server()
            pb_grpc.add_ExternalProcessorServicer_to_server(sidecar, s)
            cds_pb2_grpc.add_ClusterDiscoveryServiceServicer_to_server(discovery, s)
            s.add_insecure_port(f"127.0.0.1:{sidecar_port}")
            await s.start()
            server.append(s)
            ready.set()

        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        asyncio.run_coroutine_threadsafe(serve(), loop)
        assert ready.wait(10)
        envoy = subprocess.Popen(
            [
                stack.envoy_binary(),
                "-c",
                str(cfg),
                "--disable-hot-restart",
                "--log-level",
                "warning",
            ]
        )
        try:
            stack.wait_until(stack.http_ok(f"http://127.0.0.1:{admin}/ready"), "envoy")
            yield Fleet(
                f"http://127.0.0.1:{listen}",
                f"http://127.0.0.1:{admin}",
                clusters,
                discovery,
                sidecar,
                loop,
                {"exp_a": exp_a, "exp_b": exp_b},
                server[0],
            )
        finally:
            envoy.terminate()
            envoy.wait(30)
            asyncio.run_coroutine_threadsafe(server[0].stop(0), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()


def _post(http: httpx.Client, model: str, **hdrs: str) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": model}, headers=hdrs)


def test_clusters_are_discovered_on_demand_and_unknown_ones_fail_at_once(fleet: Fleet) -> None:
    with httpx.Client(base_url=fleet.url, timeout=60) as http:
        # A cluster Envoy has never seen, discovered on demand.
        r = _post(http, "anything", **{"x-want": "exp_a"})
        assert (r.status_code, r.json()) == (200, "exp_a")
        # The route name and the body's model reach the sidecar.
        r = _post(http, "chat-1")
        assert (r.status_code, r.json()) == (200, "gw_chat")
        last = fleet.sidecar.seen[-1]
        assert last["metadata"]["filterMetadata"]["extproc"] == {"model": "chat-1"}
        assert last["attributes"]["envoy.filters.http.ext_proc"] == {"xds.route_name": "chat"}
        # A client's own x-llm-cluster never reaches the sidecar nor picks the cluster.
        r = _post(http, "other", **{h.CLUSTER: "exp_a"})
        assert (r.status_code, r.json()) == (200, "gw_default")
        assert h.CLUSTER not in fleet.sidecar.seen[-1]["headers"]
        # A name nobody serves: the server's answer ("removed") is what ends the wait, so the
        # request gets its 503 with no cluster from that answer, not from the discovery timeout.
        answers = fleet.stat("cluster_manager.odcds.update_success")
        r = _post(http, "other", **{"x-want": "exp_b"})
        assert r.status_code == 503
        assert fleet.stat("http.llm.no_cluster") == 1
        assert fleet.stat("cluster_manager.odcds.update_success") == answers + 1
        assert fleet.stat("cluster_manager.odcds.update_rejected") == 0
        # Added after Envoy started: pushed to the stream that subscribed, served, no restart.
        fleet.add("exp_b")
        wait_for(
            lambda: fleet.stat("cluster_manager.odcds.update_success") == answers + 2,
            "Envoy to take the new cluster",
        )
        r = _post(http, "other", **{"x-want": "exp_b"})
        assert (r.status_code, r.json()) == (200, "exp_b")


def test_with_no_sidecar_the_gateway_routes_by_path_and_by_model(fleet: Fleet) -> None:
    """The body's model is matched by the gateway's routes without any ext_proc answer: Envoy
    picks the route only after JSON-to-metadata parsed the body (the filter clears no route
    cache itself; none is resolved before it)."""
    fleet.stop_sidecar()
    with httpx.Client(base_url=fleet.url, timeout=60) as http:
        for _ in range(5):
            r = _post(http, "chat-1")
            assert (r.status_code, r.json()) == (200, "gw_chat")
        r = http.post(
            "/v1/chat/completions",
            content=b'{"model": "chat-1"}',
            headers={"content-type": "application/json; charset=utf-8"},
        )
        assert (r.status_code, r.json()) == (200, "gw_chat")
        r = _post(http, "other")
        assert (r.status_code, r.json()) == (200, "gw_default")
