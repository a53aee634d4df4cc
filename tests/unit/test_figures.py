"""The one number-formatting rule of the page and the CLI (extproc/ops/figures.py), on the values
where binary rounding and decimal rounding part ways."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.ops import figures


@pytest.mark.parametrize(
    ("x", "places", "text"),
    [
        (10.25, 1, "10.3"),  # exact in binary: Python's f"{x:.1f}" says 10.2
        (0.125, 2, "0.13"),  # exact in binary: Python's round-half-even says 0.12
        (2.675, 2, "2.68"),  # a hair below in binary: f"{x:.2f}" and toFixed(2) say 2.67
        (1.005, 2, "1.01"),  # toFixed(2) says 1.00
        (0.15, 1, "0.2"),
        (1e-5, 1, "0.0"),
        (1e-5, 5, "0.00001"),
        (-10.25, 1, "-10.3"),  # half away from zero, symmetric
        (-2.675, 2, "-2.68"),
        (-0.04, 1, "0.0"),  # never "-0.0"
        (-0.0, 2, "0.00"),
        (0.5, 0, "1"),
        (2.5, 0, "3"),  # not round-half-even
        (1e22, 1, "10000000000000000000000.0"),
        (123456.789, 2, "123456.79"),
    ],
)
def test_fixed_rounds_half_away_from_zero_on_the_decimal_form(
    x: float, places: int, text: str
) -> None:
    assert figures.fixed(x, places) == text


@given(m=st.integers(min_value=-(10**14), max_value=10**14), places=st.integers(0, 6))
def test_fixed_agrees_with_integer_rounding_of_the_typed_decimal(m: int, places: int) -> None:
    """``m`` read as a decimal with ``places + 1`` decimals (what a person typed, what repr
    prints back), rounded by integer arithmetic: an independent statement of the rule."""
    digits = f"{abs(m):0{places + 2}d}"
    typed = f"{'-' if m < 0 else ''}{digits[: -places - 1]}.{digits[-places - 1 :]}"
    rounded = (abs(m) + 5) // 10
    body = f"{rounded:0{places + 1}d}"
    whole, frac = body[: len(body) - places], body[len(body) - places :]
    want = whole + (f".{frac}" if places else "")
    if m < 0 and rounded:
        want = "-" + want
    assert figures.fixed(float(typed), places) == want


@pytest.mark.parametrize(
    ("x", "text"),
    [
        (0.012345, "0.0123"),
        (0.0125, "0.0125"),
        (0.01255, "0.0126"),
        (9.996, "10.0"),  # three digits after rounding up to the next power of ten
        (99.95, "100"),
        (1e-5, "0.0000100"),
        (-0.0999, "-0.0999"),
        (0.0, "0.00"),
    ],
)
def test_significant(x: float, text: str) -> None:
    assert figures.significant(x, 3) == text


@pytest.mark.parametrize(
    ("key", "value", "text"),
    [
        ("latency_ms.p50", 10.25, "10.3 ms"),
        ("latency_ms.p50", None, figures.MISSING),
        ("error_rate", 0.0105, "1.05%"),
        ("error_rate", 0.00125, "0.13%"),
        ("error_rate", 0.0, "0.00%"),
        ("requests", 12345, "12,345"),
        ("requests", 12345.0, "12,345"),  # by value: JSON through JavaScript loses int/float
        ("cost_per_request", 1.25e-05, "0.0000125"),
        ("cached_prompt_tokens", 10.25, "10.3"),
        ("output_tokens_per_s", 123.45, "123.5"),
        ("output_tokens_per_s", -2.675, "-2.68"),
        ("output_tokens_per_s", math.inf, "inf"),
    ],
)
def test_value_text(key: str, value: float | None, text: str) -> None:
    assert figures.value_text(key, value) == text


def test_differences_and_relative_changes() -> None:
    assert figures.diff_text("error_rate", 0.0125) == "+1.25 pp"
    assert figures.diff_text("error_rate", -1e-9) == "0.00 pp"  # no sign on a zero
    assert figures.diff_text("latency_ms.p99", -10.25) == "-10.3 ms"
    assert figures.diff_text("latency_ms.p99", 10.25) == "+10.3 ms"
    assert figures.diff_text("latency_ms.p99", None) == figures.MISSING
    assert figures.rel_text(0.1025) == "+10.3%"
    assert figures.rel_text(-0.00049) == "0.0%"
    assert figures.rel_text(None) == figures.MISSING


def test_labels_carry_units_and_unknown_keys_read_as_words() -> None:
    assert figures.label("latency_ms.p99") == "latency p99 (ms)"
    assert figures.label("stage.some_new_score") == "stage some new score"


def test_guardrail_metrics_are_named_by_the_registry() -> None:
    """A figure that a guardrail judges reads as the registry names it, with its unit."""
    from extproc.contract.guardrail_metrics import METRICS

    for name, info in METRICS.items():
        assert figures.metric_label(name).startswith(info.label), name
    assert figures.label("cost_per_request") == "cost per request (currency units)"
    assert figures.label("error_rate") == "error rate (5xx, timeout, reset)"
    assert figures.label("latency_p99") == "p99 latency (ms)"
    assert figures.label("completion_tokens") == "completion tokens"  # a total, not the mean
    assert figures.metric_label("completion_tokens") == "tokens per answer"  # unit in the name
    assert figures.label("stage.judge_win_rate") == "judge win rate (stage)"


def _check(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "variant": "canary",
        "metric": "latency_p99",
        "status": "pass",
        "estimate": None,
        "bound": None,
        "margin": 0.2,
        "evidence": None,
        "detail": "",
    }
    return base | kw


def test_a_verdict_reads_harm_bound_limit_and_evidence_by_the_one_rule() -> None:
    v = figures.verdict(
        _check(
            status="fail",
            estimate=0.1025,  # on a rounding edge: 10.25% reads +10.3%, as everywhere
            bound=0.0525,
            margin=0.1025,
            evidence=math.log(77.4),
            detail="...; evidence e=77.4 over the rollout (fails at 60): worse beyond the margin",
            threshold=60.0,
        )
    )
    assert v["state"] == "failing"
    assert v["text"]["estimate"] == "+10.3%" == figures.rel_text(0.1025)
    assert v["text"]["bound"] == "\u2265 +5.3%"
    assert v["text"]["margin"] == "+10.3%"
    assert v["text"]["evidence"] == "e = 77 of 60 needed"
    assert v["progress"] == 1.0
    assert v["text"]["needs"] is None


def test_evidence_progress_is_on_the_log_scale_and_absent_without_evidence() -> None:
    half = figures.verdict(_check(evidence=math.log(20) / 2, threshold=20.0))
    assert half["progress"] == pytest.approx(0.5)
    assert half["text"]["evidence"] == "e = 4.5 of 20 needed"
    bare = figures.verdict(_check(evidence=0.0, threshold=None))
    assert (bare["text"]["evidence"], bare["progress"]) == ("e = 1.0", None)
    none = figures.verdict(_check(detail="error rate: no candidate requests yet"))
    assert (none["text"]["evidence"], none["progress"]) == (figures.MISSING, None)


def test_a_waiting_verdict_says_what_it_needs() -> None:
    v = figures.verdict(
        _check(status="waiting", have=1234, need=2000, counting="candidate requests")
    )
    assert v["text"]["needs"] == "needs 766 more candidate requests (1,234 of 2,000)"
    assert v["text"]["estimate"] == figures.MISSING
    conv = _check(status="waiting", have=15, need=20, counting="conversations")
    assert figures.verdict(conv)["text"]["needs"] == "needs 5 more conversations (15 of 20)"
    # A waiting test that counts nothing of its own says why it waits.
    tail = _check(status="waiting", detail="no tail events yet")
    assert figures.verdict(tail)["text"]["needs"] == "needs more samples: no tail events yet"


def test_a_ceiling_failure_shows_no_change_from_stable() -> None:
    v = figures.verdict(
        _check(status="fail", estimate=0.3, bound=0.2, detail="x, ceiling 2.00%: above the ceiling")
    )
    assert (v["estimate"], v["text"]["estimate"]) == (None, figures.MISSING)


def test_a_verdict_names_the_guardrails_metric() -> None:
    """The status total "completion tokens" is not the guardrail's mean per answer."""
    assert figures.verdict(_check(metric="completion_tokens"))["label"] == "tokens per answer"


def test_a_win_rate_verdict_is_in_points() -> None:
    v = figures.verdict(_check(metric="judge_win_rate", estimate=0.125, margin=0.1))
    assert (v["text"]["estimate"], v["text"]["margin"]) == ("+12.50 pp", "+10.00 pp")


@pytest.mark.parametrize(
    ("seconds", "duration", "left"),
    [
        (0, "0 s", "0:00"),
        (-3, "0 s", "0:00"),  # over: never a negative clock
        (59.25, "59 s", "1:00"),  # rounded up: "0:00" only once it is over
        (119.5, "120 s", "2:00"),
        (450, "7.5 min", "7:30"),
        (7199, "120 min", "119:59"),
        (10800, "3 h", "180:00"),
    ],
)
def test_durations_and_countdowns(seconds: float, duration: str, left: str) -> None:
    assert figures.duration_text(max(seconds, 0)) == duration
    assert figures.countdown_text(seconds) == left


DEFINITION = {
    "strategy": "canary",
    "stable": "stable",
    "variants": {"stable": {}, "canary": {}},
    "rollout": {
        "stages": [5, {"share": 25, "min_seconds": 60, "min_samples": None, "gate": "manual"}, 100],
        "min_stage_seconds": 300,
        "min_stage_samples": 200,
    },
}


def test_the_ladder_takes_each_stages_own_schedule_and_the_stage_samples() -> None:
    look = {"stage": 1, "variants": {"stable": {"requests": 900}, "canary": {"requests": 50}}}
    doc = figures.ladder(
        DEFINITION, {"status": "running", "stage": 1, "stage_started": 100.0}, look, 130.0
    )
    assert doc is not None
    assert [(s["share"], s["state"], s["min_seconds"], s["gate"]) for s in doc["stages"]] == [
        (5, "done", 300.0, "auto"),
        (25, "current", 60.0, "manual"),
        (100, "next", 300.0, "auto"),
    ]
    p = doc["progress"]
    assert (p["samples"], p["min_samples"], p["ends_at"]) == (50, 200, 160.0)
    assert p["text"]["left"] == "0:30"
    assert p["text"]["samples"] == "50 of 200 candidate requests"
    assert doc["phase"] == "stage 2 of 3 (25%), running"
    assert doc["attempt"] is None  # shown once the evaluator counts attempts
    again = {"status": "running", "stage": 1, "stage_started": 100.0, "attempt": 2}
    assert figures.ladder(DEFINITION, again, look, 130.0)["attempt"] == 2  # type: ignore[index]
    stale = figures.ladder(
        DEFINITION, {"status": "running", "stage": 2, "stage_started": 0}, look, 1
    )
    assert stale is not None
    assert stale["progress"]["samples"] == 0  # the look was of another stage


def test_a_rolled_back_ladder_shows_where_it_ended_and_no_progress() -> None:
    doc = figures.ladder(DEFINITION, {"status": "rolled_back", "stage": 1}, None, 0.0)
    assert doc is not None
    assert [s["state"] for s in doc["stages"]] == ["done", "rolled back", "next"]
    assert doc["progress"] is None
    assert doc["phase"] == "rolled back in stage 2 of 3 (25%): all traffic on stable"
    assert figures.ladder({**DEFINITION, "strategy": "ab"}, {"status": "running"}, None, 0) is None


def test_units_title_the_axes() -> None:
    assert figures.unit("error_rate") == "%"
    assert figures.unit("latency_ms.p99") == "ms"
    assert figures.unit("output_tokens_per_s") == "tokens/s"  # from the registry
    assert figures.unit("window_requests") == "requests"
    assert figures.unit("stage.judge_win_rate") == "%"
    assert figures.unit("some_new_score") == ""
