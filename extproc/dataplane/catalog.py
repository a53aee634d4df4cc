"""The experiments a sidecar serves: one from its file, or every live experiment in Redis.

A sidecar run with ``--experiment FILE`` serves that experiment for every request, as it always
did. A fleet sidecar (``extproc serve --all``) serves every experiment in ``extproc:experiments``:
`extproc experiment create` makes a new one live on every replica within a second (a catalog
notice wakes each at once; a poll catches a missed one), and `extproc experiment end` retires
one, with no restart of the sidecar or of Envoy. Each request is filed under at most one
experiment by :class:`~extproc.contract.selection.Selector` (its model, route or a header); a
request no experiment takes passes through untouched and is counted.

Each experiment is a :class:`Lane`: its live routing, its router and its telemetry mapping, built
once and replaced whole when its definition changes, so a request is never routed by half an
update. A retired lane is kept a while for the access-log entries of requests it routed that
end later. A definition that does not validate, or that a fleet cannot serve (``dataplane:
native`` routes in Envoy itself), is reported once and skipped; the others are not affected.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub

from extproc.config import ConfigError, Experiment, parse_experiment
from extproc.contract import headers as h
from extproc.contract import keys
from extproc.contract.selection import RequestTraits, Selector
from extproc.dataplane.accesslog import EntryMapper
from extproc.dataplane.event import EventBuilder
from extproc.dataplane.observer import ObserverContext
from extproc.dataplane.router import FleetMarks, Router
from extproc.quality.rules import QualityRules
from extproc.routing.live import LiveRouting, Routing, follow
from extproc.telemetry.writer import TelemetryWriter

log = logging.getLogger(__name__)

RETIRED_KEPT = 1_000
"""Retired lanes kept for late access-log entries (a request routed just before its experiment
ended); the oldest goes first."""


@dataclass(frozen=True)
class Lane:
    """One experiment as the sidecar serves it."""

    experiment: Experiment
    digest: str  # of the definition it was built from, to notice a replaced one
    live: LiveRouting
    router: Router
    events: EventBuilder
    mapper: EntryMapper
    observer: ObserverContext

    @property
    def name(self) -> str:
        return self.experiment.name

    @classmethod
    def build(
        cls,
        experiment: Experiment,
        *,
        redis: aioredis.Redis,
        instance: str,
        writer: TelemetryWriter,
        fleet: bool,
        on_change: Callable[[Routing], None] | None = None,
        digest: str = "",
    ) -> Lane:
        spec = experiment.spec
        capturing = spec.capture.sample > 0
        live = LiveRouting(experiment, redis, on_change=on_change, register=not fleet)
        rules = QualityRules.compile(spec)
        router = Router(
            live,
            rules.captures if capturing else None,
            FleetMarks.of(experiment) if fleet else None,
        )
        # One builder for both data planes: the same request makes the same event on either.
        events = EventBuilder.for_experiment(experiment, instance, router.policy)
        writer.configure(
            experiment.name, spec.telemetry.rollup_retention_days * 86_400, spec.inflight.notice_ms
        )
        return cls(
            experiment=experiment,
            digest=digest,
            live=live,
            router=router,
            events=events,
            mapper=EntryMapper.for_experiment(experiment, events),
            # Captures only: the events of captured requests come from the access log too.
            observer=ObserverContext(
                events=events,
                capture=writer.submit_capture if capturing else None,
                capture_ttl_s=spec.capture.ttl_s,
                capture_max_pairs=spec.capture.max_pairs,
            ),
        )


LaneFactory = Callable[[Experiment, str], Lane]
"""Builds the lane of an experiment (with its definition's digest)."""


def _digest(raw: bytes | str) -> str:
    return hashlib.sha256(raw if isinstance(raw, bytes) else raw.encode()).hexdigest()


class Catalog:
    """Every lane the sidecar serves, and the index that files requests under them."""

    def __init__(
        self,
        redis: aioredis.Redis,
        make_lane: LaneFactory,
        *,
        fixed: Experiment | None = None,
        poll_interval_s: float = 0.5,
        on_change: Callable[[], None] | None = None,
        known_clusters: bool = False,
    ) -> None:
        self.redis = redis
        self.make_lane = make_lane
        self.known_clusters = known_clusters
        """Variants may name clusters Envoy already has (Istio's, or the gateway file's); else
        every variant needs an address, from which Envoy learns its cluster."""
        self.fleet = fixed is None
        self.poll_interval_s = poll_interval_s
        self.on_change = on_change
        self.lanes: dict[str, Lane] = {}
        self.retired: OrderedDict[str, Lane] = OrderedDict()
        self.selector: Selector[str] = Selector({}, frozenset())
        self.wanted: frozenset[str] = frozenset()
        self.loaded = asyncio.Event()  # set once the catalog (and each lane's routing) was read
        self.redis_ok = False
        self.unmatched = 0
        """Requests no experiment took (fleet): passed through untouched."""
        self._skipped: dict[str, str] = {}  # name -> digest of a definition reported unusable
        self._refreshing = asyncio.Lock()
        if fixed is not None:
            self._install({fixed.name: make_lane(fixed, "")})

    # --- the request path -------------------------------------------------------------------

    def lane_for(self, traits: RequestTraits) -> Lane | None:
        """The lane a request belongs to; None: no experiment takes it."""
        name = self.selector.pick(traits)
        return None if name is None else self.lanes.get(name)

    def lane_named(self, name: str) -> Lane | None:
        """A live or recently retired lane, for an access-log entry that names its experiment."""
        return self.lanes.get(name) or self.retired.get(name)

    @property
    def only(self) -> Lane | None:
        """The lane of a sidecar run from a file (None for a fleet)."""
        return None if self.fleet else next(iter(self.lanes.values()))

    @property
    def is_loaded(self) -> bool:
        """Whether the routing was read from Redis once: until then a replica could send users
        to a candidate rolled back meanwhile."""
        only = self.only
        return only.live.loaded.is_set() if only is not None else self.loaded.is_set()

    async def wait_loaded(self) -> None:
        only = self.only
        await (only.live.loaded if only is not None else self.loaded).wait()

    @property
    def reaches_redis(self) -> bool:
        only = self.only
        return only.live.redis_ok if only is not None else self.redis_ok

    # --- following Redis --------------------------------------------------------------------

    def _install(self, lanes: dict[str, Lane]) -> None:
        """Replace the lanes and the index at once: a request sees the old set or the new."""
        for name, lane in self.lanes.items():
            if lanes.get(name) is not lane:
                self.retired[name] = lane
                self.retired.move_to_end(name)
        for name in lanes:
            self.retired.pop(name, None)
        while len(self.retired) > RETIRED_KEPT:
            self.retired.popitem(last=False)
        ordered = dict(sorted(lanes.items()))
        selector, conflicts = Selector.build(
            {name: lane.experiment.spec.match for name, lane in ordered.items()}
        )
        for problem in conflicts:
            log.error("experiments overlap (the first by name takes the request): %s", problem)
        self.lanes, self.selector = ordered, selector
        # A mirrored copy is filed by the experiment its primary was routed by.
        wanted = {*selector.header_names, h.EXPERIMENT, h.SHADOW_COPY}
        for lane in ordered.values():
            wanted |= lane.router.wanted
        self.wanted = frozenset(wanted)

    async def _definitions(self) -> dict[str, bytes]:
        names = sorted(
            n.decode() if isinstance(n, bytes) else str(n)
            for n in await self.redis.smembers(keys.EXPERIMENTS)
        )
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.get(keys.definition(name))
            raws = await pipe.execute()
        return {n: raw for n, raw in zip(names, raws, strict=True) if raw is not None}

    def _usable(self, name: str, raw: bytes, digest: str) -> Experiment | None:
        try:
            experiment = parse_experiment(json.loads(raw), f"experiment {name}")
            problem = None
            if experiment.spec.dataplane == "native":
                problem = "dataplane native: Envoy routes it by itself (its own Envoy config)"
            elif not self.known_clusters:
                # Envoy would answer 503 to every request routed to a cluster it cannot learn.
                missing = [n for n, v in experiment.spec.variants.items() if not v.address]
                if missing:
                    problem = (
                        f"variants {missing} have no address, so Envoy cannot learn their "
                        "clusters (`serve --known-clusters` when Envoy has them already)"
                    )
        except (ConfigError, ValueError) as err:
            experiment, problem = None, str(err)
        if problem is None:
            self._skipped.pop(name, None)
            return experiment
        if self._skipped.get(name) != digest:
            log.error("not serving experiment %s: %s", name, problem)
            self._skipped[name] = digest
        return None

    async def sync(self) -> None:
        """Read the live experiments; build lanes for new or replaced ones (their routing read
        before they take a request) and retire the ones that ended."""
        defs = await self._definitions()
        lanes: dict[str, Lane] = {}
        changed = False
        for name, raw in defs.items():
            digest = _digest(raw)
            current = self.lanes.get(name)
            if current is not None and current.digest == digest:
                lanes[name] = current
                continue
            experiment = self._usable(name, raw, digest)
            if experiment is None:
                continue
            lane = self.make_lane(experiment, digest)
            await lane.live.refresh()
            if not lane.live.loaded.is_set():
                continue  # no routing yet: next time
            lanes[name] = lane
            changed = True
            log.info("serving experiment %s (%s)", name, "replaced" if current else "new")
        if changed or set(lanes) != set(self.lanes):
            for gone in set(self.lanes) - set(lanes):
                log.info("experiment %s ended: no longer routed", gone)
            self._install(lanes)
            if self.on_change is not None:
                self.on_change()

    async def refresh(self) -> None:
        """One round of the follower: the catalog, then every lane's routing. One round at a
        time: the cluster discovery asks for one of its own (``ClusterDiscovery``)."""
        async with self._refreshing:
            await self.sync()
            await asyncio.gather(*(lane.live.refresh() for lane in self.lanes.values()))
        self.loaded.set()

    async def run(self) -> None:
        """Follow Redis until cancelled; never raises on Redis trouble."""
        only = self.only
        if only is not None:
            await only.live.run()
            return

        async def subscribe(pubsub: PubSub) -> None:
            await pubsub.subscribe(keys.CATALOG)
            await pubsub.psubscribe(keys.changes("*"))

        await follow(self, subscribe)

    def kept(self) -> str:
        """What the follower keeps while Redis is away, for the log."""
        return f"{len(self.lanes)} experiment(s)"

    @property
    def routing_error(self) -> str | None:
        errors = [
            f"{n}: {lane.live.routing_error}"
            for n, lane in self.lanes.items()
            if lane.live.routing_error
        ]
        return "; ".join(errors) or None

    def variant_addresses(self) -> Mapping[str, str]:
        """Envoy cluster -> model server address of every variant of every live experiment that
        names one (what a fleet Envoy discovers on demand)."""
        out: dict[str, str] = {}
        for lane in self.lanes.values():
            for v in lane.experiment.spec.variants.values():
                if v.address:
                    out.setdefault(v.cluster, v.address)
        return out
