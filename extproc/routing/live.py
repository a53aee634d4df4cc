"""Follow the live routing of an experiment in Redis, keeping the last good one when Redis is away.

Every replica applies a change within a second: a pub/sub notice wakes the follower at once, and a
short poll of the routing key catches anything a dropped subscription missed. A change that fails
validation (unknown variant, weights not adding up) is logged and ignored: traffic keeps the last
good routing. So does a routing value that is not a routing document at all (a bad manual edit):
it is reported (log, ``routing_error``, the replica's heartbeat) until a valid change replaces it.
A change is applied when its version or its weights differ from the current ones: after Redis
restarts empty, versions start again at 1 and only the weights tell a new routing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from extproc import store
from extproc.config import ConfigError, Experiment, validate_weights
from extproc.contract import keys
from extproc.contract.assignment import BucketTable, compile_table
from extproc.supervise import raise_if_cancelled

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Routing:
    """An immutable routing snapshot; replaced whole, so readers never see half a change."""

    experiment: Experiment
    version: int
    weights: dict[str, float]
    table: BucketTable

    @classmethod
    def build(cls, experiment: Experiment, version: int, weights: dict[str, float]) -> Routing:
        table = compile_table(experiment.variant_names, experiment.stable, weights)
        return cls(experiment=experiment, version=version, weights=weights, table=table)


class LiveRouting:
    """Holds the current Routing and keeps it in step with Redis."""

    def __init__(
        self,
        experiment: Experiment,
        redis: aioredis.Redis,
        *,
        poll_interval_s: float = 0.5,
        on_change: Callable[[Routing], None] | None = None,
        register: bool = True,
    ) -> None:
        self.redis = redis
        self.register = register
        """Publish the experiment again when Redis lost it (a sidecar run from its file); a fleet
        sidecar follows what Redis holds and never brings back an experiment someone ended."""
        self.poll_interval_s = poll_interval_s
        self.on_change = on_change
        self.current = Routing.build(experiment, 0, experiment.file_weights())
        self.redis_ok = False
        self.registered = False
        self.routing_error: str | None = None
        """Why the routing in Redis is not applied (malformed or invalid); None when it is."""
        self.loaded = asyncio.Event()  # set once the routing has been read from Redis

    @property
    def experiment(self) -> Experiment:
        return self.current.experiment

    def _report(self, error: str | None) -> None:
        """Log a problem with the stored routing once (not at every poll), and its end."""
        if error != self.routing_error:
            if error is not None:
                log.error("keeping routing version %d: %s", self.current.version, error)
            else:
                log.info("the stored routing is valid again")
        self.routing_error = error

    def _apply(self, state: store.RoutingState) -> None:
        try:
            weights = validate_weights(self.experiment, state.weights)
        except ConfigError as err:
            self._report(f"routing version {state.version} is invalid: {err}")
            return
        self._report(None)
        if state.version == self.current.version and weights == self.current.weights:
            return
        self.current = Routing.build(self.experiment, state.version, weights)
        log.info("routing version %d: %s", state.version, weights)
        if self.on_change is not None:
            self.on_change(self.current)

    async def refresh(self) -> None:
        """One round trip: read the routing (and check the registration), register again
        when any part of it is missing (Redis lost its data), then apply the routing."""
        got = None
        try:
            if not self.register:
                got = await store.get_routing(self.redis, self.experiment.name)
            else:
                if self.registered:
                    got = await store.get_registered_routing(self.redis, self.experiment.name)
                if got is None:
                    self.registered = False
                    got = await store.register_experiment(self.redis, self.experiment)
                    self.registered = True
        except store.MalformedRouting as err:
            self._report(str(err))
            return
        if got is None:  # a fleet sidecar's experiment gone from Redis: keep the last routing
            return
        self._apply(got)
        self.loaded.set()

    def kept(self) -> str:
        """What the follower keeps while Redis is away, for the log."""
        return f"routing version {self.current.version}"

    async def run(self) -> None:
        """Follow changes until cancelled; never raises on Redis trouble."""
        name = self.experiment.name

        async def subscribe(pubsub: PubSub) -> None:
            await pubsub.subscribe(keys.changes(name))

        await follow(self, subscribe)


class Follower(Protocol):
    """What :func:`follow` keeps in step with Redis: a sidecar's routing, or its catalog."""

    redis: aioredis.Redis
    redis_ok: bool
    poll_interval_s: float

    async def refresh(self) -> None: ...

    def kept(self) -> str: ...


async def follow(f: Follower, subscribe: Callable[[PubSub], Awaitable[None]]) -> None:
    """Refresh ``f`` at once when a notice arrives on what ``subscribe`` subscribes to, and at
    least every ``poll_interval_s`` (a dropped subscription loses notices); until cancelled,
    never raising on Redis trouble: ``f`` keeps what it has, and the loop backs off and
    subscribes again."""
    backoff = 0.1
    while True:
        # Here too, not only in the inner loop: with Redis away, a cancel swallowed by a command
        # in flight ends in the retry below, and the inner loop is never reached again.
        raise_if_cancelled()
        pubsub = f.redis.pubsub(ignore_subscribe_messages=True)
        try:
            # A cluster client learns the slot map with its first command, and its pub/sub
            # needs the map to pick the node to subscribe on; the loop reads again anyway.
            await f.refresh()
            await subscribe(pubsub)
            while True:
                raise_if_cancelled()
                await f.refresh()
                if not f.redis_ok:
                    log.info("redis reachable; %s", f.kept())
                f.redis_ok = True
                backoff = 0.1
                await pubsub.get_message(timeout=f.poll_interval_s)
        # KeyError: redis-py's cluster pub/sub while its slot map is being rebuilt.
        except (RedisError, OSError, KeyError) as err:
            if f.redis_ok:
                log.warning("redis unreachable, keeping %s: %s", f.kept(), err)
            f.redis_ok = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)
        finally:
            # redis-py types `aclose` from 8.2 on; held as a typed callable, the check
            # passes on every version the project allows.
            close: Callable[[], Awaitable[object]] = pubsub.aclose
            try:
                await close()
            except (RedisError, OSError):
                log.debug("pubsub close failed", exc_info=True)
