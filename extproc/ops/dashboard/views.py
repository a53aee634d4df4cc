"""The documents the dashboard's JSON API serves, read from Redis through the library functions
the CLI uses, so a figure on the page is the figure `extproc status --json` prints.

The comparison table pairs each candidate's status figures with stable's (difference and
relative change: the effect sizes) and with the evaluator's guardrail checks of its newest look
(``keys.evaluation``, rewritten every tick), falling back to the newest audit record that has
checks when no evaluator has looked yet; either way the table says when and at which stage. Each
check carries its verdict (:func:`extproc.ops.figures.verdict`), as `extproc top` shows it.
Each cell carries the text the page shows as given, made by :mod:`extproc.ops.figures` as
`extproc status` makes its own: the page never rounds a figure itself.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from typing import Any

import redis.asyncio as aioredis

from extproc import store
from extproc.config import ConfigError, Telemetry, parse_experiment
from extproc.contract import keys, signals
from extproc.evaluator import decision, machine
from extproc.evaluator.guardrails import SRM_THRESHOLD
from extproc.evaluator.rollout import COMMANDS, RolloutState, load_state, read_audit
from extproc.ops import figures, status
from extproc.ops.dashboard.series import MIN_SPAN_S, bucket_step, series, width_for
from extproc.ops.figures import Figure, flatten
from extproc.telemetry import rollup
from extproc.telemetry.events import recent_events

AUDIT_COUNT = 100
SIGNAL_WINDOW = 5000  # newest quality signals charted (judge calls are budgeted, feedback sparse)
FEEDBACK_EVENTS = 5000  # newest events feedback on the charts is attributed through
# Totals rather than rates: shown for each variant, but a difference between them is no effect.
COUNTERS = frozenset(
    {
        "requests",
        "window_requests",
        "errors",
        "client_errors",
        "forced_requests",
        "open_requests",
        "prompt_tokens",
        "completion_tokens",
        "weight",
        "stage.judge_verdicts",
        "stage.watchdog_probes",
    }
)
TIMELINE_FIELDS = ("id", "time", "action", "actor", "reasons", "stage", "status", "weights")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def overview(r: aioredis.Redis) -> dict[str, Any]:
    """Every experiment's rollout status, stage and weights, and the live processes."""
    experiments = []
    for name in sorted(_text(n) for n in await r.smembers(keys.EXPERIMENTS)):
        routing = await store.get_routing(r, name)
        state = await load_state(r, name)
        experiments.append(
            {
                "name": name,
                "status": state.status if state else None,
                "stage": state.stage if state else None,
                "weights": routing.weights if routing else None,
                "routing_version": routing.version if routing else None,
            }
        )
    return {
        "time": time.time(),
        "experiments": experiments,
        "sidecars": [s.model_dump(mode="json") for s in await status.sidecars(r)],
        "evaluators": [e.model_dump(mode="json") for e in await status.evaluators(r)],
    }


def _effect(metric: str, stable: Figure, value: Figure) -> dict[str, Any]:
    """A candidate's figure, its difference from stable and the relative change, each with
    the text the page shows (made here: one formatting rule for page and CLI)."""
    diff: Figure = None
    rel: Figure = None
    if metric not in COUNTERS and stable is not None and value is not None:
        # Unrounded: the text rule rounds for display, to significant digits where the figure
        # needs them (a cost per request differs in its fifth decimal; four places made it 0).
        diff = value - stable
        rel = (value - stable) / stable if stable else None
    return {
        "value": value,
        "diff": diff,
        "rel": rel,
        "text": {
            "value": figures.value_text(metric, value),
            "diff": figures.diff_text(metric, diff),
            "rel": figures.rel_text(rel),
        },
    }


def _quality(stage: dict[str, Any]) -> dict[str, Figure]:
    """The evaluator's quality-signal figures of the stage, for the signals it has seen."""
    out: dict[str, Figure] = {}
    if stage.get("judge_verdicts"):
        out["stage.judge_verdicts"] = stage["judge_verdicts"]
        out["stage.judge_win_rate"] = stage.get("judge_win_rate")
    if stage.get("feedback"):
        out["stage.feedback_negative_rate"] = stage.get("feedback_negative_rate")
    if stage.get("watchdog_probes"):
        out["stage.watchdog_probes"] = stage["watchdog_probes"]
        out["stage.watchdog_fail_rate"] = stage.get("watchdog_fail_rate")
    return out


def comparison(
    doc: dict[str, Any], audit: list[dict[str, Any]], latest: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Per metric: stable's figure and each candidate's, with its difference from stable; and
    the guardrail checks of the evaluator's newest look (else the newest audit record)."""
    stable = doc.get("stable")
    per = {v: flatten(f) for v, f in doc["variants"].items()}
    for v, f in ((latest or {}).get("variants") or {}).items():
        if v in per:
            per[v].update(_quality(f))
    candidates = [v for v in per if v != stable]
    base = per.get(stable or "", {})
    metrics = list(dict.fromkeys(k for f in per.values() for k in f))
    rows: list[dict[str, Any]] = [
        {
            "metric": m,
            "label": figures.label(m),
            "stable": base.get(m),
            "stable_text": figures.value_text(m, base.get(m)),
            "candidates": {c: _effect(m, base.get(m), per[c].get(m)) for c in candidates},
        }
        for m in metrics
    ]
    judged = (
        latest
        if latest and latest.get("checks")
        else next((rec for rec in reversed(audit) if rec.get("checks")), None)
    )
    checks = None
    if judged is not None:
        checks = {k: judged.get(k) for k in ("time", "stage", "action")}
        items = [c | {"verdict": figures.verdict(c)} for c in judged["checks"]]
        checks["items"] = items
        # Each figure a guardrail judges carries that guardrail's state per candidate, so the
        # table's change is coloured as the verdict is (a +870% p99 never reads as neutral).
        by_metric = {row["metric"]: row for row in rows}
        for c in items:
            row = by_metric.get(CHART_OF.get(str(c.get("metric")), str(c.get("metric"))))
            if row is not None:
                row.setdefault("states", {})[c.get("variant")] = c["verdict"]["state"]
    return {"stable": stable, "candidates": candidates, "rows": rows, "checks": checks}


def valid_actions(definition: dict[str, Any], state: RolloutState | None) -> list[str]:
    """The operator intents the evaluator would apply now, asked of its own transition function
    (``machine.command``) on the current state, so a button is enabled exactly when a click
    would do something: after a rollback none is. Without a rollout state (no evaluator yet) or
    with a definition this release cannot read, every intent is offered: the evaluator applies
    or ignores it, and says which in the audit log."""
    if state is None:
        return list(COMMANDS)
    try:
        spec = parse_experiment(definition).spec
    except ConfigError:
        return list(COMMANDS)
    out = []
    for intent in COMMANDS:
        after = machine.command(spec, state, intent, "dashboard", "", time.time()).state
        if (after.status, after.stage) != (state.status, state.stage):
            out.append(intent)
    return out


def _price_text(price: Any) -> str:
    if not isinstance(price, dict):
        return figures.MISSING
    cost = [
        figures.value_text("price", price.get(k)) for k in ("input_per_mtok", "output_per_mtok")
    ]
    return f"{cost[0]} in, {cost[1]} out per million tokens"


def traffic(doc: dict[str, Any], definition: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per variant: its model and price as the experiment file names them, and its requests in
    the window apart by kind: assigned (what the guardrails compare) and forced (testers', which
    no guardrail counts), so a canary served only by testers reads as 0 assigned."""
    out = {}
    for v, spec in (definition.get("variants") or {}).items():
        figs = doc["variants"].get(v) or {}
        assigned = figs.get("window_requests") or 0
        forced = (doc["forced"].get(v) or {}).get("window_requests") or 0
        out[v] = {
            "model": spec.get("model"),
            "assigned": assigned,
            "forced": forced,
            "text": {
                "price": _price_text(spec.get("price")),
                "assigned": figures.value_text("window_requests", assigned),
                "forced": figures.value_text("forced_requests", forced),
            },
        }
    return out


# The status figure (and chart) each guardrail metric judges, where the names differ; a metric
# with no status figure of its own (response size, tokens per answer) gets no limit line.
CHART_OF = {
    "latency_p99": "latency_ms.p99",
    "latency_p95": "latency_ms.p95",
    "latency_p50": "latency_ms.p50",
    "ttft_p50": "ttft_ms.p50",
    "answer_chars": "answer_chars_mean",
}


def limits(definition: dict[str, Any], doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per chart, the lines its guardrails draw: the margin over stable's figure in the window
    (the level the candidate must not provably exceed: a relative margin has no level of its
    own, so it moves with stable) and the ceiling (``max_absolute``), in the figure's unit."""
    try:
        spec = parse_experiment(definition).spec
    except ConfigError:
        return {}
    base = flatten(doc["variants"].get(spec.stable) or {})
    out: dict[str, list[dict[str, Any]]] = {}
    for g in spec.guardrails:
        key = CHART_OF.get(g.metric, g.metric)
        if key not in base:
            continue
        name = g.info.label
        stable = base[key]
        for side in g.harm_sides:
            if stable is None:
                continue
            margin = g.margin_of(side)
            value = stable * (1 + margin if side == "increase" else 1 - margin)
            change = figures.rel_text(margin if side == "increase" else -margin)
            out.setdefault(key, []).append(
                {
                    "kind": "margin",
                    "value": value,
                    "text": f"{name} limit {figures.value_text(key, value)} "
                    f"(stable {change}, {g.action})",
                }
            )
        if g.max_absolute is not None:
            out.setdefault(key, []).append(
                {
                    "kind": "ceiling",
                    "value": g.max_absolute,
                    "text": f"{name} ceiling {figures.value_text(key, g.max_absolute)} "
                    f"({g.action})",
                }
            )
    return out


def srm(evaluation: dict[str, Any] | None) -> dict[str, Any] | None:
    """The evaluator's sample-ratio check of its newest look (p of the split the weights ask
    for, on conversations); None before it has one (fewer than 50 conversations, one live
    variant, a mirrored strategy). ``mismatch`` at its own threshold, where it holds."""
    p = (evaluation or {}).get("srm_p")
    if isinstance(p, bool) or not isinstance(p, int | float):
        return None
    return {
        "p": p,
        "threshold": SRM_THRESHOLD,
        "mismatch": p < SRM_THRESHOLD,
        "text": f"p = {figures.significant(p, 2)} (mismatch below {SRM_THRESHOLD:g})",
    }


async def experiment(r: aioredis.Redis, name: str) -> dict[str, Any] | None:
    """`extproc status` figures of one experiment with its rollout, decisions and comparison;
    None when Redis has no such experiment."""
    definition = await store.get_definition(r, name)
    if definition is None:
        return None
    doc = (await status.experiment_status(r, name)).model_dump(mode="json")
    state = await load_state(r, name)
    audit = await read_audit(r, name, AUDIT_COUNT)
    doc["rollout"] = None if state is None else asdict(state)
    doc["actions"] = valid_actions(definition, state)
    doc["traffic"] = traffic(doc, definition)
    doc["timeline"] = [{k: rec.get(k) for k in TIMELINE_FIELDS} for rec in audit]
    doc["evaluation"] = await status.latest_evaluation(r, name)
    found = (doc["evaluation"] or {}).get("decisions") or []
    doc["decision"] = [line for d in found for line in decision.render(d)]
    doc["comparison"] = comparison(doc, audit, doc["evaluation"])
    doc["srm"] = srm(doc["evaluation"])
    doc["limits"] = limits(definition, doc)
    doc["ladder"] = figures.ladder(definition, doc["rollout"], doc["evaluation"], time.time())
    doc["phases"] = [
        {"name": p.get("name"), "strategy": p.get("strategy")}
        for p in definition.get("phases") or []
    ]
    return doc


async def _began(r: aioredis.Redis, name: str, state: RolloutState | None) -> float | None:
    """When the rollout on show began: this attempt's start, else the first audit record's."""
    if state is not None and state.attempt_started:
        return state.attempt_started
    first = await r.xrange(keys.audit(name), count=1)
    if not first or first[0][0] is None:
        return None
    return int(_text(first[0][0]).split("-")[0]) / 1000


async def _signals(r: aioredis.Redis, name: str, since_s: int) -> list[signals.Signal]:
    """The newest quality signals of the span (at most ``SIGNAL_WINDOW``)."""
    found: list[signals.Signal] = []
    entries = await r.xrevrange(keys.signals(name), min=str(since_s * 1000), count=SIGNAL_WINDOW)
    for _id, fields in entries or []:
        with contextlib.suppress(ValueError):  # the evaluator logs malformed entries
            found.append(signals.parse((fields or {}).get(signals.FIELD, b"")))
    return found


async def _attribution(
    r: aioredis.Redis, name: str, quality: list[signals.Signal]
) -> tuple[dict[str, str], dict[str, str]]:
    """Which variant answered the requests and conversations feedback names, from the newest
    ``FEEDBACK_EVENTS`` events (read only when the span has feedback, which is what needs it)."""
    if not any(isinstance(sig, signals.FeedbackSignal) for sig in quality):
        return {}, {}
    events = [ev for ev in await recent_events(r, name, FEEDBACK_EVENTS) if not ev.shadow]
    return (
        {ev.request_id: ev.variant for ev in events if ev.request_id},
        {ev.key_hash: ev.variant for ev in events if ev.key_hash},
    )


async def experiment_series(
    r: aioredis.Redis,
    name: str,
    span_s: float | None = None,
    step_s: float | None = None,
    now_s: float | None = None,
) -> dict[str, Any] | None:
    """Chart data over the last ``span_s`` seconds, by default the whole rollout (this attempt,
    at least a minute); None for an unknown experiment."""
    definition = await store.get_definition(r, name)
    if definition is None:
        return None
    now = time.time() if now_s is None else now_s
    if span_s is None:
        began = await _began(r, name, await load_state(r, name))
        span_s = now - began if began is not None else MIN_SPAN_S
    kept = Telemetry.model_validate(definition.get("telemetry") or {}).rollup_retention_days
    kept_s = 86_400 * kept
    span_s = min(max(span_s, MIN_SPAN_S), kept_s)
    step = bucket_step(span_s, step_s)
    if now - span_s < rollup.fine_from(now):  # fine buckets that old are gone: coarse steps
        step = rollup.COARSE_S * math.ceil(step / rollup.COARSE_S)
    until = int(now) // step * step + step
    since = until - step * math.ceil(span_s / step)
    width = width_for(step)
    quality = await _signals(r, name, since)
    doc = series(
        await rollup.read(r, name, width, since, until, step),
        list(definition.get("variants", {})),
        since_s=since,
        until_s=until,
        step_s=step,
        shadow_variant=(definition.get("shadow") or {}).get("variant"),
        signals=quality,
        attribution=await _attribution(r, name, quality),
        prices=status.prices_of(definition),
    )
    names = {k for columns in (*doc["variants"].values(), *doc["shadow"].values()) for k in columns}
    keys_ = sorted(names | {"tokens_per_request"})
    return {
        "experiment": name,
        "window_events": sum(
            n or 0 for cols in doc["variants"].values() for n in cols.get("window_requests", [])
        ),
        "labels": {k: figures.label(k) for k in keys_},
        "units": {k: figures.unit(k) for k in keys_},
        **doc,
    }


async def pairs(r: aioredis.Redis, name: str, count: int) -> list[dict[str, Any]] | None:
    """Captured primary and shadow answers, newest first; None for an unknown experiment."""
    if await store.get_definition(r, name) is None:
        return None
    return await status.recent_pairs(r, name, count)
