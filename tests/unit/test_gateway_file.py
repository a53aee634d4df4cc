"""The gateway file of the fleet bootstrap: every problem with its path, and the routes and
filters the bootstrap builds from it."""

from __future__ import annotations

import re
from typing import Any

import pytest
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)

from extproc.config import ConfigError
from extproc.contract import headers as h
from extproc.contract.envoy import EXPERIMENT_ROUTE
from extproc.envoyconf.common import EnvoyLayout
from extproc.envoyconf.fleet import JSON_CONTENT_TYPE, build_fleet
from extproc.envoyconf.gateway import EXAMPLE_GATEWAY, load_gateway, parse_gateway

pytestmark = pytest.mark.timeout(10)


def route(**changes: Any) -> dict[str, Any]:
    return {"name": "chat", "cluster": "chat_prod", "address": "127.0.0.1:8001", **changes}


def test_every_problem_is_listed_with_its_path() -> None:
    with pytest.raises(ConfigError) as err:
        parse_gateway(
            {
                "routes": [
                    route(),
                    route(address="127.0.0.1:9999"),
                    route(name="experiment", cluster="x", prefix="no-slash"),
                    route(name="b", cluster="extproc_sidecar", address="nothost"),
                ],
                "sticky_headers": ["X-Conv"],
                "message_timeout_ms": 0,
                "surprise": 1,
            }
        )
    problems = err.value.problems
    assert "routes.1.name: 'chat' is also routes.0" in problems
    assert "routes.1.cluster: 'chat_prod' is also at 127.0.0.1:8001" in problems
    assert "routes.2.name: 'experiment' is the experiment route's name" in problems
    assert "routes.3.cluster: 'extproc_sidecar' is reserved" in problems
    assert "sticky_headers.0: 'X-Conv' is not a lower-case header name" in problems
    for where in ("routes.2.prefix", "routes.3.address", "message_timeout_ms", "surprise"):
        assert any(p.startswith(f"{where}: ") for p in problems), where


def test_the_example_builds_the_experiment_route_first() -> None:
    boot = build_fleet(load_gateway(EXAMPLE_GATEWAY), EnvoyLayout())
    manager = hcm.HttpConnectionManager()
    boot.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.Unpack(manager)
    routes = manager.route_config.virtual_hosts[0].routes
    assert [r.name for r in routes] == [EXPERIMENT_ROUTE, "chat", "code", "embeddings", "default"]
    assert routes[0].route.cluster_header == h.CLUSTER
    assert [f.name for f in manager.http_filters] == [
        "envoy.filters.http.json_to_metadata",
        "extproc.route",
        "envoy.filters.http.on_demand",
        "envoy.filters.http.lua",
        "envoy.filters.http.router",
    ]
    # No experiment cluster is in the file: the sidecar serves them on demand.
    assert {c.name for c in boot.static_resources.clusters} == {
        "extproc_sidecar",
        "extproc_shadow",
        "chat_production",
        "code_production",
        "embeddings_production",
    }


@pytest.mark.parametrize(
    ("content_type", "read"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("Application/JSON;charset=UTF-8", True),
        ("text/plain", False),
        ("application/jsonl", False),
    ],
)
def test_the_model_is_read_from_json_bodies_with_a_charset_too(
    content_type: str, read: bool
) -> None:
    """Envoy's default reads only an exact ``application/json``; a client adding a charset
    would otherwise reach no model route and no experiment chosen by model."""
    regex = re.compile(JSON_CONTENT_TYPE)
    assert bool(regex.fullmatch(content_type)) is read
