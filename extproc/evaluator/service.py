"""`extproc evaluate`: the evaluator process, one active per experiment through a Redis lease.

Each tick (``rollout.cadence_s``) the active evaluator reads the telemetry written since its last
tick, applies operator intents, judges the current stage and acts: advance, complete, hold or roll
back. The decisions are pure functions in ``machine.py``, shared with the offline replay
(`extproc analyze`) so a backtest takes the decisions production would; this module only reads
Redis and carries them out. A rollback is one routing change in Redis: every sidecar replica
routes the next request to the stable variant (pub/sub, well under a second). Standbys renew
nothing and take over when the lease expires; the new leader loads the active one's latest
snapshot of the stage window and reads only the events after it (``takeover.py``), or, without a
usable snapshot, rebuilds the window from the event stream (stream ids are millisecond
timestamps); it continues from the recorded command position, so no intent and no decision is
applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Coroutine
from dataclasses import asdict, replace
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from extproc import store
from extproc.config import Experiment
from extproc.contract import keys, signals
from extproc.evaluator import drain, hooks, machine, takeover, warmup
from extproc.evaluator.guardrails import Verdict
from extproc.evaluator.rollout import RolloutState, append_audit, load_state, stage_weights
from extproc.evaluator.snapshot import Identity, SnapshotError
from extproc.evaluator.takeover import SnapshotPolicy, SnapshotWriter
from extproc.evaluator.window import StageWindow
from extproc.supervise import TaskGroup, raise_if_cancelled
from extproc.telemetry.events import decode_event
from extproc.telemetry.prometheus import EvaluatorMetrics, serve_metrics

log = logging.getLogger(__name__)

SIGNAL_LAG_MS = 1000

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def default_instance() -> str:
    """An evaluator's name when none is given: unique per process on a host."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Evaluator:
    def __init__(
        self,
        experiment: Experiment,
        redis: aioredis.Redis,
        instance: str = "",
        lease_ttl_s: float | None = None,
        metrics: EvaluatorMetrics | None = None,
        reach: warmup.Reach | None = None,
        snapshots: SnapshotPolicy | None = None,
    ) -> None:
        self.experiment = experiment
        self.reach = reach or warmup.Reach()
        self.spec = experiment.spec
        self.redis = redis
        self.instance = instance or default_instance()
        cadence = self.spec.rollout.cadence_s
        self.lease_ttl_ms = int(1000 * (lease_ttl_s or max(3.0, 3 * cadence)))
        self.leader = False
        self.state: RolloutState | None = None
        self.window = StageWindow(started_ms=0)
        self.events_seen = "0-0"
        self.signals_seen = "0-0"
        self.ticks = 0
        self.last_verdict: Verdict | None = None
        self._webhooks: set[asyncio.Task[None]] = set()
        self._warmup: asyncio.Task[warmup.WarmupReport] | None = None
        self._drain: asyncio.Task[None] | None = None
        # One registry per process: a fleet's evaluators share it (their series differ by
        # experiment), so one /metrics endpoint shows them all.
        self.metrics = metrics or EvaluatorMetrics()
        self.snapshots = SnapshotWriter(
            redis, experiment.name, self.instance, snapshots or SnapshotPolicy()
        )

    # --- lease --------------------------------------------------------------------------------

    async def _renew(self) -> bool:
        renew = self.redis.register_script(_RENEW)
        got = await renew(
            keys=[keys.lease(self.experiment.name)], args=[self.instance, self.lease_ttl_ms]
        )
        return bool(got)

    async def _hold_lease(self) -> bool:
        held = await self._renew()
        if held and not self.leader:
            log.info("evaluator %s is now active for %s", self.instance, self.experiment.name)
            await self._take_over()
        if not held and self._warmup is not None:  # the new leader warms up by itself
            self._warmup.cancel()
            self._warmup = None
        self.leader = held
        return held

    async def _take_over(self) -> None:
        state = await load_state(self.redis, self.experiment.name)
        if state is None:
            await self._apply(machine.begin(self.spec, time.time()))
        else:
            self.state = state
            self._reset_window(state)
            if state.status == "warming_up":  # the last leader's warm-up ended with it
                self._start_warmup(state)
        assert self.state is not None
        self.events_seen = f"{int(self.state.stage_started * 1000)}-0"
        self.signals_seen = self.events_seen
        if state is not None:
            await self._restore_snapshot(state)

    # --- window snapshots (takeover.py) ---------------------------------------------------------

    async def _restore_snapshot(self, state: RolloutState) -> None:
        """Start from the active evaluator's last snapshot of this stage, if there is a usable
        one: the tick then reads only the events after it. Otherwise the whole stage is read."""
        name = self.experiment.name
        phase = machine.running(self.spec, state)
        fresh = machine.new_window(phase, state.stage_started, None, state.attempt_started)
        try:
            identity = Identity.of(state.attempt, state.stage, fresh)
            got = await takeover.load(self.redis, name, identity, fresh)
        except SnapshotError as err:
            log.warning("%s: window snapshot not used, reading the whole stage: %s", name, err)
            return
        self.window, self.events_seen, self.signals_seen = (
            got.window,
            got.events_seen,
            got.signals_seen,
        )
        log.info(
            "%s: stage window restored from a snapshot written at %d ms (events up to %s)",
            name,
            got.written_ms,
            got.events_seen,
        )

    def _snapshot_if_due(self) -> None:
        assert self.state is not None
        identity = Identity.of(self.state.attempt, self.state.stage, self.window)
        if self.snapshots.due(identity, self.events_seen, self.signals_seen):
            self.snapshots.start(self.window, identity, self.events_seen, self.signals_seen)

    # --- Redis writes ---------------------------------------------------------------------------

    async def _save(self, state: RolloutState) -> None:
        state.updated = time.time()
        await self.redis.set(keys.rollout(self.experiment.name), state.to_json())

    async def _set_weights(self, weights: dict[str, float], reason: str) -> None:
        await store.set_weights(
            self.redis, self.experiment, weights, reason=reason, actor=f"evaluator {self.instance}"
        )

    async def _audit(
        self,
        action: str,
        reasons: list[str],
        state: RolloutState,
        verdict: Verdict | None,
        actor: str = "",
        archived: RolloutState | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Append the decision; a restart's record also keeps the attempt it ended
        (``archived``), the only copy of that state once the new attempt overwrites it; a
        lifecycle record its ``warmup`` or ``drain`` report (``extra``)."""
        routing = await store.get_routing(self.redis, self.experiment.name)
        record: dict[str, Any] = {
            "time": time.time(),
            "action": action,
            "actor": actor or f"evaluator {self.instance}",
            "reasons": reasons,
            "attempt": state.attempt,
            "stage": state.stage,
            "status": state.status,
            "weights": routing.weights if routing else None,
            "snapshot": {v: w.summary() for v, w in self.window.variants.items()},
            "checks": [c.to_json() for c in verdict.checks] if verdict else [],
        }
        if verdict is not None and verdict.decisions:
            record["decisions"] = [d.to_json() for d in verdict.decisions]
        if archived is not None:
            record["archived"] = asdict(archived)
        record.update(extra or {})
        await append_audit(self.redis, self.experiment.name, record)
        if self.spec.rollout.webhook:
            self._background(self._webhook(record))
        hook = hooks.hook_url(self.spec.hooks, action)
        if hook is not None:
            self._background(self._lifecycle_hook(*hook, action, record))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a notification beside the ticks: the decision it reports never waits on it."""
        task = asyncio.create_task(work)
        self._webhooks.add(task)
        task.add_done_callback(self._webhooks.discard)

    async def _lifecycle_hook(
        self, hook: str, url: str, action: str, record: dict[str, Any]
    ) -> None:
        """Deliver a lifecycle hook; one that failed every try is recorded in the audit log
        (``action: hook_failed``), so an operator sees that the serving layer was not told."""
        payload = hooks.body(self.spec, hook, action, record)
        done = await hooks.deliver(url, payload, self.spec.hooks)
        if done.ok:
            return
        log.warning("%s hook %s failed %d times: %s", hook, url, done.tries, done.error)
        failed = {
            "time": time.time(),
            "action": "hook_failed",
            "actor": f"evaluator {self.instance}",
            "reasons": [f"{hook} ({action}) to {url}: {done.error} after {done.tries} tries"],
            "attempt": record["attempt"],
            "stage": record["stage"],
            "status": record["status"],
            "weights": record["weights"],
            "hook": {"name": hook, "url": url, "tries": done.tries, "error": done.error},
        }
        with contextlib.suppress(RedisError, OSError):
            await append_audit(self.redis, self.experiment.name, failed)

    async def _webhook(self, record: dict[str, Any]) -> None:
        url = self.spec.rollout.webhook
        assert url is not None
        text = (
            f"[{self.experiment.name}] {record['action']} at stage {record['stage'] + 1}: "
            + "; ".join(record["reasons"])
        )
        try:
            timeout = aiohttp.ClientTimeout(total=5)
            async with (
                aiohttp.ClientSession(timeout=timeout) as s,
                s.post(url, json={"text": text, **record}) as resp,
            ):
                if resp.status >= 300:
                    log.warning("webhook %s answered %d", url, resp.status)
        except (aiohttp.ClientError, TimeoutError) as err:
            log.warning("webhook %s failed: %s", url, err)

    # --- one tick -------------------------------------------------------------------------------

    def _reset_window(self, state: RolloutState, *, follow_open: bool = True) -> None:
        """A fresh window for ``state``'s stage; ``follow_open`` keeps following the requests
        still open in the last one (not after a restart: they belong to the ended attempt)."""
        previous = self.window if follow_open else None
        self.window = machine.new_window(
            machine.running(self.spec, state), state.stage_started, previous, state.attempt_started
        )
        self.last_verdict = None  # a verdict belongs to its stage's window

    async def _read_events(self) -> int:
        """Read the events written since the last read into the stage window.

        A new leader may have a long stage to read (a million events take tens of seconds):
        the lease is renewed between batches, so it cannot expire while the reader is busy and
        hand the experiment to a second evaluator; if it was lost anyway, reading stops and
        the tick does nothing (``self.leader`` is False).
        """
        n = 0
        renewed = time.monotonic()
        while True:
            if time.monotonic() - renewed > self.lease_ttl_ms / 3000:
                renewed = time.monotonic()
                if not await self._renew():
                    log.warning("lost the lease of %s while reading", self.experiment.name)
                    self.leader = False
                    return n
            entries = await self.redis.xrange(
                keys.events(self.experiment.name), min=f"({self.events_seen}", count=5000
            )
            if not entries:
                return n
            for entry_id, fields in entries:
                ev = decode_event(fields)
                if ev is not None:
                    self.window.add(ev)
                self.events_seen = _text(entry_id)
            n += len(entries)

    async def _read_signals(self) -> None:
        """Fold in quality signals written up to a second ago: feedback names a request whose
        event may still sit in a sidecar's 50 ms write buffer, so the lag lets events land first.
        """
        horizon = int(time.time() * 1000) - SIGNAL_LAG_MS
        while True:
            batch = await signals.read(self.redis, self.experiment.name, self.signals_seen)
            for entry_id, sig in batch.signals:
                if int(entry_id.split("-", 1)[0]) > horizon:
                    return
                self.window.add_signal(sig)
                self.signals_seen = entry_id
            if batch.malformed:
                self.signals_seen = batch.next_id
            if not batch.signals and not batch.malformed:
                return

    async def _publish_evaluation(self, verdict: Verdict | None) -> None:
        """The figures and checks of this look, for `extproc status` and the dashboard."""
        assert self.state is not None
        doc = {
            "time": time.time(),
            "attempt": self.state.attempt,
            "stage": self.state.stage,
            "status": self.state.status,
            "variants": {v: w.summary() for v, w in self.window.variants.items()},
            "feedback_unattributed": self.window.unattributed,
            "action": verdict.action if verdict else None,
            "reasons": verdict.reasons if verdict else [],
            "checks": [c.to_json() for c in verdict.checks] if verdict else [],
            "srm_p": verdict.srm_p if verdict else None,
            "decisions": [d.to_json() for d in verdict.decisions] if verdict else [],
        }
        await self.redis.set(keys.evaluation(self.experiment.name), json.dumps(doc))

    async def _apply(self, t: machine.Transition, extra: dict[str, Any] | None = None) -> None:
        """Carry out a transition: weights first (the part that protects users), then state,
        then the audit record (with ``extra``, a lifecycle report). The audit snapshot is the
        window the decision was made on; a new stage's window starts after it."""
        self.state = t.state
        if not t.action:
            return
        if t.weights is not None:
            await self._set_weights(t.weights, t.weights_reason)
        await self._save(t.state)
        await self._audit(t.action, t.reasons, t.state, t.verdict, t.actor, t.archived, extra)
        self.metrics.decision(self.experiment.name, t.action)
        self._follow_lifecycle(t)
        if t.restart_window:
            self._reset_window(t.state, follow_open=t.archived is None)
        what = (self.experiment.name, t.state.attempt, t.action, t.state.stage + 1)
        why = "; ".join(t.reasons)
        if t.action == "rollback":
            log.warning("%s attempt %d: %s at stage %d: %s", *what, why)
        else:
            log.info("%s attempt %d: %s, now at stage %d: %s", *what, why)

    async def _apply_commands(self) -> None:
        assert self.state is not None
        entries = await self.redis.xrange(
            keys.commands(self.experiment.name), min=f"({self.state.commands_seen}"
        )
        for entry_id, fields in entries or []:
            f = {_text(k): _text(v) for k, v in (fields or {}).items()}
            self.state = replace(self.state, commands_seen=_text(entry_id))
            t = machine.command(
                self.spec,
                self.state,
                f.get("command", ""),
                f.get("actor", "operator"),
                f.get("reason", ""),
                time.time(),
                self.last_verdict,
            )
            await self._apply(t)
        await self._save(self.state)

    # --- lifecycle: warm-up and drain ------------------------------------------------------------

    def _follow_lifecycle(self, t: machine.Transition) -> None:
        """After a decision: a rollout that (re)starts warming up gets its warm-up; one that
        left the warm-up (an abort, a rollback) stops it; the variants a rollback, an abort or a
        completion took out of routing are followed until they drain."""
        warming = t.state.status == "warming_up"
        if self._warmup is not None and (not warming or t.action == "restart"):
            self._warmup.cancel()
            self._warmup = None
        if warming and t.action in ("start", "restart"):
            self._start_warmup(t.state)
        if t.action == "restart" and self._drain is not None:
            self._drain.cancel()  # the ended attempt's drain: the new attempt's state is fresh
            self._drain = None
        if t.weights is not None and t.action in ("rollback", "abort", "complete"):
            out = [v for v, w in t.weights.items() if w == 0]
            if out:
                if self._drain is not None:
                    self._drain.cancel()
                self._drain = asyncio.create_task(self._follow_drain(out, t.action, t.state))

    def _start_warmup(self, state: RolloutState) -> None:
        if self._warmup is not None:
            self._warmup.cancel()
        self._warmup = asyncio.create_task(self._run_warmup(state.attempt))

    async def _run_warmup(self, attempt: int) -> warmup.WarmupReport:
        log.info("%s attempt %d: warming up", self.experiment.name, attempt)
        candidates = [v for v in self.spec.variants if v != self.spec.stable]
        async with aiohttp.ClientSession() as session:
            runner = warmup.WarmupRunner(
                self.experiment, candidates, self.reach, session, attempt=attempt
            )
            return await runner.run()

    async def _finish_warmup(self) -> None:
        """At a tick (the one writer of decisions): act on a warm-up that has ended."""
        task = self._warmup
        if task is None or not task.done() or self.state is None:
            return
        self._warmup = None
        if task.cancelled():
            return
        report = task.result()
        reason = report.reason()
        doc = report.to_json()
        t = machine.warmed(self.spec, self.state, report.ok, reason, doc, time.time())
        await self._apply(t, {"warmup": doc})

    async def _follow_drain(self, variants: list[str], after: str, state: RolloutState) -> None:
        """Follow ``variants`` until no Envoy holds a request for them, then record the drain
        (rollout state, audit log) and call ``hooks.on_drained``. Without an Envoy admin
        address the drain is recorded as unknown, and no hook is called."""
        clusters = drain.clusters_of(self.experiment, variants)
        doc: dict[str, Any] = {
            "status": "draining",
            "variants": variants,
            "clusters": clusters,
            "after": after,
            "started": time.time(),
        }
        if not self.reach.admins:
            doc.update(status="unknown", error="no Envoy admin address (lifecycle.envoy_admin)")
            await self._save_drain(doc, state.attempt)
            return
        await self._save_drain(doc, state.attempt)
        settings = self.spec.lifecycle.drain
        timeout = aiohttp.ClientTimeout(total=max(1.0, settings.poll_s))

        async def look(active: int | None) -> None:  # the status shows what is still open
            if active != doc.get("active"):
                doc["active"] = active
                await self._save_drain(doc, state.attempt)

        async with aiohttp.ClientSession(timeout=timeout) as session:
            report = await drain.watch(session, self.reach.admins, clusters, settings, on_look=look)
        doc.update(report.to_json(), status="drained" if report.drained else "timeout")
        await self._save_drain(doc, state.attempt)
        assert self.state is not None
        action = drain.ACTIONS[0] if report.drained else drain.ACTIONS[1]
        reasons = [report.reason(variants)]
        with contextlib.suppress(RedisError, OSError):
            await self._audit(action, reasons, self.state, None, extra={"drain": doc})
        log.info("%s: %s", self.experiment.name, reasons[0])

    async def _save_drain(self, doc: dict[str, Any], attempt: int) -> None:
        """Keep the drain in the rollout state of the attempt it belongs to."""
        if self.state is None or self.state.attempt != attempt:
            return
        self.state = replace(self.state, drain=dict(doc))
        with contextlib.suppress(RedisError, OSError):
            await self._save(self.state)

    # --- one tick -------------------------------------------------------------------------------

    async def tick(self) -> None:
        """Read, apply intents, judge, act: one evaluation of the experiment."""
        assert self.state is not None
        self.snapshots.read(await self._read_events())
        if not self.leader:
            return
        await self._read_signals()
        await self._apply_commands()
        await self._finish_warmup()
        self.ticks += 1
        if self.state.status != "running":
            return
        routing = await store.get_routing(self.redis, self.experiment.name)
        phase = machine.running(self.spec, self.state)
        weights = routing.weights if routing else stage_weights(phase, self.state.stage)
        t = machine.evaluate(self.spec, self.state, self.window, weights, time.time())
        self.last_verdict = t.verdict
        await self._publish_evaluation(t.verdict)
        await self._apply(t)

    async def _health(self) -> None:
        await store.heartbeat(
            self.redis,
            keys.evaluator(self.instance),
            keys.EVALUATORS,
            self.instance,
            {
                "experiment": self.experiment.name,
                "active": int(self.leader),
                "ticks": self.ticks,
                "time": time.time(),
                "pid": os.getpid(),
            },
            max(3, int(3 * self.spec.rollout.cadence_s)),
        )

    def _export_gauges(self) -> None:
        name = self.experiment.name
        self.metrics.active(name, self.leader)
        if self.leader and self.state is not None:
            weights = stage_weights(machine.running(self.spec, self.state), self.state.stage)
            self.metrics.stage(name, self.state.stage, weights)
            self.metrics.rollout_status(name, self.state.status)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Tick until ``stop`` is set (default: on SIGTERM/SIGINT); Redis trouble is logged and
        retried, never fatal."""
        if stop is None:
            stop = stop_on_signals()
        cadence = self.spec.rollout.cadence_s
        while not stop.is_set():
            raise_if_cancelled()
            try:
                if await self._hold_lease():
                    await self.tick()
                    if self.leader:
                        self._snapshot_if_due()
                await self._health()
                self._export_gauges()
            except (RedisError, OSError) as err:
                log.warning("evaluator tick failed: %s", err)
                self.leader = False
            except store.MalformedRouting as err:  # a bad manual edit: say so at every look
                log.error("evaluator cannot read the routing (%s): write a valid one", err)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), cadence if self.leader else min(cadence, 1))
        if self.leader:  # hand over at once instead of waiting for the lease to expire
            with contextlib.suppress(RedisError, OSError):
                await self.snapshots.wait()
                held = await self.redis.get(keys.lease(self.experiment.name))
                if held is not None and _text(held) == self.instance:
                    await self.redis.delete(keys.lease(self.experiment.name))


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT: how a process is told to hand its leases over."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve(
    experiment: Experiment,
    redis_url: str,
    instance: str = "",
    metrics: str | None = None,
    reach: warmup.Reach | None = None,
    snapshots: SnapshotPolicy | None = None,
) -> None:
    """Run an evaluator; with ``metrics`` (host:port) also serve Prometheus ``/metrics``;
    ``reach`` is where the lifecycle finds Envoy (``warmup.prepare``)."""
    r = store.connect(redis_url)
    evaluator = Evaluator(experiment, r, instance, reach=reach, snapshots=snapshots)
    runner = None
    if metrics:
        host, _, port = metrics.rpartition(":")
        runner = await serve_metrics(evaluator.metrics.registry, host, int(port))
    # Supervised: an unexpected exception in a tick is logged and the loop restarted with
    # backoff (its heartbeat in Redis lapses meanwhile), instead of ending the process.
    stop = stop_on_signals()
    group = TaskGroup(stop=stop)
    try:
        await group.start("evaluator", lambda: evaluator.run(stop))
    finally:
        if runner is not None:
            await runner.cleanup()
        await r.aclose()
