"""Every experiment in Redis judged by one process: ``extproc evaluate --all``.

Why: a gateway team runs many rollouts at once (a chat model, a code model, an embedding model),
created and ended while traffic flows. One evaluator process per experiment file means a new
deployment for every rollout. A fleet process instead follows the set of experiments in Redis
(``extproc:experiments``, what `extproc experiment create` adds to) and runs one
:class:`~extproc.evaluator.service.Evaluator` per experiment, each with its own lease: several
fleet processes share the experiments between them (whoever holds an experiment's lease decides
for it), and any of them takes over an experiment whose holder died, as single-experiment
evaluators do.

An experiment's evaluator starts within ``refresh_s`` of its definition appearing, restarts
with the new definition when `experiment create --replace` changes it (the rollout state and
the audit log are in Redis, so it carries on where it was), and stops, handing its lease over,
when the experiment leaves the set. A definition that no longer validates (written by a newer
release, or by hand) is reported once and skipped until it changes; the other experiments are
not affected (nor is one whose warm-up cannot run: a missing address or forcing secret, an
unreadable prompt file). Each evaluator's health key and lease name it
``<instance>/<experiment>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from extproc import store
from extproc.config import ConfigError, Experiment, parse_experiment
from extproc.contract import keys
from extproc.evaluator import warmup
from extproc.evaluator.service import Evaluator, default_instance, stop_on_signals
from extproc.evaluator.takeover import SnapshotPolicy
from extproc.supervise import TaskGroup, raise_if_cancelled
from extproc.telemetry.prometheus import EvaluatorMetrics, serve_metrics

log = logging.getLogger(__name__)

GRACE_S = 5.0
"""How long an ending evaluator may take to finish its tick and hand its lease over."""


@dataclass
class _Running:
    digest: str  # of the definition it runs, to notice a replaced one
    stop: asyncio.Event = field(default_factory=asyncio.Event)


def _digest(definition: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()


class Fleet:
    """One evaluator per experiment in Redis, started, replaced and stopped as the set of
    experiments and their definitions change."""

    def __init__(
        self,
        redis: aioredis.Redis,
        instance: str,
        *,
        refresh_s: float = 1.0,
        metrics: EvaluatorMetrics | None = None,
        listener: str | None = None,
        admins: tuple[str, ...] = (),
        snapshots: SnapshotPolicy | None = None,
    ) -> None:
        self.redis = redis
        self.instance = instance
        self.refresh_s = refresh_s
        self.metrics = metrics or EvaluatorMetrics()
        self.listener, self.admins = listener, admins  # what --listener, --envoy-admin said
        self.snapshots = snapshots
        self.running: dict[str, _Running] = {}
        self.invalid: dict[str, str] = {}  # experiment -> digest of the definition refused
        self.group = TaskGroup()

    async def refresh(self) -> None:
        """Bring the evaluators in line with the experiments in Redis, once."""
        raw = await self.redis.smembers(keys.EXPERIMENTS)
        names = {n.decode() if isinstance(n, bytes) else str(n) for n in raw}
        for name in sorted(set(self.running) - names):
            log.info("fleet: %s left the experiments; its evaluator stops", name)
            await self._end(name)
        for name in sorted(names):
            definition = await store.get_definition(self.redis, name)
            if definition is None:
                continue
            digest = _digest(definition)
            have = self.running.get(name)
            if (have is not None and have.digest == digest) or self.invalid.get(name) == digest:
                continue
            try:
                experiment = parse_experiment(definition, source=f"experiment {name} in Redis")
                reach = warmup.prepare(experiment, self.listener, self.admins)
            except ConfigError as err:
                log.error("fleet: not evaluating %s: %s", name, err)
                self.invalid[name] = digest
                continue
            self.invalid.pop(name, None)
            if have is not None:
                log.info("fleet: %s has a new definition; its evaluator restarts with it", name)
                await self._end(name)
            self._start(experiment, reach, digest)

    def _start(self, experiment: Experiment, reach: warmup.Reach, digest: str) -> None:
        entry = self.running[experiment.name] = _Running(digest)
        name = f"{self.instance}/{experiment.name}"
        evaluator = Evaluator(
            experiment,
            self.redis,
            name,
            metrics=self.metrics,
            reach=reach,
            snapshots=self.snapshots,
        )
        self.group.start(experiment.name, lambda: evaluator.run(entry.stop))
        log.info("fleet: evaluating %s", experiment.name)

    async def _end(self, name: str) -> None:
        entry = self.running.pop(name)
        await self.group.end(name, entry.stop, GRACE_S)

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the experiments until ``stop``; then end every evaluator (each hands its
        lease over). Redis trouble is logged and retried: the evaluators retry on their own."""
        try:
            while not stop.is_set():
                raise_if_cancelled()
                try:
                    await self.refresh()
                except (RedisError, OSError) as err:
                    log.warning("fleet: reading the experiments failed: %s", err)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.refresh_s)
        finally:
            for name in list(self.running):
                await self._end(name)


async def serve(
    redis_url: str,
    instance: str = "",
    metrics: str | None = None,
    listener: str | None = None,
    admins: tuple[str, ...] = (),
    snapshots: SnapshotPolicy | None = None,
) -> None:
    """Run a fleet evaluator until SIGTERM or SIGINT; with ``metrics`` (host:port) also serve
    Prometheus ``/metrics`` for every experiment it evaluates. ``listener`` and ``admins``
    (Envoy's) replace each experiment's own, for its warm-up and drain; ``snapshots`` is when
    each evaluator snapshots its window."""
    r = store.connect(redis_url)
    fleet = Fleet(
        r, instance or default_instance(), listener=listener, admins=admins, snapshots=snapshots
    )
    runner = None
    if metrics:
        host, _, port = metrics.rpartition(":")
        runner = await serve_metrics(fleet.metrics.registry, host, int(port))
    try:
        await fleet.run(stop_on_signals())
    finally:
        if runner is not None:
            await runner.cleanup()
        await r.aclose()
