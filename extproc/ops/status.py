"""Per-variant figures for `extproc status`, read from Redis only.

Request totals come from the exact per-variant counters; latency, time to first token, errors,
tokens and answer signals are computed over the most recent events of the stream (``window`` of
them), so the figures describe current behaviour rather than the whole history.

Every event is classified by :mod:`extproc.telemetry.outcome`, the definitions the evaluator's
guardrails use: the error rate counts server errors (5xx, timeout, reset) over assigned requests,
client errors are a figure of their own, forced tester traffic and shadow copies are summarised
apart, and in-flight notices are never requests. The dashboard's figures are these.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from extproc import store
from extproc.config import Price
from extproc.contract import keys
from extproc.evaluator.rollout import load_state, read_audit
from extproc.ops import model
from extproc.ops.figures import flatten, label, ladder, value_text
from extproc.telemetry import outcome
from extproc.telemetry.events import recent_events
from extproc.telemetry.outcome import TokenPrice
from extproc.telemetry.v1.event_pb2 import TelemetryEvent

DEFAULT_WINDOW = 20_000


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _pcts(values: list[float], qs: tuple[int, ...]) -> dict[str, float | None]:
    if not values:
        return {f"p{q}": None for q in qs}
    arr = np.percentile(np.asarray(values), qs)
    return {f"p{q}": round(float(v), 2) for q, v in zip(qs, arr, strict=True)}


def _rate(k: int, n: int) -> float | None:
    return round(k / n, 4) if n else None


def _mean(values: list[float], places: int) -> float | None:
    return round(sum(values) / len(values), places) if values else None


@dataclass
class _Acc:
    """One variant's requests of one kind of traffic, classified as the evaluator classifies
    them (:mod:`extproc.telemetry.outcome`), so a status figure is the guardrail's figure."""

    price: TokenPrice | None = None
    n: int = 0
    errors: int = 0
    client_errors: int = 0
    timeouts: int = 0
    successes: int = 0
    tool_calls: int = 0
    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: list[float] = field(default_factory=list)
    output_tps: list[float] = field(default_factory=list)
    costs: list[float] = field(default_factory=list)
    answered: int = 0
    refusals: int = 0
    answer_chars: int = 0
    inspected: int = 0
    empty: int = 0
    json_checked: int = 0
    json_invalid: int = 0

    def add(self, ev: TelemetryEvent) -> None:
        self.n += 1
        if ev.error in outcome.SERVER_ERRORS:
            self.errors += 1
            self.timeouts += outcome.is_timeout(ev)
        elif ev.error in outcome.CLIENT_ERRORS:
            self.client_errors += 1
        self.prompt_tokens += ev.prompt_tokens
        self.completion_tokens += ev.completion_tokens
        if not outcome.is_success(ev):
            return
        self.successes += 1
        if (c := outcome.cost(ev, self.price)) is not None:
            self.costs.append(c)
        if (cached := outcome.cached_prompt_tokens(ev)) is not None:
            self.cached.append(cached)
        self.tool_calls += outcome.called_tool(ev)
        if ev.HasField("duration_ms"):
            self.latency.append(ev.duration_ms)
        if ev.HasField("first_token_ms"):
            self.ttft.append(ev.first_token_ms)
        if (tps := outcome.output_tokens_per_s(ev)) is not None:
            self.output_tps.append(tps)
        if ev.HasField("refusal"):
            self.answered += 1
            self.refusals += ev.refusal
            self.answer_chars += ev.answer_chars
        if ev.HasField("empty_answer"):
            self.inspected += 1
            self.empty += ev.empty_answer
        if ev.HasField("json_valid"):
            self.json_checked += 1
            self.json_invalid += not ev.json_valid

    def figures(self) -> dict[str, Any]:
        n = self.n
        return {
            "window_requests": n,
            "errors": self.errors,
            "error_rate": _rate(self.errors, n),
            "client_errors": self.client_errors,
            "client_error_rate": _rate(self.client_errors, n),
            "timeout_rate": _rate(self.timeouts, n),
            "latency_ms": _pcts(self.latency, (50, 95, 99)),
            "ttft_ms": _pcts(self.ttft, (50,)),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_prompt_tokens": _mean(self.cached, 2),
            "output_tokens_per_s": _mean(self.output_tps, 2),
            "cost_per_request": _mean(self.costs, 8),
            "refusal_rate": _rate(self.refusals, self.answered),
            "answer_chars_mean": round(self.answer_chars / self.answered, 1)
            if self.answered
            else None,
            "tool_call_rate": _rate(self.tool_calls, self.successes),
            "empty_answer_rate": _rate(self.empty, self.inspected),
            "json_invalid_rate": _rate(self.json_invalid, self.json_checked),
        }


TRAFFIC = ("assigned", "forced", "shadow")
"""Kinds of traffic, counted apart: assigned live requests (what variants are compared on),
forced tester requests, and mirrored shadow copies."""


def traffic(ev: TelemetryEvent) -> str:
    """Which kind of traffic an event is (see :data:`TRAFFIC`)."""
    if ev.shadow:
        return "shadow"
    return "forced" if outcome.is_forced(ev) else "assigned"


def ended_requests(events: list[TelemetryEvent]) -> set[str]:
    """Request ids whose own (final) event is among ``events``."""
    return {ev.request_id for ev in events if not outcome.is_notice(ev)}


def prices_of(definition: Mapping[str, Any]) -> dict[str, Price]:
    """Each priced variant's token price, from an experiment definition read from Redis."""
    return {
        v: Price.model_validate(d["price"])
        for v, d in definition.get("variants", {}).items()
        if d.get("price")
    }


def summarise(
    events: list[TelemetryEvent],
    variants: list[str],
    *,
    kind: str = "assigned",
    prices: Mapping[str, TokenPrice] | None = None,
    ended: set[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per-variant figures over one kind of traffic (:data:`TRAFFIC`); ``variants`` get a row
    even without events. In-flight notices are not requests: they are counted as
    ``open_requests`` while their request's own event is not in ``events`` (or ``ended``, the
    request ids known to have ended, when ``events`` is a slice of a longer stream).

    Assigned figures carry ``forced_requests``, the tester traffic of the same variant, so the
    comparison shows what it leaves out.
    """
    prices = prices or {}
    accs = {v: _Acc(prices.get(v)) for v in variants}
    forced: Counter[str] = Counter()
    if ended is None:
        ended = ended_requests(events)
    open_requests: Counter[str] = Counter()
    for ev in events:
        if not ev.variant:
            continue
        its = traffic(ev)
        if outcome.is_notice(ev):
            if its == kind and ev.request_id not in ended:
                open_requests[ev.variant] += 1
        elif its == kind:
            acc = accs.get(ev.variant)
            if acc is None:
                acc = accs[ev.variant] = _Acc(prices.get(ev.variant))
            acc.add(ev)
        elif its == "forced":
            forced[ev.variant] += 1
    out: dict[str, dict[str, Any]] = {}
    for name, a in accs.items():
        out[name] = a.figures()
        out[name]["open_requests"] = open_requests[name]
        if kind == "assigned":
            out[name]["forced_requests"] = forced[name]
    return out


async def experiment_status(
    r: aioredis.Redis, name: str, window: int = DEFAULT_WINDOW
) -> model.ExperimentStatus:
    definition = await store.get_definition(r, name) or {}
    routing = await store.get_routing(r, name)
    variants = list(definition.get("variants", {}))
    raw_counts = await r.hgetall(keys.counts(name))
    counts = {_text(k): int(v) for k, v in raw_counts.items()}
    events = await recent_events(r, name, window)
    prices = prices_of(definition)
    per_variant = summarise(events, variants, prices=prices)
    seen: dict[str, set[str]] = {"forced": set(), "shadow": set()}
    for ev in events:
        if ev.variant and (kind := traffic(ev)) in seen:
            seen[kind].add(ev.variant)
    if shadow_variant := (definition.get("shadow") or {}).get("variant"):
        seen["shadow"].add(shadow_variant)
    forced, shadow = (
        summarise(events, sorted(seen[k]), kind=k, prices=prices) if seen[k] else {}
        for k in ("forced", "shadow")
    )
    weights = routing.weights if routing else {}
    per_variant = {
        v: {"requests": counts.get(v, 0), "weight": weights.get(v), **figures}
        for v, figures in per_variant.items()
    }
    doc = {
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
        "forced": forced,
        "shadow": shadow,
    }
    return model.ExperimentStatus.model_validate(doc)


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


async def _heartbeats(r: aioredis.Redis, pattern: str) -> list[dict[str, str]]:
    out = []
    async for key in r.scan_iter(match=pattern, count=100):
        raw = await r.hgetall(key)
        doc = {_text(k): _text(v) for k, v in raw.items()}
        doc["instance"] = _text(key).rsplit(":", 1)[-1]
        out.append(doc)
    return sorted(out, key=lambda d: d["instance"])


async def sidecars(r: aioredis.Redis) -> list[model.Sidecar]:
    return [model.Sidecar.model_validate(d) for d in await _heartbeats(r, keys.SIDECAR_PATTERN)]


async def evaluators(r: aioredis.Redis) -> list[model.Evaluator]:
    found = await _heartbeats(r, keys.EVALUATOR_PATTERN)
    return [model.Evaluator.model_validate({**d, "active": d.get("active") == "1"}) for d in found]


async def status_doc(
    r: aioredis.Redis, name: str | None, window: int = DEFAULT_WINDOW
) -> model.StatusDoc | None:
    """Everything `extproc status` and `top` show of one experiment (``name``, else the first
    in Redis): its figures, the rollout state, the last decisions and evaluation, and the
    sidecars, evaluators and telemetry backlog. None when there is no such experiment."""
    names = sorted(_text(n) for n in await r.smembers(keys.EXPERIMENTS))
    name = name or (names[0] if names else None)
    if name is None or name not in names:
        return None
    figures = await experiment_status(r, name, window)
    reps = await sidecars(r)
    state = await load_state(r, name)
    evaluation = await latest_evaluation(r, name)
    rollout = None if state is None else asdict(state)
    definition = await store.get_definition(r, name) or {}
    return model.StatusDoc(
        **dict(figures),
        sidecars=reps,
        telemetry=model.Telemetry(dropped=sum(s.dropped for s in reps)),
        experiments=names,
        rollout=None if rollout is None else model.Rollout.model_validate(rollout),
        audit=[model.AuditRecord.model_validate(a) for a in await read_audit(r, name, 5)],
        evaluation=evaluation,
        ladder=ladder(definition, rollout, evaluation, time.time()),
        evaluators=await evaluators(r),
    )


def _table(groups: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """A figure per row, a column per variant, each cell as the dashboard's table shows it."""
    columns = {name: flatten(figures) for name, figures in groups.items()}
    metrics = list(dict.fromkeys(k for f in columns.values() for k in f))
    rows = [[label(m), *(value_text(m, f.get(m)) for f in columns.values())] for m in metrics]
    head = ["", *groups]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        first, *rest = cells
        return f"{first:<{widths[0]}}" + "".join(
            f"  {c:>{w}}" for c, w in zip(rest, widths[1:], strict=True)
        )

    return [line(head), *(line(r) for r in rows)]


def figure_lines(doc: Mapping[str, Any]) -> list[str]:
    """`extproc status`'s figures for a person: the same figures as ``--json`` and the
    dashboard, with the same texts (:mod:`extproc.ops.figures`); stable's column first."""
    stable = doc.get("stable")
    variants = doc["variants"]
    order = sorted(variants, key=lambda v: v != stable)
    lines = ["", *_table({v: variants[v] for v in order})]
    for kind, what in (("forced", "tester traffic (forced)"), ("shadow", "shadow copies")):
        if doc.get(kind):
            lines += ["", f"{what}, not compared:", *_table(doc[kind])]
    lines.append(
        f"\n(figures over the newest {doc['window_events']} events: assigned requests only; "
        "the error rate counts server errors, client errors are apart)"
    )
    tele = doc.get("telemetry", {})
    lines.append(
        f"sidecars alive: {len(doc.get('sidecars', []))}, "
        f"telemetry events dropped: {tele.get('dropped', 0)}"
    )
    return lines
