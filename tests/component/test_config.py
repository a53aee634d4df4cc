"""The experiment file: every problem at once, with its path; routing changes validated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from extproc.config import (
    EXAMPLE_EXPERIMENT,
    ConfigError,
    load_experiment,
    parse_experiment,
    validate_weights,
)

GOOD = {
    "name": "exp",
    "salt": "s",
    "stable": "stable",
    "variants": {
        "stable": {"cluster": "a", "weight": 90},
        "canary": {"cluster": "b", "weight": 10},
    },
}


def problems(doc: object) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_experiment(doc, "test.yaml")
    return err.value.problems


def test_bundled_example_is_valid() -> None:
    exp = load_experiment(EXAMPLE_EXPERIMENT)
    assert exp.stable == "stable"
    assert exp.candidates == ["canary"]
    assert sum(exp.file_weights().values()) == 100


def test_every_problem_is_reported_at_once_with_its_path() -> None:
    doc = {
        "name": "Bad Name",
        "salt": "s",
        "stable": "prod",
        "variants": {
            "stable": {"cluster": "a", "weight": 150},
            "canary": {"cluster": "a", "weight": 10, "address": "nowhere"},
        },
        "sticky_keys": ["X-Conversation-Id"],
        "forced_routing": {"allow": ["ghost"]},
        "colour": "blue",
    }
    got = problems(doc)
    expected = [
        "name: ",
        "variants.stable.weight: must be 0..100",
        "colour: ",
        "stable: 'prod' is not one of the variants",
        "variants.canary.cluster: 'a' is also used by 'stable'",
        "variants.canary.address: 'nowhere' is not host:port",
        "sticky_keys.0: 'X-Conversation-Id' is not a lower-case header name",
        "forced_routing.allow.0: 'ghost' is not one of the variants",
    ]
    for want in expected:
        assert any(p.startswith(want) for p in got), (want, got)


def test_lists_of_names_holding_other_values_are_reported_not_raised() -> None:
    """A mapping where a variant's name belongs (unhashable) is a problem with its path, never
    a crash of the checks that compare names."""
    doc = {
        **GOOD,
        "forced_routing": {"allow": [{}, "canary"]},
        "watchdog": {"file": "probes.yaml", "variants": [{}, ["x"], "ghost"]},
    }
    got = problems(doc)
    for want in ("forced_routing.allow.0: ", "watchdog.variants.0: ", "watchdog.variants.1: "):
        assert any(p.startswith(want) for p in got), (want, got)
    assert "watchdog.variants.2: 'ghost' is not one of the variants" in got


def test_weights_must_add_up_to_100() -> None:
    doc = {
        **GOOD,
        "variants": {
            "stable": {"cluster": "a", "weight": 90},
            "canary": {"cluster": "b", "weight": 20},
        },
    }
    assert problems(doc) == ["variants: weights add up to 110, must be 100"]


def test_a_huge_weight_is_a_problem_not_a_crash() -> None:
    """A weight near the float maximum used to overflow the check of the 0.01% grid."""
    doc = {**GOOD, "variants": {**GOOD["variants"], "canary": {"cluster": "b", "weight": 1e306}}}
    assert problems(doc)[0] == "variants.canary.weight: must be 0..100"


def test_candidates_beyond_their_lane_are_refused() -> None:
    doc = {
        **GOOD,
        "variants": {
            "stable": {"cluster": "a", "weight": 0},
            "x": {"cluster": "b", "weight": 70},
            "y": {"cluster": "c", "weight": 30},
        },
    }
    assert problems(doc) == [
        "variants.x: 70% exceeds this candidate's lane of 50% (2 candidates share the "
        "non-stable buckets)"
    ]


def test_yaml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    p = tmp_path / "e.yaml"
    p.write_text("name: x\nvariants: [\n")
    with pytest.raises(ConfigError) as err:
        load_experiment(p)
    assert err.value.problems[0].startswith("line 3, column 1: not valid YAML")


def test_routing_change_is_validated() -> None:
    exp = parse_experiment(GOOD)
    assert validate_weights(exp, {"canary": 100, "stable": 0}) == {"stable": 0.0, "canary": 100.0}
    with pytest.raises(ConfigError) as err:
        validate_weights(exp, {"canary": 10, "gpt5": 90})
    assert err.value.problems[0].startswith("weights: unknown variant(s) ['gpt5']")
    with pytest.raises(ConfigError):
        validate_weights(exp, {"canary": "lots", "stable": 90})


@pytest.mark.timeout(30)
def test_cli_check_exits_2_and_lists_problems(tmp_path: Path) -> None:
    p = tmp_path / "e.yaml"
    p.write_text(
        "name: exp\nsalt: s\nstable: stable\nvariants:\n  stable: {cluster: a, weight: -1}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "extproc", "check", str(p)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2
    assert "variants.stable.weight: must be 0..100" in out.stderr
    assert "variants: " in out.stderr  # min 2 variants


def test_stages_mix_plain_shares_and_scheduled_stages() -> None:
    doc = {
        **GOOD,
        "rollout": {
            "stages": [2, {"share": 10, "min_seconds": 1800, "min_samples": 500, "gate": "manual"}],
            "min_stage_seconds": 60,
            "min_stage_samples": 100,
        },
    }
    r = parse_experiment(doc).spec.rollout
    assert r.shares == [2, 10]
    first, second = r.schedule(0), r.schedule(1)
    assert (first.share, first.min_seconds, first.min_samples, first.gate) == (2, 60, 100, "auto")
    assert (second.min_seconds, second.min_samples, second.gate) == (1800, 500, "manual")


def test_every_stage_problem_is_listed_with_its_path() -> None:
    stages = [
        "x",
        {"share": 500},
        {"gate": "maybe"},
        {"share": 5, "min_seconds": -1, "colour": "red"},
        {"share": 4, "min_samples": "many"},
    ]
    got = problems({**GOOD, "rollout": {"stages": stages}})
    expected = [
        "rollout.stages.0: must be a percentage 0..100 or a stage",
        "rollout.stages.1.share: must be a percentage 0..100",
        "rollout.stages.2.share: Field required",
        "rollout.stages.2.gate: Input should be 'auto' or 'manual'",
        "rollout.stages.3.min_seconds: ",
        "rollout.stages.3.colour: Extra inputs are not permitted",
        "rollout.stages.4.min_samples: ",
    ]
    for want in expected:
        assert sum(p.startswith(want) for p in got) == 1, (want, got)
    assert not [p for p in got if ".float" in p or ".Stage" in p], got  # pydantic's form names
    # shares of objects join the ramp check
    assert "rollout.stages: must increase" in " ".join(
        problems({**GOOD, "rollout": {"stages": [{"share": 10}, 5]}})
    )


def test_a_stage_schedule_needs_the_canary_strategy() -> None:
    doc = {**GOOD, "strategy": "ab", "rollout": {"stages": [{"share": 10, "gate": "manual"}]}}
    assert problems(doc) == [
        "rollout.stages.0: a stage with its own schedule needs strategy canary; strategy ab "
        "uses min_stage_seconds, min_stage_samples and auto_advance"
    ]
