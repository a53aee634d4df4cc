"""Per-variant figures for `extproc status`, read from Redis only.

Request totals come from the exact per-variant counters; latency, time to first token, errors,
tokens and answer signals are those of the requests that started in the last ``window_s``
seconds, so the figures describe current behaviour rather than the whole history. They are read
from the rollups the telemetry writer keeps (:mod:`extproc.telemetry.rollup`): a refresh reads a
few dozen small hashes whether the service takes one request a second or thousands, counts and
rates are exact, and latency quantiles are within the sketch's 2%.

Every event is classified by :mod:`extproc.telemetry.outcome`, the definitions the evaluator's
guardrails use: the error rate counts server errors (5xx, timeout, reset) over assigned requests,
client errors are a figure of their own, forced tester traffic and shadow copies are summarised
apart, and in-flight notices are never requests (a variant's ``open_requests`` counts its
requests noticed open and not yet ended). The dashboard's figures are these.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any, cast

import redis.asyncio as aioredis

from extproc import store
from extproc.config import Price
from extproc.contract import keys
from extproc.evaluator.rollout import load_state, read_audit
from extproc.ops import model
from extproc.ops.figures import duration_text, flatten, label, ladder, value_text
from extproc.telemetry import rollup
from extproc.telemetry.outcome import TRAFFIC

DEFAULT_WINDOW_S = 300
"""The span `status`, `top` and the dashboard's table summarise by default: the last 5 minutes."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def prices_of(definition: Mapping[str, Any]) -> dict[str, Price]:
    """Each priced variant's token price, from an experiment definition read from Redis."""
    return {
        v: Price.model_validate(d["price"])
        for v, d in definition.get("variants", {}).items()
        if d.get("price")
    }


def figures_of(
    span: rollup.Bucket,
    kind: str,
    variants: list[str],
    prices: Mapping[str, Price],
    open_requests: Mapping[tuple[str, str], int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per-variant figures over one kind of traffic (:data:`TRAFFIC`) of a span; ``variants``
    get a row even without requests. Assigned figures carry ``forced_requests``, the tester
    traffic of the same variant, so the comparison shows what it leaves out."""
    open_requests = open_requests or {}
    out: dict[str, dict[str, Any]] = {}
    for v in variants:
        t = span.tallies.get((kind, v)) or rollup.Tally()
        out[v] = t.figures(prices.get(v))
        out[v]["open_requests"] = open_requests.get((kind, v), 0)
        if kind == "assigned":
            forced = span.tallies.get(("forced", v))
            out[v]["forced_requests"] = forced.counts["requests"] if forced else 0
    return out


def seen(span: rollup.Bucket, kind: str) -> list[str]:
    """The variants with requests of ``kind`` in the span."""
    return sorted({v for k, v in span.tallies if k == kind})


async def experiment_status(
    r: aioredis.Redis,
    name: str,
    window_s: float = DEFAULT_WINDOW_S,
    now_s: float | None = None,
) -> model.ExperimentStatus:
    """One experiment's figures over the requests that started in the last ``window_s``
    seconds before ``now_s``, rounded up to whole 10 s buckets."""
    now = time.time() if now_s is None else now_s
    definition = await store.get_definition(r, name) or {}
    routing = await store.get_routing(r, name)
    raw_counts = await r.hgetall(keys.counts(name))
    counts = {_text(k): int(v) for k, v in raw_counts.items()}
    # Whole 10 s buckets, the current one last: the dashboard's charts step the same way.
    until = (int(now) // rollup.FINE_S + 1) * rollup.FINE_S
    since = until - rollup.FINE_S * max(math.ceil(window_s / rollup.FINE_S), 1)
    span = await rollup.read_span(r, name, since, until, now)
    since = rollup.span_starts(since, until, rollup.fine_from(now))[0][1]  # as read
    prices = prices_of(definition)
    rows = {
        "assigned": list(dict.fromkeys([*definition.get("variants", {}), *seen(span, "assigned")])),
        "forced": seen(span, "forced"),
        "shadow": seen(span, "shadow"),
    }
    if shadow_variant := (definition.get("shadow") or {}).get("variant"):
        rows["shadow"] = sorted({*rows["shadow"], shadow_variant})
    asked = [(kind, v) for kind in TRAFFIC for v in rows[kind]]
    opened = await rollup.open_counts(r, name, asked, int(now * 1000))
    per_kind = {kind: figures_of(span, kind, rows[kind], prices, opened) for kind in TRAFFIC}
    weights = routing.weights if routing else {}
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
        "window_s": until - since,
        "window_events": span.events,
        "window_refused": span.refused,
        "variants": {
            v: {"requests": counts.get(v, 0), "weight": weights.get(v), **figures}
            for v, figures in per_kind["assigned"].items()
        },
        "forced": per_kind["forced"],
        "shadow": per_kind["shadow"],
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


async def _heartbeats(
    r: aioredis.Redis, registry: str, key_of: Callable[[str], str]
) -> list[dict[str, str]]:
    """The health hashes of the processes in ``registry`` that are still beating."""
    names = sorted(_text(cast(bytes, m)) for m in await r.zrange(registry, 0, -1))
    async with r.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(key_of(name))
        found = await pipe.execute()
    return [
        {**{_text(k): _text(v) for k, v in raw.items()}, "instance": name}
        for name, raw in zip(names, found, strict=True)
        if raw
    ]


async def sidecars(r: aioredis.Redis) -> list[model.Sidecar]:
    found = await _heartbeats(r, keys.SIDECARS, keys.sidecar)
    return [model.Sidecar.model_validate(d) for d in found]


async def evaluators(r: aioredis.Redis) -> list[model.Evaluator]:
    found = await _heartbeats(r, keys.EVALUATORS, keys.evaluator)
    return [model.Evaluator.model_validate({**d, "active": d.get("active") == "1"}) for d in found]


async def status_doc(
    r: aioredis.Redis, name: str | None, window_s: float = DEFAULT_WINDOW_S
) -> model.StatusDoc | None:
    """Everything `extproc status` and `top` show of one experiment (``name``, else the first
    in Redis): its figures, the rollout state, the last decisions and evaluation, and the
    sidecars, evaluators and telemetry backlog. None when there is no such experiment."""
    names = sorted(_text(n) for n in await r.smembers(keys.EXPERIMENTS))
    name = name or (names[0] if names else None)
    # An ended experiment is shown too when asked for by name: its data is kept for reading.
    if name is None or (name not in names and await r.zscore(keys.ENDED, name) is None):
        return None
    figures = await experiment_status(r, name, window_s)
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
        f"\n(figures over the requests of the last {duration_text(doc['window_s'])} "
        f"({doc['window_events']} requests): assigned requests only; the error rate counts "
        "server errors, client errors are apart; latency quantiles within 2%)"
    )
    tele = doc.get("telemetry", {})
    lines.append(
        f"sidecars alive: {len(doc.get('sidecars', []))}, "
        f"telemetry events dropped: {tele.get('dropped', 0)}"
    )
    return lines
