"""How a figure reads, for every surface that shows one: `extproc status`, `extproc top` and the
dashboard (whose API sends each table cell's text made here, which the page shows as given).

Why one module: the page used to format with JavaScript's ``toFixed`` and the CLI with Python's
``f"{x:.1f}"``, and the two round the same double differently (10.25 is exactly representable:
``toFixed(1)`` gives "10.3", Python's round-half-even "10.2"); the same figure then read two
ways. Here every number is rounded once, by one rule: half away from zero on the shortest
decimal form of the double (what ``repr`` prints, and what a person reads in the JSON), so
2.675 reads "2.68" although the double is a hair below it. The rule is the one taught at school
and the one a reader checks the JSON against.

The labels, with their units, live here too, so a figure is named the same everywhere; a
guardrail metric's name and unit come from the metric registry
(:data:`extproc.contract.guardrail_metrics.METRICS`), so a guardrail and the figure it judges are
named alike. So does a guardrail's verdict (:func:`verdict`): what `extproc top` and the
dashboard show of the evaluator's checks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Context, Decimal
from typing import Any

from extproc.contract.guardrail_metrics import METRICS

Figure = float | int | None

MISSING = "\u2013"  # an en dash
"""A figure that is unknown (no sample yet), never zero."""

_CONTEXT = Context(prec=80, rounding=ROUND_HALF_UP)
_MS = re.compile(r"_ms(\.|$)")

LABELS: dict[str, str] = {
    "requests": "requests (all time, forced included)",
    "weight": "weight (%)",
    "window_requests": "requests (in the window)",
    "errors": "server errors (5xx, timeout, reset)",
    "client_errors": "client errors (4xx, disconnect)",
    "client_error_rate": "client error rate (4xx, disconnect)",
    "forced_requests": "tester requests (forced, not compared)",
    "open_requests": "requests still open (in-flight notices)",
    "latency_ms.p50": "latency p50 (ms)",
    "latency_ms.p95": "latency p95 (ms)",
    "latency_ms.p99": "latency p99 (ms)",
    "ttft_ms.p50": "time to first token p50 (ms)",
    "prompt_tokens": "prompt tokens",
    "completion_tokens": "completion tokens",
    "tokens_per_request": "completion tokens per request",
    "answer_chars_mean": "answer length (chars)",
    "feedback_negative": "negative feedback posts",
    "stage.judge_verdicts": "judge verdicts (stage)",
    "stage.watchdog_probes": "watchdog probes (stage)",
}


# What a status figure of a registry metric counts, beyond the registry's name for it.
_COUNTS = {
    "error_rate": "5xx, timeout, reset",
    "output_tokens_per_s": "mean",
    "cached_prompt_tokens": "per request",
}


def metric_label(name: str) -> str:
    """A registry metric's label with its unit (left out when the label names it already, and
    for fractions, which every surface shows as percentages)."""
    info = METRICS[name]
    unit = "" if info.unit == "fraction" or info.unit in info.label else info.unit
    notes = [n for n in (_COUNTS.get(name), unit) if n]
    return f"{info.label} ({', '.join(notes)})" if notes else info.label


def label(key: str) -> str:
    """A figure's name with its unit: a guardrail metric's from the registry (a stage figure of
    one says so), unless the status figure of that name is another quantity (``completion_tokens``
    is a total there, a mean per answer in the registry); an unknown key reads as its words."""
    if key in LABELS:
        return LABELS[key]
    if key in METRICS:
        return metric_label(key)
    stage, _, name = key.partition(".")
    if stage == "stage" and name in METRICS:
        return f"{METRICS[name].label} (stage)"
    return key.replace("_", " ").replace(".", " ")


# Units of figures that are neither rates, milliseconds nor registry metrics.
_UNITS = {
    "window_requests": "requests",
    "tokens_per_request": "tokens",
    "answer_chars_mean": "characters",
    "feedback_negative": "posts",
}


def unit(key: str) -> str:
    """A figure's unit as a chart's axis is titled: rates in percent, as every surface shows
    them; a registry metric's own unit; "" for a count of nothing in particular."""
    if is_rate(key):
        return "%"
    if _MS.search(key):
        return "ms"
    info = METRICS.get(key.removeprefix("stage."))
    return _UNITS.get(key) or (info.unit if info else "")


def _decimal(x: float) -> Decimal:
    return Decimal(repr(float(x)))


def _text(q: Decimal) -> str:
    text = f"{q:f}"
    return text.lstrip("-") if q.is_zero() else text  # never "-0.0"


def fixed(x: float, places: int) -> str:
    """``x`` with ``places`` decimals, rounded half away from zero on its shortest decimal form:
    10.25 -> "10.3", 2.675 -> "2.68", -10.25 -> "-10.3", 1e-5 -> "0.0"."""
    if not math.isfinite(x):
        return repr(float(x))
    step = Decimal(1).scaleb(-places)
    return _text(_decimal(x).quantize(step, rounding=ROUND_HALF_UP, context=_CONTEXT))


def significant(x: float, digits: int) -> str:
    """``x`` with ``digits`` significant digits, by the same rule: 0.012345 -> "0.0123",
    9.996 -> "10.0" (three digits after rounding too)."""
    if not math.isfinite(x):
        return repr(float(x))
    d = _decimal(x)
    if d.is_zero():
        return fixed(0.0, digits - 1)
    q = d.quantize(Decimal(1).scaleb(d.adjusted() - digits + 1), ROUND_HALF_UP, _CONTEXT)
    if q.adjusted() > d.adjusted():  # rounded up to the next power of ten: one digit fewer
        q = q.quantize(Decimal(1).scaleb(q.adjusted() - digits + 1), ROUND_HALF_UP, _CONTEXT)
    return _text(q)


def is_rate(key: str) -> bool:
    return key.endswith("rate")


def _bare(key: str, v: float) -> str:
    if is_rate(key):
        return f"{fixed(100 * v, 2)}%"
    if _MS.search(key):
        return f"{fixed(v, 1)} ms"
    if float(v).is_integer():  # by value, not type: JSON and JavaScript keep no such type
        return f"{int(v):,}"
    return fixed(v, 1) if abs(v) >= 100 else significant(v, 3)


def value_text(key: str, v: float | None) -> str:
    """A figure as every surface shows it: rates in percent with two decimals, milliseconds
    with one, whole numbers with thousands separators, others to three significant digits (one
    decimal from 100 up)."""
    return MISSING if v is None else _bare(key, v)


def diff_text(key: str, v: float | None) -> str:
    """A difference from stable: signed; a rate's in percentage points."""
    if v is None:
        return MISSING
    sign = "+" if v > 0 else ""
    if is_rate(key):
        return f"{sign}{fixed(100 * v, 2)} pp"
    return sign + _bare(key, v)


def rel_text(v: float | None) -> str:
    """A relative change from stable, in percent with one decimal."""
    if v is None:
        return MISSING
    return f"{'+' if v > 0 else ''}{fixed(100 * v, 1)}%"


def flatten(figures: Mapping[str, Any], prefix: str = "") -> dict[str, Figure]:
    """The numeric leaves of a figures document, by dotted path (``latency_ms.p99``).

    Missing figures (None) are kept so every variant has the same keys; text and flags are not
    figures and are left out. Whatever a newer `status` adds (quality scores, judge win rates)
    appears here without a change.
    """
    out: dict[str, Figure] = {}
    for key, value in figures.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{path}."))
        elif value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
            out[path] = value
    return out


_BIG_E = 1e6
STATES = {"pass": "passing", "fail": "failing", "waiting": "waiting"}


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


def e_text(e: float) -> str:
    """An e-value: two significant digits, whole numbers from 10 up (77, 4.4, 0.031)."""
    if e >= _BIG_E:
        return f"> {int(_BIG_E):,}"
    return _bare("e", float(fixed(e, 0))) if e >= 10 else significant(e, 2)


def _evidence(check: Mapping[str, Any]) -> tuple[str | None, float | None]:
    """The text "e = 77 of 60 needed" and the progress toward the threshold, on the log scale
    on which evidence adds up (0 at e = 1, 1 at the threshold); (None, None) for a look without
    evidence (no samples yet, or a test that keeps none)."""
    log_e = _number(check.get("evidence"))
    if log_e is None:
        return None, None
    e = math.exp(min(log_e, 700.0))
    # The evaluator's own threshold (the alpha it spent is its own), never recomputed here.
    needed = _number(check.get("threshold"))
    if needed is None or needed <= 1:
        return f"e = {e_text(e)}", None
    progress = min(max(log_e / math.log(needed), 0.0), 1.0)
    return f"e = {e_text(e)} of {e_text(needed)} needed", progress


def _needs(check: Mapping[str, Any]) -> str | None:
    """What a waiting check waits for, in words: "needs 88 more candidate requests (12 of 100)"."""
    if check.get("status") != "waiting":
        return None
    have, need, what = check.get("have"), check.get("need"), check.get("counting")
    if not (isinstance(have, int) and isinstance(need, int) and what):
        return f"needs more samples: {check.get('detail') or ''}"
    return f"needs {need - have:,} more {what} ({have:,} of {need:,})"


def verdict(check: Mapping[str, Any]) -> dict[str, Any]:
    """A guardrail check as every surface shows it: the harm the evaluator estimated (relative,
    positive when the candidate is worse, whichever way the metric is harmed) with its own lower
    bound, the margin it is judged against, the evidence toward failing and what a waiting
    check still needs; each as the text shown, and the numbers a chart or bar is drawn from.

    A win rate's harm is in points below an even split, not relative; a check failed by its
    ceiling (``max_absolute``) holds the ceiling test's figures, so its harm is not shown as a
    change from stable: its detail says what crossed the ceiling.
    """
    metric = str(check.get("metric") or "")
    info = METRICS.get(metric)
    detail = str(check.get("detail") or "")
    status = str(check.get("status") or "")
    estimate, bound = _number(check.get("estimate")), _number(check.get("bound"))
    margin = _number(check.get("margin"))
    if status == "fail" and "ceiling" in detail:
        estimate = bound = None
    pct = info is None or info.kind != "win_rate"
    evidence, progress = _evidence(check)
    return {
        "label": metric_label(metric) if info else label(metric),
        "unit": info.unit if info else "",
        "state": STATES.get(status, status),
        "estimate": estimate,
        "bound": bound,
        "margin": margin,
        "progress": progress,
        "text": {
            "estimate": rel_text(estimate) if pct else diff_text("win_rate", estimate),
            "bound": MISSING if bound is None else f"\u2265 {rel_text(bound)}",
            "margin": rel_text(margin) if pct else diff_text("win_rate", margin),
            "evidence": evidence or MISSING,
            "needs": _needs(check),
        },
    }


def duration_text(seconds: float) -> str:
    """A span of time, as a schedule states it: "90 s", "5 min", "1.5 h"."""
    if seconds < 120:
        return f"{fixed(seconds, 0)} s"
    minutes = seconds < 7200
    text = significant(seconds / 60 if minutes else seconds / 3600, 3)
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return f"{text} {'min' if minutes else 'h'}"


def countdown_text(seconds: float) -> str:
    """Time left as a clock, "4:05", whole seconds rounded up (so "0:00" only once it is over);
    the page's script ticks it down between polls with the same rule (app.js ``countdown``)."""
    left = max(math.ceil(seconds), 0)
    return f"{left // 60}:{left % 60:02d}"


def _schedule(rollout: Mapping[str, Any], entry: Any) -> dict[str, Any]:
    """One stage's share and schedule from the definition: a plain share takes the rollout's
    defaults, a stage object (``{share, min_seconds, min_samples, gate}``) its own where set."""
    own = entry if isinstance(entry, Mapping) else {"share": entry}
    seconds, samples, gate = own.get("min_seconds"), own.get("min_samples"), own.get("gate")
    return {
        "share": own.get("share"),
        "min_seconds": float(rollout.get("min_stage_seconds", 300) if seconds is None else seconds),
        "min_samples": int(rollout.get("min_stage_samples", 200) if samples is None else samples),
        "gate": gate or ("auto" if rollout.get("auto_advance", True) else "manual"),
    }


_STAGE_STATES = {"rolled_back": "rolled back", "aborted": "aborted", "paused": "paused"}


def as_phase(
    definition: Mapping[str, Any], rollout: Mapping[str, Any] | None
) -> tuple[Mapping[str, Any], str]:
    """The definition as the rollout's phase runs it (its strategy, and its rollout where it
    sets one), and the phase's words for a status line ("phase 2 of 2 (ramp): "); the definition
    itself and "" without phases."""
    phases = definition.get("phases") or []
    if not phases:
        return definition, ""
    i = min(int((rollout or {}).get("phase", 0)), len(phases) - 1)
    p = phases[i]
    own = {"strategy": p.get("strategy")} | ({"rollout": p["rollout"]} if p.get("rollout") else {})
    return {**definition, **own}, f"phase {i + 1} of {len(phases)} ({p.get('name')}): "


def ladder(
    definition: Mapping[str, Any],
    rollout: Mapping[str, Any] | None,
    evaluation: Mapping[str, Any] | None,
    now: float,
) -> dict[str, Any] | None:
    """The rollout's stages as a ladder: each with its share and schedule, done, current or to
    come, and the current one's progress toward its minimum time and samples (the fewest
    requests of a live candidate in the evaluator's newest look at this stage). After a
    rollback or an abort the stage it ended in is marked so, and no progress is shown: the
    weights are stable's, whatever the stage's share was. None for a strategy without stages
    or before the evaluator's first state."""
    definition, chain = as_phase(definition, rollout)
    spec = definition.get("rollout") or {}
    entries = spec.get("stages") or []
    if rollout is None or definition.get("strategy", "canary") != "canary" or not entries:
        return None
    status, current = str(rollout.get("status")), int(rollout.get("stage", 0))
    stages = []
    for i, entry in enumerate(entries):
        s = _schedule(spec, entry)
        if status == "completed" or i < current:
            s["state"] = "done"
        elif i == current:
            s["state"] = _STAGE_STATES.get(status, "current")
        else:
            s["state"] = "next"
        s["text"] = {
            "share": f"{_bare('share', s['share'])}%",
            "schedule": f"{duration_text(s['min_seconds'])}, {s['min_samples']:,} requests",
        }
        stages.append(s)
    here = stages[min(current, len(stages) - 1)]
    out: dict[str, Any] = {
        "status": status,
        "stage": current,
        "attempt": rollout.get("attempt"),
        "stages": stages,
        "progress": None,
    }
    where = f"{chain}stage {current + 1} of {len(stages)} ({here['text']['share']})"
    out["phase"] = {
        "running": f"{where}, running",
        "paused": f"{where}, paused",
        "completed": "completed: every stage passed",
        "rolled_back": f"rolled back in {where}: all traffic on stable",
        "aborted": f"aborted in {where}: all traffic on stable",
    }.get(status, f"{where}, {status}")
    if status not in ("running", "paused"):
        return out
    started = float(rollout.get("stage_started", now))
    look = evaluation if evaluation and evaluation.get("stage") == current else {}
    stable = definition.get("stable")
    cands = [v for v in (definition.get("variants") or {}) if v != stable]
    counts = [(look.get("variants") or {}).get(v, {}).get("requests") for v in cands]
    samples = min((int(n) for n in counts if isinstance(n, int)), default=0)
    ends_at = started + here["min_seconds"]
    minimum = duration_text(here["min_seconds"])
    out["progress"] = {
        "started": started,
        "ends_at": ends_at,
        "now": now,
        "seconds": now - started,
        "min_seconds": here["min_seconds"],
        "samples": samples,
        "min_samples": here["min_samples"],
        "text": {
            "time": f"{duration_text(max(now - started, 0))} of {minimum}",
            "min_time": minimum,
            "left": countdown_text(ends_at - now),
            "samples": f"{samples:,} of {here['min_samples']:,} candidate requests",
            "gate": "then the guardrails decide"
            if here["gate"] == "auto"
            else "then an operator promotes (gate: manual)",
        },
    }
    return out
