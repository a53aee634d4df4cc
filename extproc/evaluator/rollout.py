"""Rollout state, operator intents and the audit log, as stored in Redis.

Operators (CLI, dashboard) never change weights behind the evaluator's back: they append an
intent to the experiment's command stream, and the active evaluator applies it on its next tick
and records it in the audit log, so there is one writer of rollout decisions.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Any, Literal

import redis.asyncio as aioredis

from extproc.config import ExperimentSpec
from extproc.contract import keys

Status = Literal["running", "paused", "rolled_back", "completed", "aborted"]
COMMANDS = ("pause", "resume", "promote", "rollback", "abort", "restart")
AUDIT_FIELD = "j"


@dataclass
class RolloutState:
    """One attempt's rollout, as the evaluator left it at its last decision.

    ``attempt`` counts the runs of the experiment (1, then one more per `experiment restart`);
    ``attempt_started`` is when this one began (0 for the first, which judges every event):
    requests that started before it belong to an earlier attempt and are never judged in it.
    ``phase`` is the running link of a chain of strategies (``phases:``); ``stage`` counts the
    stages of that phase, and ``strategy`` is its strategy.
    """

    status: Status
    stage: int
    stage_started: float
    strategy: str
    commands_seen: str = "0-0"
    last_action: str = ""
    last_reasons: list[str] = field(default_factory=list)
    updated: float = 0.0
    # per check ("variant/metric"): log evidence carried from finished stages (judge.carry_evidence)
    evidence: dict[str, float] = field(default_factory=dict)
    attempt: int = 1
    attempt_started: float = 0.0
    phase: int = 0  # index into the experiment's phases (0 without any)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> RolloutState:
        """The state, read by any release: fields a newer one added are left out, fields an
        older one lacked take their defaults (a state written before attempts is attempt 1)."""
        known = {f.name for f in dataclass_fields(cls)}
        return cls(**{k: v for k, v in json.loads(raw).items() if k in known})


def stage_weights(spec: ExperimentSpec, stage: int, *, holdback: bool = True) -> dict[str, float]:
    """The split at a stage: every candidate at the stage's share (within its lane).

    A stage that would leave stable less than ``rollout.holdback`` percent (the 100% stage) keeps
    that much on stable until the rollout completes, so the last stage is still judged against
    concurrent stable traffic; ``holdback=False`` gives the split once it has completed.
    """
    if spec.strategy != "canary":
        return {n: v.weight for n, v in spec.variants.items()}
    share = spec.rollout.shares[stage]
    cands = [v for v in spec.variants if v != spec.stable]
    keep = spec.rollout.holdback if holdback else 0.0
    if 100 - share * len(cands) < keep:
        share = math.floor((100 - keep) / len(cands) * 100) / 100  # on the 0.01% bucket grid
    weights = dict.fromkeys(cands, share)
    weights[spec.stable] = round(100 - share * len(cands), 2)
    return weights


def flip_weights(spec: ExperimentSpec) -> dict[str, float]:
    """Blue-green after its checks: everything to the new (mirrored) variant; stable stays
    deployed and registered, so a rollback flips back at once."""
    return {v: (100.0 if v == spec.shadow.variant else 0.0) for v in spec.variants}


def rollback_weights(spec: ExperimentSpec) -> dict[str, float]:
    return {v: (100.0 if v == spec.stable else 0.0) for v in spec.variants}


async def load_state(r: aioredis.Redis, name: str) -> RolloutState | None:
    raw = await r.get(keys.rollout(name))
    return None if raw is None else RolloutState.from_json(raw)


async def send_command(r: aioredis.Redis, name: str, command: str, actor: str, reason: str) -> str:
    """Record an operator's intent; the active evaluator applies it within one tick."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; one of {COMMANDS}")
    entry_id = await r.xadd(
        keys.commands(name),
        {"command": command, "actor": actor, "reason": reason, "time": str(time.time())},
        maxlen=10_000,
        approximate=True,
    )
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


async def append_audit(r: aioredis.Redis, name: str, record: dict[str, Any]) -> None:
    await r.xadd(
        keys.audit(name), {AUDIT_FIELD: json.dumps(record)}, maxlen=100_000, approximate=True
    )


async def read_audit(r: aioredis.Redis, name: str, count: int = 100) -> list[dict[str, Any]]:
    """The newest ``count`` audit records, oldest first."""
    entries = await r.xrevrange(keys.audit(name), count=count) or []
    out = []
    for entry_id, fields in reversed(entries):
        raw = (fields or {}).get(AUDIT_FIELD.encode())
        if isinstance(raw, bytes):
            rec: dict[str, Any] = json.loads(raw)
            rec["id"] = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            out.append(rec)
    return out
