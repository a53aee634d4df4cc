"""A simulated A/B run ends in the decision its truth calls for, through the replay loop that
`extproc analyze` runs (the live evaluator's decision path): a better candidate ships, a worse
one keeps stable, an equal one does not ship."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from extproc.config import parse_experiment
from extproc.evaluator.replay import render, replay

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import ab_traffic as at
import simulate_ab_decision as sim

pytestmark = pytest.mark.timeout(120)


def spec_with(**changes: Any) -> Any:
    return parse_experiment({**sim.EXPERIMENT, **changes}).spec


@pytest.mark.parametrize(
    ("truth", "outcome"),
    [(at.BETTER, "ship"), (at.WORSE, "keep"), (at.EQUAL, "inconclusive")],
    ids=["better", "worse", "equal"],
)
def test_an_ab_run_ends_in_the_decision_its_truth_calls_for(truth: at.Truth, outcome: str) -> None:
    spec = spec_with()
    events, signals = at.ab_run(truth, 1)
    res = replay(spec, events, signals=signals)
    assert res.status == "completed"
    assert [d["outcome"] for d in res.decisions] == [outcome]
    complete = res.trajectory[-1]
    assert complete.action == "complete"
    assert complete.elapsed_s >= 590
    text = render(res, spec)
    headline = {"ship": "SHIP THE CANDIDATE", "keep": "KEEP STABLE", "inconclusive": "INCONCLUSIVE"}
    assert f"A/B decision for canary: {headline[outcome]}" in text.splitlines()[-1]
    win = next(m for m in res.decisions[0]["metrics"] if m["metric"] == "judge_win_rate")
    assert win["n_candidate"] > 900  # the judge's verdicts reached the replayed window


def test_an_equal_candidate_is_shipped_at_most_at_half_the_alpha() -> None:
    """200 small runs with equal arms: a wrong "ship" needs the primary's better tail
    (alpha / 2 = 2.5%, 5 of 200 expected); 12 or more would have a chance below 0.5%."""
    spec = spec_with()
    got = [sim.one_run(spec, at.EQUAL, seed, 600, full=False) for seed in range(200)]
    assert got.count("ship") <= 11
    assert got.count("keep") <= 20  # alpha: the primary's worse tail and the secondaries'


def test_min_samples_auto_ends_the_run_once_the_primary_has_its_sample() -> None:
    # a win rate of 60% against 50%, two-sided 5%, power 80%: 194 decisive verdicts
    spec = spec_with(
        rollout={"min_stage_seconds": 0, "min_stage_samples": 10, "cadence_s": 5},
        ab={"primary": "judge_win_rate", "min_samples": "auto", "mde": 0.1},
    )
    events, signals = at.ab_run(at.BETTER, 3)
    res = replay(spec, events, signals=signals, every_checkpoint=True)
    assert res.status == "completed"
    win = next(m for m in res.decisions[0]["metrics"] if m["metric"] == "judge_win_rate")
    assert 194 <= win["n_candidate"] < 300
    waited = [r for p in res.trajectory[:-1] for r in p.reasons if "(for mde 0.1 at power" in r]
    assert waited[-1].startswith("A/B: judge_win_rate samples stable ")
    assert "/194, candidate " in waited[-1]
    assert res.trajectory[-1].elapsed_s < 400  # well before the log's 600 s
