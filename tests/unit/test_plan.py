"""Risk-graded plans (`extproc plan`): the tier table, the written experiment, bad input."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.cli import common
from extproc.cli import main as cli
from extproc.config import EXAMPLE_EXPERIMENT, ConfigError, load_experiment
from extproc.ops.plan import (
    GRADES,
    ModelMeta,
    classify,
    load_base,
    make_plan,
    metric_sample_size,
)
from extproc.stats import sample_size_means, sample_size_proportions

pytestmark = pytest.mark.timeout(30)

LLAMA: dict[str, Any] = {
    "name": "llama-3.1-8b-instruct",
    "family": "llama-3.1",
    "base_model": "llama-3.1-8b",
    "weights_hash": "sha256:aaa",
    "version": "1",
}


def meta(**fields: Any) -> ModelMeta:
    return ModelMeta.model_validate(fields)


@pytest.mark.parametrize(
    ("case", "current", "target", "tier"),
    [
        ("same weights", LLAMA, {**LLAMA, "name": "llama-cfg2"}, "config"),
        (
            "same weights, kind declared riskier: kept",
            LLAMA,
            {**LLAMA, "kind": "new-version"},
            "new-version",
        ),
        (
            "declared config but the weights changed",
            LLAMA,
            {**LLAMA, "weights_hash": "sha256:bbb", "kind": "config"},
            "fine-tune",
        ),
        ("fine-tune of the same base", LLAMA, {**LLAMA, "weights_hash": "sha256:bbb"}, "fine-tune"),
        (
            "fine-tune of the current model",
            {"name": "m-base", "weights_hash": "1"},
            {"name": "m-ft", "base_model": "m-base", "weights_hash": "2"},
            "fine-tune",
        ),
        (
            "back to the base the current one was tuned from",
            {"name": "m-ft", "base_model": "m-base"},
            {"name": "m-base"},
            "fine-tune",
        ),
        (
            "quantization declared",
            {"name": "m"},
            {"name": "m-awq", "kind": "quantization"},
            "fine-tune",
        ),
        (
            "new version of the family",
            LLAMA,
            {"name": "llama-3.1-70b", "family": "llama-3.1", "base_model": "llama-3.1-70b"},
            "new-version",
        ),
        (
            "same family, nothing else known",
            {"name": "a", "family": "f"},
            {"name": "b", "family": "f"},
            "new-version",
        ),
        ("new family", LLAMA, {"name": "qwen-2.5-7b", "family": "qwen-2.5"}, "new-family"),
        (
            "declared fine-tune but another family",
            LLAMA,
            {"name": "q", "family": "qwen", "kind": "fine-tune"},
            "new-family",
        ),
        (
            "contradiction: same hash, another family",
            LLAMA,
            {**LLAMA, "family": "other"},
            "new-family",
        ),
        ("nothing to compare", {"name": "a"}, {"name": "b"}, "new-family"),
    ],
)
def test_risk_tiers(case: str, current: dict[str, Any], target: dict[str, Any], tier: str) -> None:
    got, reasons = classify(meta(**current), meta(**target))
    assert got == tier, (case, reasons)
    assert reasons, case


@pytest.mark.parametrize(
    ("tier", "first", "total_s", "stages", "p99_margin", "first_manual"),
    [
        ("config", 25, 900, 3, 0.10, None),
        ("fine-tune", 10, 3600, 4, 0.20, 100),
        ("new-version", 5, 4 * 3600, 5, 0.20, 50),
        ("new-family", 2, 24 * 3600, 6, 0.20, 25),
    ],
)
def test_each_tier_writes_a_valid_experiment(
    tier: str,
    first: float,
    total_s: int,
    stages: int,
    p99_margin: float,
    first_manual: float | None,
) -> None:
    grade = GRADES[tier]  # type: ignore[index]
    assert grade.stages[0] == first
    assert len(grade.stages) == stages
    assert grade.stages[-1] == 100
    assert grade.total_s == total_s
    current = meta(name="m1")
    target = meta(name="m2", kind=tier)
    plan = make_plan(current, target)
    spec = plan.experiment.spec
    assert plan.tier == tier
    assert spec.strategy == "canary"
    assert spec.rollout.shares == list(grade.stages)
    # the schedule the file states is the tier's: times and requests never shrink along the
    # ramp, and from the first manual stage on a person promotes every stage
    schedule = [spec.rollout.schedule(i) for i in range(stages)]
    assert sum(s.min_seconds for s in schedule) == total_s
    assert [(s.share, s.min_seconds, s.min_samples, s.gate) for s in schedule] == [
        (s.share, s.seconds, s.samples, s.gate) for s in grade.steps
    ]
    assert all(a.min_seconds <= b.min_seconds for a, b in itertools.pairwise(schedule))
    assert all(a.min_samples <= b.min_samples for a, b in itertools.pairwise(schedule))
    manual = [s.share for s in schedule if s.gate == "manual"]
    assert manual == (
        [] if first_manual is None else list(grade.stages)[grade.stages.index(first_manual) :]
    )
    assert {n: v.weight for n, v in spec.variants.items()} == {
        "stable": 100 - first,
        "canary": first,
    }
    assert spec.variants["canary"].model == "m2"
    p99 = next(g for g in spec.guardrails if g.metric == "latency_p99")
    assert p99.max_increase == pytest.approx(p99_margin)
    assert p99.action == "rollback"
    # the text is the file: comments first, then YAML that parses back to the same experiment
    header = plan.text.split("\n\n", 1)[0].splitlines()
    assert all(line.startswith("#") for line in header)
    assert any(f"risk: {tier}" in line for line in header)
    assert yaml.safe_load(plan.text)["rollout"]["stages"] == grade.stage_entries()


def test_ungraded_default_guardrails_are_kept() -> None:
    spec = make_plan(meta(name="a"), meta(name="b", kind="fine-tune")).experiment.spec
    metrics = [g.metric for g in spec.guardrails]
    assert len(metrics) == len(set(metrics))
    assert {"latency_p99", "error_rate", "ttft_p95"} <= set(metrics)


def test_plan_on_a_base_keeps_its_routing_and_extra_guardrails(tmp_path: Path) -> None:
    base_doc = yaml.safe_load((Path(EXAMPLE_EXPERIMENT)).read_text())
    base_doc["guardrails"] = [
        {"metric": "latency_p50", "max_increase": 0.1, "action": "hold"},
        {"metric": "latency_p99", "max_increase": 0.9},
    ]
    base_doc["rollout"]["cadence_s"] = 2
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(base_doc))
    base, raw = load_base(path)
    plan = make_plan(meta(**LLAMA), meta(**{**LLAMA, "weights_hash": "x"}), base, raw)
    spec = plan.experiment.spec
    assert spec.name == base_doc["name"]
    assert spec.salt == base_doc["salt"]
    assert spec.variants["canary"].address == base_doc["variants"]["canary"]["address"]
    assert spec.variants["canary"].weight == 10
    assert spec.rollout.cadence_s == 2  # what the plan does not decide is kept
    by_metric = {g.metric: g for g in spec.guardrails}
    assert by_metric["latency_p50"].action == "hold"  # not graded: kept
    assert by_metric["latency_p99"].max_increase == pytest.approx(0.2)  # graded: replaced
    assert f"Based on {path}" in plan.text


def test_plan_refuses_a_base_with_two_candidates(tmp_path: Path) -> None:
    doc = yaml.safe_load(Path(EXAMPLE_EXPERIMENT).read_text())
    doc["variants"]["canary"]["weight"] = 3
    doc["variants"]["other"] = {"cluster": "model_other", "weight": 2}
    doc["rollout"]["stages"] = [2, 5, 50]
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(doc))
    base, raw = load_base(path)
    with pytest.raises(ConfigError, match="one candidate"):
        make_plan(meta(name="a"), meta(name="b"), base, raw)


# --- the CLI ---------------------------------------------------------------------------------


def write(path: Path, doc: Any) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def test_plan_cli_writes_a_checked_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cur = write(tmp_path / "cur.yaml", LLAMA)
    tgt = write(tmp_path / "tgt.yaml", {**LLAMA, "name": "llama-ft", "weights_hash": "sha256:b"})
    out = tmp_path / "plan.yaml"
    code = cli.main(["plan", "--current", str(cur), "--target", str(tgt), "-o", str(out), "--json"])
    assert code == common.EXIT_OK
    summary = json.loads(capsys.readouterr().out)
    assert summary["tier"] == "fine-tune"
    assert summary["canary_share"] == 10
    assert summary["evaluation_s"] == 3600
    assert summary["output"] == str(out)
    exp = load_experiment(out)
    assert exp.spec.rollout.shares == [10, 25, 50, 100]
    assert [s["gate"] for s in summary["schedule"]] == ["auto", "auto", "auto", "manual"]
    assert out.read_text().startswith("# Rollout plan written by `extproc plan`.")
    assert cli.main(["check", str(out)]) == common.EXIT_OK


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ({"name": "x", "weight_hash": "abc"}, "weight_hash: Extra inputs are not permitted"),
        ({"name": "x", "kind": "retrain"}, "kind: Input should be"),
        ({"family": "x"}, "name: Field required"),
        (["a", "list"], "must be a mapping"),
        (None, "cannot read"),
    ],
)
def test_plan_cli_bad_metadata_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], target: Any, message: str
) -> None:
    cur = write(tmp_path / "cur.yaml", LLAMA)
    tgt = tmp_path / "missing.yaml" if target is None else write(tmp_path / "tgt.yaml", target)
    out = tmp_path / "plan.yaml"
    code = cli.main(["plan", "--current", str(cur), "--target", str(tgt), "-o", str(out)])
    assert code == common.EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing half-written


# --- sample sizes ----------------------------------------------------------------------------


def test_metric_sample_sizes_are_the_stats_librarys_one_sided_in_the_harm_direction() -> None:
    rate = metric_sample_size("error_rate", 0.5, baseline=0.01, relative=True, share=5)
    assert (rate.baseline, rate.target, rate.kind) == (0.01, 0.015, "rate")
    assert rate.size == sample_size_proportions(
        0.01, 0.005, ratio=5 / 95, alternative="greater", alpha=0.05, power=0.8
    )
    # a quantile is judged by the share of requests beyond stable's quantile
    tail = metric_sample_size("latency_p99", 0.8, relative=True)
    assert (tail.baseline, tail.target) == (0.01, 0.018)
    assert tail.size.n_treatment == tail.size.n_control  # share 50: an even split
    mean = metric_sample_size("completion_tokens", 15, sd=60)
    assert mean.size == sample_size_means(60, 15, alternative="greater")
    # a harm that is a decrease is tested on the lower side
    assert metric_sample_size("output_tokens_per_s", 5, sd=20).size.alternative == "less"
    both = metric_sample_size("tool_call_rate", 0.05, baseline=0.3).size
    assert both == sample_size_proportions(0.3, 0.05, alternative="two-sided")


@pytest.mark.parametrize(
    ("metric", "kwargs", "message"),
    [
        ("nope", {}, "not a guardrail metric"),
        ("error_rate", {}, "--baseline"),
        ("error_rate", {"baseline": 0.01, "mde": -0.01}, "positive"),
        ("error_rate", {"baseline": 0.01, "share": 100}, "share"),
        ("latency_p99", {"baseline": 0.05}, "tail share 0.01"),
        ("completion_tokens", {}, "--sd"),
        ("completion_tokens", {"sd": 5, "relative": True}, "stable's mean"),
        ("judge_win_rate", {"baseline": 0.5}, "50% win rate"),
        ("judge_win_rate", {"mde": 0.5}, "under 0.5"),
    ],
)
def test_metric_sample_size_says_what_is_missing(
    metric: str, kwargs: dict[str, Any], message: str
) -> None:
    mde = kwargs.pop("mde", 0.01)
    with pytest.raises(ValueError, match=message):
        metric_sample_size(metric, mde, **kwargs)


def test_the_judges_win_rate_is_sized_one_sided_in_decisive_verdicts() -> None:
    from extproc.stats.power import sample_size_win_rate

    got = metric_sample_size("judge_win_rate", 0.05)
    assert (got.baseline, got.target, got.size.alternative, got.size.alpha) == (
        0.5,
        0.45,
        "less",
        0.05,
    )
    # One-sided at alpha: the two-sided size at 2 alpha (the same critical value).
    assert got.size.n_treatment == sample_size_win_rate(0.45, alpha=0.1).n_treatment
    assert got.size.n_treatment < sample_size_win_rate(0.45, alpha=0.05).n_treatment


def test_sample_size_cli(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["sample-size", "error_rate", "--mde", "0.5", "--relative", "--baseline", "0.01"]
    assert cli.main([*args, "--share", "5", "--json"]) == common.EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert (doc["candidate"], doc["stable"], doc["alternative"]) == (3182, 60442, "greater")
    assert cli.main(args) == common.EXIT_OK
    assert "candidate 6045 requests, stable 6045" in capsys.readouterr().out
    assert cli.main(["sample-size", "error_rate", "--mde", "0.5"]) == common.EXIT_USAGE
    assert "--baseline" in capsys.readouterr().err


def test_plan_with_stables_error_rate_states_what_detection_takes(tmp_path: Path) -> None:
    plan = make_plan(meta(name="a"), meta(name="b", kind="fine-tune"), error_baseline=0.01)
    detect = plan.summary()["error_rate_samples"]
    # the error margin (+50%) at the first stage's 10%, at one of four gating guardrails' alpha
    assert (detect["baseline"], detect["target"], detect["share"]) == (0.01, 0.015, 10)
    assert detect["alpha"] == pytest.approx(0.05 / 4)
    assert f"after about {detect['candidate']} candidate requests at 10%" in plan.text
    assert "the stages ask for 1800 candidate requests in all" in plan.text
    assert make_plan(meta(name="a"), meta(name="b")).summary()["error_rate_samples"] is None
    cur, tgt = write(tmp_path / "c.yaml", {"name": "a"}), write(tmp_path / "t.yaml", {"name": "b"})
    bad = ["plan", "--current", str(cur), "--target", str(tgt), "--error-rate", "2"]
    assert cli.main(bad) == common.EXIT_USAGE


def test_a_plan_on_a_base_decides_the_gates_itself(tmp_path: Path) -> None:
    """A base's auto_advance would turn every plain stage into a manual one: the plan drops it
    and states each stage's gate."""
    doc = yaml.safe_load(Path(EXAMPLE_EXPERIMENT).read_text())
    doc["rollout"]["auto_advance"] = False
    base, raw = load_base(write(tmp_path / "base.yaml", doc))
    spec = make_plan(meta(name="a"), meta(name="b", kind="fine-tune"), base, raw).experiment.spec
    assert spec.rollout.auto_advance
    gates = [spec.rollout.schedule(i).gate for i in range(len(spec.rollout.shares))]
    assert gates == ["auto", "auto", "auto", "manual"]
