"""The guardrail metric registry, and the experiment-file rules derived from it."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from extproc.config import EXAMPLE_EXPERIMENT, ConfigError, parse_experiment
from extproc.contract.guardrail_metrics import METRICS
from extproc.evaluator.clusters import COUNTERS
from extproc.evaluator.window import VariantWindow

BASE: dict[str, Any] = {
    "name": "e",
    "salt": "s",
    "stable": "stable",
    "variants": {
        "stable": {"cluster": "a", "weight": 90},
        "canary": {"cluster": "b", "weight": 10},
    },
}


def problems(*guardrails: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as err:
        parse_experiment({**BASE, "guardrails": list(guardrails)})
    return str(err.value)


def test_every_metric_reads_data_the_window_has() -> None:
    w = VariantWindow()
    for name, info in METRICS.items():
        assert info.harm in info.directions or info.harm == "both", name
        if info.kind in ("quantile", "mean"):
            assert w.samples(info.source).size == 0, name  # a column the window keeps
        if info.kind == "quantile":
            assert 0 < info.q < 1
            assert info.unit == "ms"
        if info.kind == "rate":
            assert info.counts(w) == (0, 0), name
    # request-level rates are tracked per conversation (their design effect is measured)
    assert {m.events for m in METRICS.values() if m.kind == "rate"} - set(COUNTERS) == {
        "negative_feedback",
        "probe_failures",
    }


def test_the_contracts_metric_names_and_directions() -> None:
    new = {
        "timeout_rate": "increase",
        "tool_call_rate": "both",
        "empty_answer_rate": "increase",
        "json_invalid_rate": "increase",
        "output_tokens_per_s": "decrease",
        "cost_per_request": "increase",
        "cached_prompt_tokens": "decrease",
    }
    assert {n: METRICS[n].harm for n in new} == new


def test_each_problem_is_reported_with_its_path() -> None:
    text = problems(
        {"metric": "latency_p42", "max_increase": 0.1},
        {"metric": "error_rate", "direction": "decrease", "max_decrease": 0.1},
        {"metric": "output_tokens_per_s", "max_increase": 0.1},
        {"metric": "cached_prompt_tokens", "max_decrease": 0.2, "max_absolute": 10},
        {"metric": "timeout_rate", "max_increase": 0.5, "max_absolute": 2},
        {"metric": "judge_win_rate", "max_decrease": 0.6},
        {"metric": "tool_call_rate", "shared_incident": "sometimes", "max_increase": 0.2},
    )
    for expected in (
        "guardrails.0.metric: 'latency_p42' is not a guardrail metric",
        "guardrails.1.direction: metric error_rate allows increase",
        "guardrails.1.max_decrease: not used by metric error_rate (increase)",
        "guardrails.2.max_decrease: required for metric output_tokens_per_s",
        "guardrails.2.max_increase: not used by metric output_tokens_per_s",
        "guardrails.3.max_absolute: a ceiling; less cached_prompt_tokens is the harm",
        "guardrails.4.max_absolute: a rate's ceiling is a fraction below 1",
        "guardrails.5.max_decrease: points below a 50% win rate, must be < 0.5",
        "guardrails.6.shared_incident:",
    ):
        assert expected in text, (expected, text)
    assert text.count("  - ") == 10  # every problem at once


def test_two_sided_guardrails_take_one_margin_for_both_sides_when_given_one() -> None:
    spec = parse_experiment(
        {**BASE, "guardrails": [{"metric": "tool_call_rate", "max_decrease": 0.25}]}
    ).spec
    g = spec.guardrails[0]
    assert g.harm_sides == ("increase", "decrease")
    assert g.margin_of("increase") == g.margin_of("decrease") == 0.25
    one = parse_experiment(
        {
            **BASE,
            "guardrails": [
                {"metric": "tool_call_rate", "direction": "decrease", "max_decrease": 0.5}
            ],
        }
    ).spec.guardrails[0]
    assert one.harm_sides == ("decrease",)
    assert "guardrails.0.max_increase or max_decrease: required for metric tool_call_rate" in (
        problems({"metric": "tool_call_rate"})
    )


def test_the_examples_in_the_shipped_experiment_file_are_valid() -> None:
    """Every guardrail line commented out in the example parses as it would uncommented."""
    text = EXAMPLE_EXPERIMENT.read_text()
    lines = re.findall(r"^\s*# (- \{metric: .*\})", text, flags=re.MULTILINE)
    assert len(lines) >= 8
    doc = yaml.safe_load(text)
    examples = [yaml.safe_load(line)[0] for line in lines]
    spec = parse_experiment({**doc, "guardrails": doc["guardrails"] + examples}).spec
    assert {g.metric for g in spec.guardrails} >= {"tool_call_rate", "output_tokens_per_s"}
