"""Per-variant figures for `extproc status`, read from Redis only.

Request totals come from the exact per-variant counters; latency, time to first token, errors
and tokens are computed over the most recent events of the stream (``window`` of them), so the
figures describe current behaviour rather than the whole history.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from google.protobuf.message import DecodeError

from extproc import keys, store
from extproc.config import Price
from extproc.telemetry.v1.event_pb2 import ErrorClass, TelemetryEvent

DEFAULT_WINDOW = 20_000


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def decode_event(fields: Mapping[Any, Any] | None) -> TelemetryEvent | None:
    """A stream entry's event, or None for an entry that is not one (never raises)."""
    ev = TelemetryEvent()
    raw = (fields or {}).get(keys.EVENT_FIELD)
    if not isinstance(raw, bytes):
        return None
    try:
        ev.ParseFromString(raw)
    except DecodeError:
        return None
    return ev


def _cost(a: _Acc, price: Price | None) -> float | None:
    if price is None or not a.n:
        return None
    return round(price.cost(a.prompt_tokens, a.completion_tokens) / a.n, 8)


async def recent_events(r: aioredis.Redis, experiment: str, count: int) -> list[TelemetryEvent]:
    """The newest ``count`` events, oldest first."""
    entries = await r.xrevrange(keys.events(experiment), count=count) or []
    events = (decode_event(fields) for _id, fields in reversed(entries))
    return [ev for ev in events if ev is not None]


def _pcts(values: list[float], qs: tuple[int, ...]) -> dict[str, float | None]:
    if not values:
        return {f"p{q}": None for q in qs}
    arr = np.percentile(np.asarray(values), qs)
    return {f"p{q}": round(float(v), 2) for q, v in zip(qs, arr, strict=True)}


@dataclass
class _Acc:
    n: int = 0
    errors: int = 0
    latency: list[float] | None = None
    ttft: list[float] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    forced: int = 0
    timeouts: int = 0
    output_tps: list[float] | None = None
    answered: int = 0
    refusals: int = 0
    answer_chars: int = 0

    def add(self, ev: TelemetryEvent) -> None:
        self.n += 1
        if self.latency is None or self.ttft is None:
            self.latency, self.ttft = [], []
        if self.output_tps is None:
            self.output_tps = []
        if ev.error != ErrorClass.ERROR_CLASS_NONE:
            self.errors += 1
        if ev.error == ErrorClass.ERROR_CLASS_TIMEOUT:
            self.timeouts += 1
        generation_ms = ev.duration_ms - ev.first_token_ms
        if ev.streamed and ev.completion_tokens > 1 and generation_ms > 0:
            self.output_tps.append((ev.completion_tokens - 1) / generation_ms * 1000)
        if ev.HasField("duration_ms") and ev.error == ErrorClass.ERROR_CLASS_NONE:
            self.latency.append(ev.duration_ms)
        if ev.HasField("first_token_ms"):
            self.ttft.append(ev.first_token_ms)
        if ev.HasField("refusal"):
            self.answered += 1
            self.refusals += ev.refusal
            self.answer_chars += ev.answer_chars
        self.prompt_tokens += ev.prompt_tokens
        self.completion_tokens += ev.completion_tokens


def summarise(
    events: list[TelemetryEvent],
    variants: list[str],
    *,
    shadow: bool = False,
    prices: dict[str, Price] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per-variant figures over live events, or over mirrored (shadow) copies."""
    accs = {v: _Acc() for v in variants}
    for ev in events:
        if ev.variant and ev.shadow == shadow:
            accs.setdefault(ev.variant, _Acc()).add(ev)
    out: dict[str, dict[str, Any]] = {}
    for name, a in accs.items():
        out[name] = {
            "window_requests": a.n,
            "errors": a.errors,
            "error_rate": round(a.errors / a.n, 4) if a.n else None,
            "latency_ms": _pcts(a.latency or [], (50, 95, 99)),
            "ttft_ms": _pcts(a.ttft or [], (50,)),
            "prompt_tokens": a.prompt_tokens,
            "completion_tokens": a.completion_tokens,
            "timeout_rate": round(a.timeouts / a.n, 4) if a.n else None,
            "output_tokens_per_s": _pcts(a.output_tps or [], (50,))["p50"],
            "cost_per_request": _cost(a, (prices or {}).get(name)),
            "refusal_rate": round(a.refusals / a.answered, 4) if a.answered else None,
            "answer_chars_mean": round(a.answer_chars / a.answered, 1) if a.answered else None,
        }
    return out


async def experiment_status(
    r: aioredis.Redis, name: str, window: int = DEFAULT_WINDOW
) -> dict[str, Any]:
    definition = await store.get_definition(r, name) or {}
    routing = await store.get_routing(r, name)
    variants = list(definition.get("variants", {}))
    raw_counts = await r.hgetall(keys.counts(name))
    counts = {_text(k): int(v) for k, v in raw_counts.items()}
    events = await recent_events(r, name, window)
    prices = {
        v: Price.model_validate(d["price"])
        for v, d in definition.get("variants", {}).items()
        if d.get("price")
    }
    per_variant = summarise(events, variants, prices=prices)
    shadow_variant = (definition.get("shadow") or {}).get("variant")
    shadow = summarise(events, [shadow_variant], shadow=True) if shadow_variant else {}
    weights = routing.weights if routing else {}
    for v, figures in per_variant.items():
        figures["requests"] = counts.get(v, 0)
        figures["weight"] = weights.get(v)
    return {
        "experiment": name,
        "stable": definition.get("stable"),
        "strategy": definition.get("strategy"),
        "routing": None
        if routing is None
        else {
            "version": routing.version,
            "weights": routing.weights,
            "reason": routing.reason,
            "actor": routing.actor,
            "updated_at": routing.updated_at,
        },
        "window_events": len(events),
        "window_refused": sum(1 for ev in events if not ev.variant),
        "variants": per_variant,
        "shadow": shadow,
    }


async def latest_evaluation(r: aioredis.Redis, name: str) -> dict[str, Any] | None:
    """The evaluator's newest look: stage figures (quality signals included) and checks."""
    raw = await r.get(keys.evaluation(name))
    doc: dict[str, Any] | None = None if raw is None else json.loads(raw)
    return doc


async def recent_pairs(r: aioredis.Redis, name: str, count: int = 20) -> list[dict[str, Any]]:
    """Captured primary/shadow texts, newest first (pairs whose TTL ran out are skipped)."""
    ids = [_text(rid) for rid in await r.zrevrange(keys.pairs(name), 0, count - 1)]  # type: ignore[arg-type]
    out = []
    for rid in ids:
        raw = await r.hgetall(keys.pair(name, rid))
        if raw:
            doc: dict[str, Any] = {"request_id": rid}
            doc.update({_text(k): json.loads(v) for k, v in raw.items()})
            out.append(doc)
    return out


async def sidecars(r: aioredis.Redis) -> list[dict[str, Any]]:
    out = []
    async for key in r.scan_iter(match=keys.SIDECAR_PATTERN, count=100):
        raw = await r.hgetall(key)
        doc: dict[str, Any] = {_text(k): _text(v) for k, v in raw.items()}
        doc["instance"] = _text(key).rsplit(":", 1)[-1]
        for f in ("submitted", "written", "dropped", "buffered", "routing_version", "pid"):
            if f in doc:
                doc[f] = int(doc[f])
        out.append(doc)
    return sorted(out, key=lambda d: str(d["instance"]))


async def evaluators(r: aioredis.Redis) -> list[dict[str, Any]]:
    out = []
    async for key in r.scan_iter(match=keys.EVALUATOR_PATTERN, count=100):
        raw = await r.hgetall(key)
        doc: dict[str, Any] = {_text(k): _text(v) for k, v in raw.items()}
        doc["instance"] = _text(key).rsplit(":", 1)[-1]
        doc["active"] = doc.get("active") == "1"
        out.append(doc)
    return sorted(out, key=lambda d: str(d["instance"]))


async def full_status(r: aioredis.Redis, window: int = DEFAULT_WINDOW) -> dict[str, Any]:
    names = sorted(_text(n) for n in await r.smembers(keys.EXPERIMENTS))
    reps = await sidecars(r)
    return {
        "time": time.time(),
        "experiments": {n: await experiment_status(r, n, window) for n in names},
        "sidecars": reps,
        "telemetry": {"dropped": sum(int(s.get("dropped", 0)) for s in reps)},
    }
