"""Every metric a guardrail can watch, described once.

Why one table: the experiment file's validation, the judge's dispatch (which test, which counts,
which side is harm) and every surface that shows a guardrail must agree on what ``tool_call_rate``
counts and whether less of it is harm. Each used to keep its own list of names and if-chains, and
they drifted. Everything else derives from :data:`METRICS`.

Kinds: ``quantile`` (a tail of one column of samples: the tail event-share test),
``mean`` (the mean of a column: the normal-mixture test), ``rate`` (events per trial from the
window's counters: the event-share test), ``win_rate`` (pairwise judge verdicts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["quantile", "mean", "rate", "win_rate"]
Direction = Literal["increase", "decrease", "both"]


@dataclass(frozen=True)
class MetricInfo:
    """What a guardrail metric is: its test, where its data come from, which side is harm.

    ``source`` is the window's sample column (``VariantWindow.samples``) for quantiles and means;
    ``events`` and ``per`` name the window's counters of a rate (events per trial). ``harm`` is
    the default direction; ``directions`` those a guardrail may choose (``direction:``).
    ``trials`` names the unit ``min_samples`` counts; ``unit`` is the metric's own unit (of
    ``max_absolute``).
    """

    name: str
    kind: Kind
    label: str
    unit: str
    harm: Direction = "increase"
    directions: tuple[Direction, ...] = ("increase",)
    source: str = ""
    q: float = 0.0
    events: str = ""
    per: str = "requests"
    trials: str = "candidate requests"

    def counts(self, w: object) -> tuple[int, int]:
        """(events, trials) of a rate in one variant's window (the evaluator's ``VariantWindow``,
        read by the counter names above, so this table needs nothing from the evaluator); events
        never exceed trials (a request complains once at most, however many feedback signals name
        it)."""
        trials = int(getattr(w, self.per))
        return min(int(getattr(w, self.events)), trials), trials


def _quantile(name: str, source: str, q: float, label: str) -> MetricInfo:
    return MetricInfo(name, "quantile", label, "ms", source=source, q=q)


def _rate(
    name: str,
    label: str,
    events: str,
    per: str = "requests",
    trials: str = "candidate requests",
    directions: tuple[Direction, ...] = ("increase",),
) -> MetricInfo:
    harm: Direction = "both" if "both" in directions else "increase"
    return MetricInfo(
        name, "rate", label, "fraction", harm, directions, events=events, per=per, trials=trials
    )


def _mean(
    name: str, label: str, unit: str, source: str, harm: Direction = "increase"
) -> MetricInfo:
    return MetricInfo(name, "mean", label, unit, harm=harm, directions=(harm,), source=source)


METRICS: dict[str, MetricInfo] = {
    m.name: m
    for m in (
        _quantile("latency_p99", "latency", 0.99, "p99 latency"),
        _quantile("latency_p95", "latency", 0.95, "p95 latency"),
        _quantile("latency_p50", "latency", 0.50, "median latency"),
        _quantile("ttft_p95", "ttft", 0.95, "p95 time to first token"),
        _quantile("ttft_p50", "ttft", 0.50, "median time to first token"),
        _rate("error_rate", "error rate", "errors"),
        _rate("timeout_rate", "timeout rate", "timeouts"),
        _rate("refusal_rate", "refusal rate", "refusals", "answered", "inspected answers"),
        _rate(
            "tool_call_rate",
            "tool-call rate",
            "tool_calls",
            "successes",
            "successful answers",
            ("increase", "decrease", "both"),
        ),
        _rate("empty_answer_rate", "empty-answer rate", "empty_answers", "answered", "answers"),
        _rate(
            "json_invalid_rate", "invalid-JSON rate", "json_invalid", "json_checked", "JSON answers"
        ),
        _rate("feedback_negative_rate", "negative feedback rate", "negative_feedback"),
        _rate(
            "watchdog_fail_rate",
            "watchdog failure rate",
            "probe_failures",
            "probes",
            "watchdog probes",
        ),
        _mean("completion_tokens", "tokens per answer", "tokens", "completion_tokens"),
        _mean("response_bytes", "response size", "bytes", "response_bytes"),
        _mean("answer_chars", "answer length", "characters", "answer_chars"),
        _mean(
            "output_tokens_per_s",
            "output tokens per second",
            "tokens/s",
            "output_tokens_per_s",
            harm="decrease",
        ),
        _mean("cost_per_request", "cost per request", "currency units", "cost"),
        _mean(
            "cached_prompt_tokens",
            "cached prompt tokens",
            "tokens",
            "cached_prompt_tokens",
            harm="decrease",
        ),
        MetricInfo(
            "judge_win_rate",
            "win_rate",
            "judge win rate",
            "fraction",
            harm="decrease",
            directions=("decrease",),
            trials="decisive judge verdicts",
        ),
    )
}


def sides(direction: Direction) -> tuple[Literal["increase", "decrease"], ...]:
    """The one-sided tests a direction runs (``both``: one per side, each at half the alpha)."""
    return ("increase", "decrease") if direction == "both" else (direction,)
