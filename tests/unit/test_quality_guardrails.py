"""Quality-signal guardrails: the win-rate test, attribution in the stage window, the checks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate, stats

from extproc.config import ConfigError, ExperimentSpec, parse_experiment
from extproc.contract.signals import (
    FeedbackSignal,
    JudgeScores,
    JudgeSignal,
    Rubric,
    WatchdogSignal,
)
from extproc.evaluator.guardrails import budget, check_guardrail, initial_evidence
from extproc.evaluator.window import StageWindow, VariantWindow
from extproc.stats import win_rate_harm_test
from extproc.stats.sequential import _mixture_tuning
from extproc.telemetry.v1.event_pb2 import Assignment, TelemetryEvent

pytestmark = pytest.mark.timeout(120)
R = Rubric(accuracy=5, clarity=5, completeness=5)
SCORES = JudgeScores(primary=R, shadow=R)


def test_win_rate_e_value_is_the_mixture_likelihood_ratio() -> None:
    """Cross-check against direct numerical integration with scipy."""
    wins, n, p0, alpha = 30, 80, 0.45, 0.05
    strength = 100 / _mixture_tuning(alpha)
    a, b = p0 * strength, (1 - p0) * strength
    prior = stats.beta(a, b)

    def lr(p: float) -> float:
        return float(np.exp(stats.binom.logpmf(wins, n, p) - stats.binom.logpmf(wins, n, p0)))

    num, _ = integrate.quad(lambda p: lr(p) * prior.pdf(p), 0, p0, limit=200)
    expected = num / prior.cdf(p0)
    got = win_rate_harm_test(wins, n, floor=0.5, margin=0.05, alpha=alpha)
    assert got.e_value == pytest.approx(expected, rel=1e-6)
    assert got.estimate == pytest.approx(0.5 - wins / n)


def test_win_rate_test_is_anytime_valid_at_the_boundary() -> None:
    """Win probability exactly at the limit (45%), a look after every verdict, 400 verdicts."""
    rng = np.random.default_rng(7)
    runs, looks, alpha = 400, 400, 0.05
    alarms = 0
    for _ in range(runs):
        wins = np.cumsum(rng.random(looks) < 0.45)
        for n in range(10, looks + 1, 5):
            if win_rate_harm_test(int(wins[n - 1]), n, margin=0.05, alpha=alpha).harm:
                alarms += 1
                break
    assert alarms / runs <= alpha
    bad = np.cumsum(rng.random(looks) < 0.25)
    assert win_rate_harm_test(int(bad[-1]), looks, margin=0.05, alpha=alpha).harm


def test_signals_land_on_the_variant_that_served() -> None:
    w = StageWindow(started_ms=1000)
    for i, variant in enumerate(("stable", "canary", "canary")):
        w.add(
            TelemetryEvent(
                time_unix_ms=2000,
                variant=variant,
                request_id=f"r{i}",
                key_hash=f"k{i}",
                assignment=Assignment.ASSIGNMENT_STICKY,
            )
        )
    w.add_signal(FeedbackSignal(time_ms=3000, request_id="r1", key_hash=None, value="down"))
    w.add_signal(FeedbackSignal(time_ms=3000, request_id=None, key_hash="k0", value="up"))
    w.add_signal(FeedbackSignal(time_ms=3000, request_id="gone", key_hash=None, value="down"))
    w.add_signal(FeedbackSignal(time_ms=500, request_id="r1", key_hash=None, value="down"))
    for winner in ("shadow", "shadow", "primary", "tie"):
        w.add_signal(
            JudgeSignal(
                time_ms=2000,
                request_id="x",
                primary="stable",
                shadow="canary",
                winner=winner,  # type: ignore[arg-type]
                scores=SCORES,
                consistent=winner != "tie",
            )
        )
    w.add_signal(
        WatchdogSignal(
            time_ms=2000, variant="canary", prompt_id="p", passed=False, checks={}, latency_ms=1
        )
    )
    assert w.of("canary").feedback == {"down": 1}
    assert w.of("stable").feedback == {"up": 1}
    assert w.unattributed == 1  # earlier-stage feedback is ignored, not unattributed
    c = w.of("canary")
    assert (c.judge_wins, c.judge_losses, c.judge_ties) == (2, 1, 1)
    assert (c.probes, c.probe_failures) == (1, 1)
    assert c.summary()["judge_win_rate"] == pytest.approx(2 / 3, abs=1e-4)


def spec_with(guardrail: dict[str, object]) -> ExperimentSpec:
    return parse_experiment(
        {
            "name": "e",
            "salt": "s",
            "stable": "stable",
            "variants": {
                "stable": {"cluster": "a", "weight": 90},
                "canary": {"cluster": "b", "weight": 10},
            },
            "guardrails": [guardrail],
        }
    ).spec


def test_judge_guardrail_needs_max_decrease() -> None:
    with pytest.raises(ConfigError) as err:
        spec_with({"metric": "judge_win_rate", "max_increase": 0.1})
    assert "guardrails.0.max_decrease: required for metric judge_win_rate" in str(err.value)
    assert "guardrails.0.max_increase: not used by metric judge_win_rate" in str(err.value)
    with pytest.raises(ConfigError, match="max_increase: required for metric error_rate"):
        spec_with({"metric": "error_rate"})


@pytest.mark.parametrize(
    ("guardrail", "setup", "status"),
    [
        (
            {"metric": "judge_win_rate", "max_decrease": 0.05, "min_samples": 20},
            {"judge_wins": 30, "judge_losses": 170},
            "fail",
        ),
        (
            {"metric": "judge_win_rate", "max_decrease": 0.05, "min_samples": 20},
            {"judge_wins": 100, "judge_losses": 100},
            "pass",
        ),
        (
            {"metric": "judge_win_rate", "max_decrease": 0.05, "min_samples": 20},
            {"judge_wins": 3, "judge_losses": 10},
            "waiting",
        ),
        (
            {"metric": "watchdog_fail_rate", "max_increase": 0.5, "min_samples": 20},
            {"probes": 60, "probe_failures": 30},
            "fail",
        ),
        (
            {"metric": "feedback_negative_rate", "max_increase": 0.5, "min_samples": 20},
            {"requests": 500, "feedback": {"down": 80}},
            "fail",
        ),
    ],
)
def test_quality_guardrails(
    guardrail: dict[str, object], setup: dict[str, object], status: str
) -> None:
    spec = spec_with(guardrail)
    g = spec.guardrails[0]
    stable = VariantWindow(requests=5000, probes=60, probe_failures=3, feedback={"down": 50})
    cand = VariantWindow(**setup)  # type: ignore[arg-type]
    cand.requests = max(cand.requests, 500)
    check = check_guardrail(g, stable, cand, "canary", budget(spec), initial_evidence(spec, 0))
    assert check.status == status, check.detail
