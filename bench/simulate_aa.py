"""Simulation evidence for the evaluator's guardrail statistics (``extproc.stats``).

Two questions, on synthetic canary traffic (Poisson arrivals, a fixed candidate share, an
evaluation every ``cadence`` seconds over everything seen so far):

1. A/A: candidate and stable are identical. How often does each guardrail raise a *false*
   rollback at least once over ``looks`` evaluations? The sequential tests should stay at or
   below ``alpha``; the fixed-horizon tests re-checked at every look (what a naive evaluator
   does) show what continuous monitoring costs without them.
2. Detection: how many candidate requests until the sequential guardrail fires when the candidate
   really is worse (p99 latency +30% with the median unchanged; error rate 1% -> 3%)?

Latency is lognormal with an 800 ms median and sigma 0.8 (mean ~1.1 s, p99 ~5.1 s): a heavy
right tail like LLM completions whose length varies. Run:

    .venv/bin/python bench/simulate_aa.py --runs 500 --looks 200 --cadence 5 --alpha 0.05 --seed 1
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from extproc.stats import (
    RunningMoments,
    mean_harm_test,
    proportion_harm_test,
    quantile_difference,
    quantile_harm_test,
    sample_ratio_mismatch,
    sample_size_proportions,
    sequential_sample_ratio_mismatch,
    two_proportion_z_test,
    welch_t_test,
    wilson_interval,
)

MEDIAN_MS = 800.0
SIGMA = 0.8
Z99 = 2.3263478740408408  # standard normal 0.99 quantile
BURN_IN = 100  # observations per arm before the naive fixed-horizon checks may fire


class Buffer:
    """A growable float array: the raw samples an arm has seen (needed for quantiles)."""

    def __init__(self) -> None:
        self.data = np.empty(1024)
        self.n = 0

    def extend(self, values: NDArray[np.float64]) -> None:
        need = self.n + values.size
        if need > self.data.size:
            self.data = np.resize(self.data, max(need, 2 * self.data.size))
        self.data[self.n : need] = values
        self.n = need

    @property
    def values(self) -> NDArray[np.float64]:
        return self.data[: self.n]


@dataclass
class Arm:
    """Everything the evaluator keeps for one variant."""

    latency: Buffer = field(default_factory=Buffer)
    moments: RunningMoments = field(default_factory=RunningMoments)
    errors: int = 0

    @property
    def n(self) -> int:
        return self.latency.n

    def observe(self, latency_ms: NDArray[np.float64], errors: int) -> None:
        self.latency.extend(latency_ms)
        self.moments = self.moments.update(latency_ms)
        self.errors += errors


@dataclass(frozen=True)
class Scenario:
    """How the candidate differs from stable."""

    name: str
    candidate_sigma: float = SIGMA
    candidate_error: float = 0.01
    base_error: float = 0.01


Check = Callable[[Arm, Arm], bool]


def make_checks(alpha: float, share: float) -> dict[str, Check]:
    """Guardrail checks, each True when it would roll back at this look."""
    weights = [1.0 - share, share]

    def ready(c: Arm, t: Arm) -> bool:
        return min(c.n, t.n) >= BURN_IN

    return {
        "latency mean: mSPRT (sequential)": lambda c, t: (
            mean_harm_test(c.moments, t.moments, alpha=alpha).harm
        ),
        "latency mean: Welch p<alpha each look": lambda c, t: (
            ready(c, t)
            and welch_t_test(c.moments, t.moments, alternative="greater", alpha=alpha).p_value
            < alpha
        ),
        "error rate: event-share mixture (sequential)": lambda c, t: (
            proportion_harm_test(c.errors, c.n, t.errors, t.n, alpha=alpha).harm
        ),
        "error rate: z-test p<alpha each look": lambda c, t: (
            ready(c, t)
            and two_proportion_z_test(c.errors, c.n, t.errors, t.n, alternative="greater").p_value
            < alpha
        ),
        "p99: confidence sequences (sequential)": lambda c, t: (
            quantile_harm_test(c.latency.values, t.latency.values, alpha=alpha).harm
        ),
        "p99: fixed order-statistic CI each look": lambda c, t: (
            ready(c, t)
            and quantile_difference(
                c.latency.values, t.latency.values, alternative="greater", alpha=alpha
            ).ci.low
            > 0.0
        ),
        "p99: point estimate > stable +10%": lambda c, t: (
            ready(c, t)
            and (
                (r := quantile_difference(c.latency.values, t.latency.values).relative_estimate)
                is not None
                and r > 0.10
            )
        ),
        "SRM: chi-square p<0.001 each look": lambda c, t: (
            sample_ratio_mismatch([c.n, t.n], weights).mismatch
        ),
        "SRM: sequential (Dirichlet mixture)": lambda c, t: (
            sequential_sample_ratio_mismatch([c.n, t.n], weights).mismatch
        ),
    }


def run_once(
    rng: np.random.Generator,
    scenario: Scenario,
    checks: dict[str, Check],
    looks: int,
    per_look: float,
    share: float,
) -> dict[str, int | None]:
    """One simulated experiment: the candidate request count at each check's first alarm."""
    control, treatment = Arm(), Arm()
    first: dict[str, int | None] = dict.fromkeys(checks)
    for _ in range(looks):
        total = int(rng.poisson(per_look))
        n_t = int(rng.binomial(total, share))
        for arm, n, sigma, err in (
            (control, total - n_t, SIGMA, scenario.base_error),
            (treatment, n_t, scenario.candidate_sigma, scenario.candidate_error),
        ):
            arm.observe(
                MEDIAN_MS * np.exp(sigma * rng.standard_normal(n)), int(rng.binomial(n, err))
            )
        pending = [name for name, hit in first.items() if hit is None]
        for name in pending:
            if checks[name](control, treatment):
                first[name] = treatment.n
        if all(hit is not None for hit in first.values()):
            break
    return first


def percentile(values: list[int], q: float) -> str:
    return f"{np.percentile(values, q):.0f}" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=500, help="A/A experiments simulated")
    parser.add_argument("--looks", type=int, default=200, help="evaluations per A/A experiment")
    parser.add_argument("--cadence", type=float, default=5.0, help="seconds between evaluations")
    parser.add_argument("--rps", type=float, default=20.0, help="total requests per second")
    parser.add_argument("--share", type=float, default=0.05, help="candidate (canary) share")
    parser.add_argument("--alpha", type=float, default=0.05, help="guardrail level")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--detect-runs", type=int, default=200, help="experiments per detection scenario"
    )
    parser.add_argument(
        "--detect-looks", type=int, default=2000, help="evaluations before giving up"
    )
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    per_look = args.rps * args.cadence
    checks = make_checks(args.alpha, args.share)
    started = time.perf_counter()

    print(
        f"A/A: {args.runs} runs x {args.looks} looks, {args.rps:g} req/s, candidate share "
        f"{args.share:g}, a look every {args.cadence:g} s "
        f"(~{args.looks * per_look * args.share:.0f} candidate requests by the last look), "
        f"alpha={args.alpha:g}, seed={args.seed}"
    )
    alarms = dict.fromkeys(checks, 0)
    for _ in range(args.runs):
        first = run_once(rng, Scenario("A/A"), checks, args.looks, per_look, args.share)
        for name, hit in first.items():
            alarms[name] += hit is not None
    print("| check | runs with a false rollback | 95% CI |")
    print("|---|---|---|")
    for name, count in alarms.items():
        ci = wilson_interval(count, args.runs)
        print(f"| {name} | {count / args.runs:.1%} | {ci.low:.1%} - {ci.high:.1%} |")

    tail_sigma = SIGMA + math.log(1.3) / Z99  # p99 x1.3 with the median unchanged
    scenarios = {
        "p99 +30% (median unchanged, mean +10%)": (
            Scenario("p99", candidate_sigma=tail_sigma),
            ["p99: confidence sequences (sequential)", "latency mean: mSPRT (sequential)"],
        ),
        "error rate 1% -> 3%": (
            Scenario("errors", candidate_error=0.03),
            ["error rate: event-share mixture (sequential)"],
        ),
    }
    cand_rps = args.rps * args.share
    print(
        f"\nDetection: {args.detect_runs} runs per scenario, up to {args.detect_looks} looks; "
        f"candidate requests until the first rollback (the candidate gets {cand_rps:g} req/s)"
    )
    print("| scenario | check | detected | median | p90 | median time |")
    print("|---|---|---|---|---|---|")
    for label, (scenario, names) in scenarios.items():
        subset = {name: checks[name] for name in names}
        hits: dict[str, list[int]] = {name: [] for name in names}
        for _ in range(args.detect_runs):
            first = run_once(rng, scenario, subset, args.detect_looks, per_look, args.share)
            for name, hit in first.items():
                if hit is not None:
                    hits[name].append(hit)
        for name in names:
            got = hits[name]
            minutes = f"{np.median(got) / cand_rps / 60:.1f} min" if got else "-"
            print(
                f"| {label} | {name} | {len(got) / args.detect_runs:.0%} | "
                f"{percentile(got, 50)} | {percentile(got, 90)} | {minutes} |"
            )
    fixed = sample_size_proportions(
        0.01,
        0.02,
        alpha=args.alpha,
        power=0.9,
        ratio=args.share / (1 - args.share),
        alternative="greater",
    )
    print(
        f"\nFor reference, a fixed-horizon one-sided z-test (one look) needs {fixed.n_treatment} "
        f"candidate requests for 1% -> 3% at 90% power."
    )
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
