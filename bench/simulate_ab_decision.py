"""How often the A/B decision ships, keeps stable or stays inconclusive, for a known truth.

Each run draws an A/B run from ``ab_traffic`` (4,000 requests, an even split, judge verdicts
on 30% of the answers, feedback on 20%), judges it with the judge's win rate as the primary
metric and every other metric secondary (``ab.alpha`` 0.05), and counts the decision. By
default a run is one window of all its events and signals handed to ``decision.decide``, the
function the evaluator calls when the run ends; ``--replay`` runs the whole replay loop
(`extproc analyze`) instead, about three times slower, with the same decisions up to the few
signals that arrive after the last checkpoint.

    .venv/bin/python bench/simulate_ab_decision.py --runs 1000 --truth equal --seed 1

Printed: per truth, the share of each decision with a 95% Clopper-Pearson interval.
``--truth slightly-better`` (a 55% win rate, nothing else) checks the sample an inconclusive
decision asks for: 782 decisive verdicts per arm for 80% power, which ``--requests 2930`` gives
on average (30% judged, 10% ties, 1% errors).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ab_traffic as at

from extproc.config import ExperimentSpec, parse_experiment
from extproc.evaluator import decision, machine
from extproc.evaluator.replay import replay

EXPERIMENT = {
    "name": "exp",
    "salt": "s",
    "stable": "stable",
    "strategy": "ab",
    "variants": {
        "stable": {"cluster": "a", "weight": 50},
        "canary": {"cluster": "b", "weight": 50},
    },
    "rollout": {"min_stage_seconds": 590, "min_stage_samples": 100, "cadence_s": 5},
    "guardrails": [{"metric": "error_rate", "max_increase": 1.0}],
    "shadow": {"variant": "canary", "share": 10},
    "capture": {"sample": 10},
    "judge": {"endpoint": "http://judge.invalid/v1", "model": "judge"},
    "ab": {"primary": "judge_win_rate", "alpha": 0.05},
}
TRUTHS = {
    "equal": at.EQUAL,
    "better": at.BETTER,
    "worse": at.WORSE,
    "slightly-better": at.SLIGHTLY_BETTER,
}


def one_run(spec: ExperimentSpec, truth: at.Truth, seed: int, requests: int, full: bool) -> str:
    """The decision of one simulated run ("none" when a replay ended without one)."""
    events, signals = at.ab_run(truth, seed, requests)
    if full:
        res = replay(spec, events, signals=signals)
        return str(res.decisions[0]["outcome"]) if res.decisions else "none"
    window = machine.new_window(spec, min(e.event.time_unix_ms for e in events) / 1000)
    for e in events:
        window.add(e.event)
    for s in signals:
        window.add_signal(s.signal)
    return decision.decide(spec, "canary", window.of("stable"), window.of("canary")).outcome


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--truth", choices=[*TRUTHS, "all"], default="all")
    ap.add_argument("--replay", action="store_true", help="run the whole replay loop per run")
    ns = ap.parse_args()
    spec = parse_experiment(EXPERIMENT).spec
    for name in ["equal", "better", "worse"] if ns.truth == "all" else [ns.truth]:
        counts = Counter(
            one_run(spec, TRUTHS[name], ns.seed * 1_000_003 + i, ns.requests, ns.replay)
            for i in range(ns.runs)
        )
        cells = []
        for outcome in ("ship", "keep", "inconclusive"):
            k = counts[outcome]
            ci = stats.binomtest(k, ns.runs).proportion_ci(method="exact")
            cells.append(f"{outcome} {k / ns.runs:.1%} [{ci.low:.1%}, {ci.high:.1%}]")
        print(f"{name:<7} {ns.runs} runs: " + ", ".join(cells))


if __name__ == "__main__":
    main()
