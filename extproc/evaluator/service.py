"""`extproc evaluate`: the evaluator process, one active per experiment through a Redis lease.

Each tick (``rollout.cadence_s``) the active evaluator reads the telemetry written since its last
tick, applies operator intents, judges the current stage and acts: advance, complete, hold or roll
back. A rollback is one routing change in Redis: every sidecar replica routes the next request to
the stable variant (pub/sub, well under a second). Standbys renew nothing and take over when the
lease expires; the new leader rebuilds the stage window from the event stream (stream ids are
millisecond timestamps) and continues from the recorded command position, so no intent and no
decision is applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from extproc import keys, store
from extproc.config import Experiment
from extproc.evaluator.judge import Verdict, judge
from extproc.evaluator.rollout import (
    RolloutState,
    append_audit,
    load_state,
    rollback_weights,
    stage_weights,
)
from extproc.evaluator.window import StageWindow
from extproc.status import decode_event

log = logging.getLogger(__name__)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class Evaluator:
    def __init__(
        self,
        experiment: Experiment,
        redis: aioredis.Redis,
        instance: str = "",
        lease_ttl_s: float | None = None,
    ) -> None:
        self.experiment = experiment
        self.spec = experiment.spec
        self.redis = redis
        self.instance = instance or f"{socket.gethostname()}-{os.getpid()}"
        cadence = self.spec.rollout.cadence_s
        self.lease_ttl_ms = int(1000 * (lease_ttl_s or max(3.0, 3 * cadence)))
        self.leader = False
        self.state: RolloutState | None = None
        self.window = StageWindow(started_ms=0)
        self.events_seen = "0-0"
        self.ticks = 0
        self.last_verdict: Verdict | None = None
        self._webhooks: set[asyncio.Task[None]] = set()

    # --- lease --------------------------------------------------------------------------------

    async def _hold_lease(self) -> bool:
        renew = self.redis.register_script(_RENEW)
        got = await renew(
            keys=[keys.lease(self.experiment.name)], args=[self.instance, self.lease_ttl_ms]
        )
        held = bool(got)
        if held and not self.leader:
            log.info("evaluator %s is now active for %s", self.instance, self.experiment.name)
            await self._take_over()
        self.leader = held
        return held

    async def _take_over(self) -> None:
        state = await load_state(self.redis, self.experiment.name)
        if state is None:
            state = RolloutState(
                status="running", stage=0, stage_started=time.time(), strategy=self.spec.strategy
            )
            await self._set_weights(stage_weights(self.spec, 0), "rollout started at stage 1")
            await self._save(state)
            await self._audit("start", ["rollout started"], state, None)
        self.state = state
        self._reset_window(state.stage_started)
        self.events_seen = f"{int(state.stage_started * 1000)}-0"

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
    ) -> None:
        routing = await store.get_routing(self.redis, self.experiment.name)
        record: dict[str, Any] = {
            "time": time.time(),
            "action": action,
            "actor": actor or f"evaluator {self.instance}",
            "reasons": reasons,
            "stage": state.stage,
            "status": state.status,
            "weights": routing.weights if routing else None,
            "snapshot": {v: w.summary() for v, w in self.window.variants.items()},
            "checks": [c.to_json() for c in verdict.checks] if verdict else [],
        }
        await append_audit(self.redis, self.experiment.name, record)
        if self.spec.rollout.webhook:
            task = asyncio.create_task(self._webhook(record))
            self._webhooks.add(task)
            task.add_done_callback(self._webhooks.discard)

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

    def _reset_window(self, started: float) -> None:
        self.window = StageWindow(started_ms=int(started * 1000))

    async def _read_events(self) -> int:
        n = 0
        while True:
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

    async def _apply_commands(self, state: RolloutState) -> None:
        entries = await self.redis.xrange(
            keys.commands(self.experiment.name), min=f"({state.commands_seen}"
        )
        for entry_id, fields in entries or []:
            f = {_text(k): _text(v) for k, v in (fields or {}).items()}
            state.commands_seen = _text(entry_id)
            await self._operator(
                state, f.get("command", ""), f.get("actor", "operator"), f.get("reason", "")
            )
        await self._save(state)

    async def _operator(self, state: RolloutState, command: str, actor: str, reason: str) -> None:
        why = [f"{command} by {actor}" + (f": {reason}" if reason else "")]
        if command == "pause" and state.status == "running":
            state.status = "paused"
        elif command == "resume" and state.status == "paused":
            state.status = "running"
        elif command == "promote" and state.status in ("running", "paused"):
            await self._advance(state, None, why, actor)
            return
        elif command == "rollback" and state.status in ("running", "paused", "completed"):
            await self._rollback(state, None, why, actor)
            return
        elif command == "abort" and state.status in ("running", "paused"):
            await self._set_weights(rollback_weights(self.spec), f"aborted by {actor}")
            state.status = "aborted"
        else:
            why = [f"ignored {command!r} by {actor}: rollout is {state.status}"]
        state.last_action, state.last_reasons = command, why
        await self._audit(command, why, state, None, actor)

    async def _advance(
        self, state: RolloutState, verdict: Verdict | None, reasons: list[str], actor: str = ""
    ) -> None:
        last = state.stage >= len(self.spec.rollout.stages) - 1
        if self.spec.strategy != "canary" or last:
            state.status, state.last_action = "completed", "complete"
            if self.spec.strategy == "canary":
                await self._set_weights(stage_weights(self.spec, state.stage), "rollout complete")
        else:
            state.stage += 1
            state.stage_started = time.time()
            state.last_action = "advance"
            await self._set_weights(
                stage_weights(self.spec, state.stage), f"stage {state.stage + 1}: {reasons[-1]}"
            )
            self._reset_window(state.stage_started)
        state.last_reasons = reasons
        await self._save(state)
        await self._audit(state.last_action, reasons, state, verdict, actor)

    async def _rollback(
        self, state: RolloutState, verdict: Verdict | None, reasons: list[str], actor: str = ""
    ) -> None:
        await self._set_weights(rollback_weights(self.spec), "rollback: " + "; ".join(reasons))
        state.status, state.last_action, state.last_reasons = "rolled_back", "rollback", reasons
        await self._save(state)
        await self._audit("rollback", reasons, state, verdict, actor)
        log.warning("rolled back %s: %s", self.experiment.name, "; ".join(reasons))

    async def tick(self) -> None:
        """Read, apply intents, judge, act: one evaluation of the experiment."""
        state = self.state
        assert state is not None
        await self._read_events()
        await self._apply_commands(state)
        self.ticks += 1
        if state.status != "running":
            return
        routing = await store.get_routing(self.redis, self.experiment.name)
        weights = routing.weights if routing else stage_weights(self.spec, state.stage)
        verdict = judge(
            self.spec, self.window, weights, state.stage, time.time() - state.stage_started
        )
        self.last_verdict = verdict
        if verdict.action == "rollback":
            await self._rollback(state, verdict, verdict.reasons)
        elif verdict.action in ("advance", "complete"):
            await self._advance(state, verdict, verdict.reasons)
        elif verdict.action == "hold" and state.last_reasons != verdict.reasons:
            state.last_action, state.last_reasons = "hold", verdict.reasons
            await self._save(state)
            await self._audit("hold", verdict.reasons, state, verdict)

    async def _health(self) -> None:
        key = keys.evaluator(self.instance)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                key,
                mapping={
                    "experiment": self.experiment.name,
                    "active": int(self.leader),
                    "ticks": self.ticks,
                    "time": time.time(),
                    "pid": os.getpid(),
                },
            )
            pipe.expire(key, max(3, int(3 * self.spec.rollout.cadence_s)))
            await pipe.execute()

    async def run(self) -> None:
        """Tick until SIGTERM/SIGINT; Redis trouble is logged and retried, never fatal."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        cadence = self.spec.rollout.cadence_s
        while not stop.is_set():
            try:
                if await self._hold_lease():
                    await self.tick()
                await self._health()
            except (RedisError, OSError) as err:
                log.warning("evaluator tick failed: %s", err)
                self.leader = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), cadence if self.leader else min(cadence, 1))
        if self.leader:  # hand over at once instead of waiting for the lease to expire
            with contextlib.suppress(RedisError, OSError):
                held = await self.redis.get(keys.lease(self.experiment.name))
                if held is not None and _text(held) == self.instance:
                    await self.redis.delete(keys.lease(self.experiment.name))


async def serve(experiment: Experiment, redis_url: str, instance: str = "") -> None:
    r = store.connect(redis_url)
    try:
        await Evaluator(experiment, r, instance).run()
    finally:
        await r.aclose()
