"""How a figure reads, for every surface that shows one: `extproc status`, `extproc top` and the
dashboard (whose API sends each table cell's text made here, which the page shows as given).

Why one module: the page used to format with JavaScript's ``toFixed`` and the CLI with Python's
``f"{x:.1f}"``, and the two round the same double differently (10.25 is exactly representable:
``toFixed(1)`` gives "10.3", Python's round-half-even "10.2"); the same figure then read two
ways. Here every number is rounded once, by one rule: half away from zero on the shortest
decimal form of the double (what ``repr`` prints, and what a person reads in the JSON), so
2.675 reads "2.68" although the double is a hair below it. The rule is the one taught at school
and the one a reader checks the JSON against.

The labels, with their units, live here too, so a figure is named the same everywhere.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Context, Decimal
from typing import Any

Figure = float | int | None

MISSING = "\u2013"  # an en dash
"""A figure that is unknown (no sample yet), never zero."""

_CONTEXT = Context(prec=80, rounding=ROUND_HALF_UP)
_MS = re.compile(r"_ms(\.|$)")

LABELS: dict[str, str] = {
    "requests": "requests (all time, forced included)",
    "weight": "weight (%)",
    "window_requests": "requests (newest events)",
    "errors": "server errors (5xx, timeout, reset)",
    "error_rate": "error rate (5xx, timeout, reset)",
    "client_errors": "client errors (4xx, disconnect)",
    "client_error_rate": "client error rate (4xx, disconnect)",
    "timeout_rate": "timeout rate",
    "forced_requests": "tester requests (forced, not compared)",
    "open_requests": "requests still open (in-flight notices)",
    "latency_ms.p50": "latency p50 (ms)",
    "latency_ms.p95": "latency p95 (ms)",
    "latency_ms.p99": "latency p99 (ms)",
    "ttft_ms.p50": "time to first token p50 (ms)",
    "prompt_tokens": "prompt tokens",
    "completion_tokens": "completion tokens",
    "tokens_per_request": "completion tokens per request",
    "cached_prompt_tokens": "cached prompt tokens per request",
    "output_tokens_per_s": "output tokens/s (mean)",
    "cost_per_request": "cost per request (price currency)",
    "refusal_rate": "refusal rate",
    "tool_call_rate": "tool-call rate",
    "empty_answer_rate": "empty-answer rate",
    "json_invalid_rate": "JSON-invalid rate",
    "answer_chars_mean": "answer length (chars)",
    "judge_win_rate": "judge win rate",
    "feedback_negative": "negative feedback posts",
    "watchdog_fail_rate": "watchdog failure rate",
    "stage.judge_verdicts": "judge verdicts (stage)",
    "stage.judge_win_rate": "judge win rate (stage)",
    "stage.feedback_negative_rate": "negative feedback rate (stage)",
    "stage.watchdog_probes": "watchdog probes (stage)",
    "stage.watchdog_fail_rate": "watchdog failure rate (stage)",
}


def label(key: str) -> str:
    """A figure's name with its unit; an unknown key reads as its words."""
    return LABELS.get(key) or key.replace("_", " ").replace(".", " ")


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
