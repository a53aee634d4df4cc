"""The text status's lines on a rollout's lifecycle: its warm-up and the drain of the variant a
rollback or a completion took out of routing (the evaluator keeps both in the rollout state)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def warmup_line(warm: Mapping[str, Any], status: str) -> str | None:
    if status == "warming_up":
        return "warm-up    running: stage 1 waits for it (all traffic on stable)"
    if not warm:
        return None
    answered = ", ".join(f"{v} {n}" for v, n in (warm.get("answered") or {}).items())
    took = f"{float(warm.get('seconds') or 0):.1f} s"
    if warm.get("ok"):
        return f"warm-up    done in {took} (answered: {answered or '-'})"
    return f"warm-up    failed after {took}: {warm.get('error')} (answered: {answered or '-'})"


def drain_line(drain: Mapping[str, Any]) -> str | None:
    if not drain:
        return None
    which = ", ".join(drain.get("variants") or [])
    status = drain.get("status")
    if status == "drained":
        return f"drain      {which} drained after {float(drain['seconds']):.1f} s"
    if status == "timeout":
        left = drain.get("active")
        return (
            f"drain      {which} not drained after {float(drain['seconds']):.1f} s "
            f"({'unknown' if left is None else left} requests open)"
        )
    if status == "draining":
        left = drain.get("active")
        now = "" if left is None else f": {left} requests open"
        return f"drain      {which} draining since the {drain.get('after')}{now}"
    return f"drain      {which}: unknown ({drain.get('error') or 'no Envoy admin address'})"


def lines(rollout: Mapping[str, Any]) -> list[str]:
    """At most one line each for the warm-up and the drain; none for a rollout without them."""
    found = (
        warmup_line(rollout.get("warmup") or {}, str(rollout.get("status"))),
        drain_line(rollout.get("drain") or {}),
    )
    return [line for line in found if line]
