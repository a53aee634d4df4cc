"""The gateway file: a gateway team's own Envoy routes, for the fleet bootstrap.

In fleet mode the experiments come and go in Redis; what stays is the gateway: the routes that
serve a request no experiment takes (and every request while no sidecar answers), and the
settings of its listener. This file holds exactly that. Each route should point at a model's
current production server, so that a request the sidecar could not route lands on stable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from extproc.config import HEADER_RE, NAME_RE, ConfigError
from extproc.contract.envoy import EXPERIMENT_ROUTE, SHADOW_CLUSTER, SIDECAR_CLUSTER

EXAMPLE_GATEWAY = Path(__file__).parent.parent / "data" / "gateway.yaml"
_ADDRESS = r"^[A-Za-z0-9_.-]+:\d{1,5}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GatewayRoute(_Strict):
    name: str = Field(pattern=NAME_RE, description="the route's name, which experiments match")
    prefix: str = Field(default="/", pattern=r"^/", description="the path prefix it matches")
    models: list[str] = Field(
        default_factory=list, description="only requests whose body's model is one of these"
    )
    cluster: str = Field(min_length=1, description="the Envoy cluster it sends requests to")
    address: str = Field(pattern=_ADDRESS, description="host:port of the cluster's server")


class Gateway(_Strict):
    routes: list[GatewayRoute] = Field(min_length=1, description="in match order")
    sticky_headers: list[str] = Field(
        default=["x-conversation-id", "x-user-id"],
        description="every header an experiment's sticky_keys name, for the access log",
    )
    request_timeout_s: float = Field(default=300, gt=0)
    message_timeout_ms: int = Field(default=200, ge=1, le=10_000)
    inflight_notice_ms: int = Field(default=5_000, ge=100)
    discovery_timeout_ms: int = Field(default=5_000, ge=100, le=60_000)
    shadow: bool = Field(default=True, description="a shadow listener for mirrored copies")


def _semantic_problems(raw: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    routes = raw.get("routes")
    if isinstance(routes, list):
        names: dict[str, int] = {}
        clusters: dict[str, str] = {}
        for i, r in enumerate(routes):
            if not isinstance(r, Mapping):
                continue
            name, cluster, address = r.get("name"), r.get("cluster"), r.get("address")
            if isinstance(name, str):
                if name == EXPERIMENT_ROUTE:
                    problems.append(f"routes.{i}.name: {name!r} is the experiment route's name")
                elif name in names:
                    problems.append(f"routes.{i}.name: {name!r} is also routes.{names[name]}")
                names.setdefault(name, i)
            if isinstance(cluster, str):
                if cluster in (SIDECAR_CLUSTER, SHADOW_CLUSTER):
                    problems.append(f"routes.{i}.cluster: {cluster!r} is reserved")
                elif isinstance(address, str) and clusters.setdefault(cluster, address) != address:
                    problems.append(
                        f"routes.{i}.cluster: {cluster!r} is also at {clusters[cluster]}"
                    )
    sticky = raw.get("sticky_headers")
    if isinstance(sticky, list):
        for i, k in enumerate(sticky):
            if not isinstance(k, str) or not re.match(HEADER_RE, k):
                problems.append(f"sticky_headers.{i}: {k!r} is not a lower-case header name")
    return problems


def parse_gateway(raw: Any, source: str = "<gateway>") -> Gateway:
    """Validate a decoded gateway document; raise ConfigError listing every problem."""
    if not isinstance(raw, Mapping):
        raise ConfigError(source, ["(top level): must be a mapping of gateway settings"])
    problems = _semantic_problems(raw)
    gateway = None
    try:
        gateway = Gateway.model_validate(raw)
    except ValidationError as err:
        problems = [
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in err.errors()
        ] + problems
    if problems or gateway is None:
        raise ConfigError(source, problems)
    return gateway


def load_gateway(path: str | Path) -> Gateway:
    """Read and validate a gateway file (YAML or JSON)."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(str(p), [f"cannot read: {err.strerror}"]) from err
    except yaml.YAMLError as err:
        raise ConfigError(str(p), [f"not valid YAML ({err})"]) from err
    return parse_gateway(raw, str(p))
