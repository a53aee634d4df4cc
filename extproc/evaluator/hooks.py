"""Lifecycle webhooks (``hooks:`` in the experiment file): one JSON POST per rollout event.

Why a module of its own: a serving layer acts on these (warm a candidate at the start, scale it
at an advance, unload it after a rollback), so a hook must survive a restarting receiver
(retries with doubling backoff, a timeout per try), and it must never hold up the decision it
reports: the evaluator calls :func:`deliver` in a task of its own after the decision took
effect, and records a hook that failed every try in the audit log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from extproc.config import ExperimentSpec, Hooks

Sleep = Callable[[float], Awaitable[None]]

HOOK_OF_ACTION = {
    "start": "on_start",
    "restart": "on_start",  # a new attempt needs a warm candidate as much as the first
    "advance": "on_advance",
    "rollback": "on_rollback",
    "complete": "on_complete",
    "drained": "on_drained",  # the variant a rollback or completion took out of routing
    "drain_timeout": "on_drained",  # ... or not, within lifecycle.drain.timeout_s: see "drain"
}


@dataclass(frozen=True)
class Delivery:
    """How a hook went: ``ok`` after ``tries`` POSTs, else the last try's ``error``."""

    ok: bool
    tries: int
    error: str = ""


def hook_url(hooks: Hooks, action: str) -> tuple[str, str] | None:
    """(hook name, URL) for a decision's action, or None when no hook listens for it."""
    name = HOOK_OF_ACTION.get(action)
    url = getattr(hooks, name) if name else None
    return (name, url) if name and url else None


def body(spec: ExperimentSpec, hook: str, action: str, record: dict[str, Any]) -> dict[str, Any]:
    """What a serving layer needs to act without reading Redis: which variants, which models,
    the weights now set, and why; ``on_drained`` also the drain (which variants, clusters,
    ``drained``, ``seconds``)."""
    return {
        "hook": hook,
        "action": action,
        "experiment": spec.name,
        "attempt": record.get("attempt", 1),
        "stage": record.get("stage", 0),
        "status": record.get("status", ""),
        "weights": record.get("weights"),
        "reasons": record.get("reasons", []),
        "time": record.get("time"),
        "stable": spec.stable,
        "variants": {n: {"model": v.model, "cluster": v.cluster} for n, v in spec.variants.items()},
        **{k: record[k] for k in ("warmup", "drain") if k in record},
    }


async def deliver(
    url: str, payload: dict[str, Any], hooks: Hooks, sleep: Sleep = asyncio.sleep
) -> Delivery:
    """POST ``payload`` until a 2xx answer, at most ``1 + hooks.retries`` times, waiting
    ``backoff_s``, then twice that, ... between tries (``sleep`` is injected by tests)."""
    timeout = aiohttp.ClientTimeout(total=hooks.timeout_s)
    error = ""
    tries = 0
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for tries in range(1, hooks.retries + 2):
            try:
                async with session.post(url, json=payload) as resp:
                    if resp.status < 300:
                        return Delivery(True, tries)
                    error = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as err:
                error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            if tries <= hooks.retries:
                await sleep(hooks.backoff_s * 2 ** (tries - 1))
    return Delivery(False, tries, error)
