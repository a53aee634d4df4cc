"""Redis access shared by the sidecar, the CLI and the evaluator: connection and routing state.

Routing changes go through one Lua script so that a change, its version number and the pub/sub
notice to every sidecar replica happen atomically: a replica never sees a new version without the
weights that belong to it, and two writers cannot hand out the same version.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.typing import EncodableT, FieldT

from extproc.config import Experiment, validate_weights
from extproc.contract import keys

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

_SET_ROUTING = """
local cur = redis.call('GET', KEYS[1])
if ARGV[2] == 'init' and cur then return cur end
local version = 0
if cur then
  -- a malformed value must not block the change that replaces it (a rollback, say)
  local ok, old = pcall(cjson.decode, cur)
  if ok and type(old) == 'table' then version = tonumber(old['version']) or 0 end
end
local doc = cjson.decode(ARGV[1])
doc['version'] = version + 1
local out = cjson.encode(doc)
redis.call('SET', KEYS[1], out)
redis.call('PUBLISH', KEYS[2], tostring(version + 1))
return out
"""


CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
"""URL schemes that select Redis Cluster mode, and the plain scheme each stands for."""


def cluster_url(url: str) -> str | None:
    """The plain ``redis(s)://`` URL of a ``redis(s)+cluster://`` one; None for a single server.

    Cluster mode is chosen by the URL alone, so that one setting (``REDIS_URL``, ``--redis-url``)
    carries it to every part (sidecar, evaluator, CLI) without a separate flag to forget. The
    host and port are any one node of the cluster; the client discovers the others.
    """
    scheme, sep, rest = url.partition("://")
    plain = CLUSTER_SCHEMES.get(scheme.lower()) if sep else None
    return None if plain is None else f"{plain}://{rest}"


def _options(timeout_s: float) -> dict[str, Any]:
    return {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}


def connect(url: str, *, timeout_s: float = 1.0) -> aioredis.Redis:
    """A client that fails fast: the sidecar must never wait long on Redis.

    Every part of the project gets its client here, so a ``redis+cluster://`` URL works
    everywhere. A cluster client is returned under the single-server type on purpose: it has
    the same command methods, and everything sent through it keeps to what a cluster accepts
    (each transaction and script touches keys of one experiment, which share a hash slot;
    untagged keys such as ``extproc:sidecar:<id>`` are written on their own).
    """
    plain = cluster_url(url)
    if plain is not None:
        return cast(aioredis.Redis, RedisCluster.from_url(plain, **_options(timeout_s)))
    return aioredis.Redis.from_url(
        url, **_options(timeout_s), health_check_interval=5, retry_on_timeout=False
    )


def connect_sync(url: str, *, timeout_s: float = 1.0) -> redis.Redis | redis.RedisCluster:
    """The blocking counterpart of :func:`connect`, for readiness checks and scripts."""
    plain = cluster_url(url)
    if plain is not None:
        return redis.RedisCluster.from_url(plain, **_options(timeout_s))
    return redis.Redis.from_url(url, **_options(timeout_s))


class MalformedRouting(ValueError):
    """The routing key holds something that is not a routing document (a bad manual edit)."""


@dataclass(frozen=True)
class RoutingState:
    """The live routing of one experiment as stored in Redis."""

    version: int
    weights: dict[str, float]
    reason: str
    actor: str
    updated_at: float

    @classmethod
    def from_json(cls, raw: bytes | str) -> RoutingState:
        """Parse a stored routing; :class:`MalformedRouting` for anything else."""
        try:
            doc = json.loads(raw)
            return cls(
                version=int(doc["version"]),
                weights={str(k): float(v) for k, v in doc["weights"].items()},
                reason=str(doc.get("reason", "")),
                actor=str(doc.get("actor", "")),
                updated_at=float(doc.get("updated_at", 0)),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            shown = raw[:80] if isinstance(raw, str) else raw[:80].decode("utf-8", "replace")
            raise MalformedRouting(f"malformed routing value {shown!r}: {err!r}") from err


async def _write_routing(
    r: aioredis.Redis, experiment: Experiment, doc: dict[str, Any], mode: str
) -> RoutingState:
    script = r.register_script(_SET_ROUTING)
    out = await script(
        keys=[keys.routing(experiment.name), keys.changes(experiment.name)],
        args=[json.dumps(doc), mode],
    )
    return RoutingState.from_json(out)


async def register_experiment(r: aioredis.Redis, experiment: Experiment) -> RoutingState:
    """Publish the definition and, if no routing exists yet, the file's weights as version 1."""
    await r.set(keys.definition(experiment.name), json.dumps(experiment.to_json_dict()))
    await r.sadd(keys.EXPERIMENTS, experiment.name)
    await r.zrem(keys.ENDED, experiment.name)
    await r.publish(keys.CATALOG, experiment.name)
    doc = {
        "weights": experiment.file_weights(),
        "reason": "initial weights from the experiment file",
        "actor": "sidecar",
        "updated_at": time.time(),
    }
    return await _write_routing(r, experiment, doc, "init")


async def end_experiment(r: aioredis.Redis, name: str) -> bool:
    """Retire an experiment: sidecars stop routing by it and evaluators stop judging it; its
    definition, events, rollups and audit log stay for reading. False when it was not live."""
    removed = await r.srem(keys.EXPERIMENTS, name)
    if removed:
        await r.zadd(keys.ENDED, {name: time.time()})
        await r.publish(keys.CATALOG, name)
    return bool(removed)


async def set_weights(
    r: aioredis.Redis,
    experiment: Experiment,
    weights: dict[str, Any],
    *,
    reason: str,
    actor: str,
) -> RoutingState:
    """Validate and apply a routing change; every sidecar replica follows within a second."""
    full = validate_weights(experiment, weights)
    doc = {"weights": full, "reason": reason, "actor": actor, "updated_at": time.time()}
    return await _write_routing(r, experiment, doc, "set")


async def get_registered_routing(r: aioredis.Redis, name: str) -> RoutingState | None:
    """The routing, or None when any part of the registration is missing.

    A Redis that restarted empty may get the routing back before the rest (the evaluator writes
    weights on its own): the definition and the experiments index must then be written again
    too, or ``status`` and feedback find no experiment while traffic flows.
    """
    async with r.pipeline(transaction=False) as pipe:
        pipe.get(keys.routing(name))
        pipe.exists(keys.definition(name))
        pipe.sismember(keys.EXPERIMENTS, name)
        raw, defined, indexed = await pipe.execute()
    if raw is None or not defined or not indexed:
        return None
    return RoutingState.from_json(raw)


async def get_routing(r: aioredis.Redis, name: str) -> RoutingState | None:
    raw = await r.get(keys.routing(name))
    return None if raw is None else RoutingState.from_json(raw)


async def get_definition(r: aioredis.Redis, name: str) -> dict[str, Any] | None:
    raw = await r.get(keys.definition(name))
    if raw is None:
        return None
    doc: dict[str, Any] = json.loads(raw)
    return doc


REGISTERED_FOR_S = 86_400
"""How long a process that stopped beating stays in its registry (its health hash expires
within seconds; the registry only says where to look)."""


async def heartbeat(
    r: aioredis.Redis,
    key: str,
    registry: str,
    instance: str,
    fields: Mapping[FieldT, EncodableT],
    ttl_s: int,
) -> None:
    """Write a process's health hash (expiring after ``ttl_s``) and its name in ``registry``,
    the list readers take: scanning for the hashes instead would cost a round trip per hundred
    keys, and the rollups alone add thousands of keys a day. Not a transaction (the registry and
    the hash live in different Cluster slots); the hash expires whatever happens."""
    now = time.time()
    async with r.pipeline(transaction=False) as pipe:
        pipe.hset(key, mapping=fields)
        pipe.expire(key, ttl_s)
        pipe.zadd(registry, {instance: now})
        pipe.zremrangebyscore(registry, "-inf", now - REGISTERED_FOR_S)
        await pipe.execute()
