"""Simulation evidence for the whole evaluator: the real judge and the real transitions.

``bench/simulate_aa.py`` checks the statistics one test at a time. This script checks what users
rely on: the evaluator as it runs, i.e. ``extproc.evaluator.machine`` (the decision path the live
evaluator and `extproc analyze` share) judging a ``StageWindow`` fed with ``TelemetryEvent``
protobufs, every guardrail of the experiment at once with alpha split over guardrails (and, for
the quantile tests, over stages), stage windows restarting at each advance while the e-valued
tests carry their evidence into the next stage, and routing following the decisions (closed
loop: the candidate's share is whatever the machine last set).

Traffic: Poisson arrivals (``--rps``, 20 req/s), one conversation per request, latency lognormal
(median 800 ms, sigma 0.8: p99 about 5.1 s), TTFT lognormal (median 250 ms, sigma 0.5), 1% server
errors, completion tokens Poisson(150), 2% refusals. An event becomes visible to the evaluator
when its request ends (arrival plus latency), as with the sidecar's stream. The evaluator looks
every ``cadence_s`` (5 s) of virtual time. The experiment is the bundled default
(``extproc/data/experiment.yaml``: stages 2, 5, 10, 25, 50, 100%, 300 s and 200 candidate
requests per stage at least, the default guardrails, alpha 0.05).

Questions:

1. A/A (candidate drawn from the same distributions as stable), the default schedule from 2%:
   how often is the candidate rolled back (a false rollback; must be at most alpha) or held?
2. Detection: how many candidate requests are served before a rollback when the candidate's
   p99 is 30% higher (median unchanged), or its error rate 3% instead of 1%, (a) with the
   candidate held at a 5% canary (the default experiment with ``auto_advance: false`` promoted
   once to its 5% stage, so alpha is split exactly as in the default schedule), and (b) on the
   default schedule from 2%, where every advance restarts the stage window and only the
   e-valued tests (error and refusal rates, means) carry evidence across stages.

Run (about 20 minutes on 2 cores; the held p99 rows dominate, as each runs for up to 12 h of
virtual time; ``--runs 100 --detect-runs 6 --max-hours 6`` takes about 4):

    .venv/bin/python bench/simulate_evaluator.py --runs 200 --detect-runs 20 --seed 1
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import yaml

from extproc.cli import EXAMPLE_EXPERIMENT
from extproc.config import ExperimentSpec, parse_experiment
from extproc.evaluator import machine
from extproc.evaluator.judge import budget
from extproc.evaluator.rollout import RolloutState
from extproc.stats import wilson_interval
from extproc.telemetry.v1.event_pb2 import Assignment, ErrorClass, TelemetryEvent

MEDIAN_MS, SIGMA = 800.0, 0.8
TTFT_MS, TTFT_SIGMA = 250.0, 0.5
ERRORS, REFUSALS, TOKENS = 0.01, 0.02, 150
Z99 = 2.3263478740408408  # standard normal 0.99 quantile
T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: virtual time starts here


@dataclass(frozen=True)
class Scenario:
    """How the candidate differs from stable, and where the rollout starts."""

    name: str
    candidate_sigma: float = SIGMA
    candidate_errors: float = ERRORS
    hold_at_5: bool = False  # promote once to the 5% stage and stay there


@dataclass(frozen=True)
class Outcome:
    status: str  # rolled_back, held, final_stage (reached the last stage), capped
    stage: int
    seconds: float  # virtual time at the end of the run
    candidate_served: int  # candidate requests that arrived before the decision
    reasons: tuple[str, ...]
    holds: int


def load_spec(hold_at_5: bool) -> ExperimentSpec:
    doc = yaml.safe_load(EXAMPLE_EXPERIMENT.read_text())
    if hold_at_5:
        doc["rollout"]["auto_advance"] = False
    return parse_experiment(doc, str(EXAMPLE_EXPERIMENT)).spec


class Traffic:
    """Requests of one run: arrivals, variant by the current weights, outcome per scenario."""

    def __init__(self, rng: np.random.Generator, scenario: Scenario, rps: float) -> None:
        self.rng, self.scenario, self.rps = rng, scenario, rps
        self.pending: list[tuple[int, TelemetryEvent]] = []
        self.seq = 0
        self.candidate_arrivals: list[int] = []

    def interval(self, start_ms: int, end_ms: int, share: float) -> None:
        """Requests arriving in [start, end) at candidate share ``share`` (percent)."""
        rng, sc = self.rng, self.scenario
        n = int(rng.poisson(self.rps * (end_ms - start_ms) / 1000))
        arrive = np.sort(rng.integers(start_ms, end_ms, n)).tolist()
        cand = (rng.random(n) < share / 100).tolist()
        u_err, u_ref = rng.random(n).tolist(), rng.random(n).tolist()
        z = rng.standard_normal(n).tolist()
        ttft = (TTFT_MS * np.exp(TTFT_SIGMA * rng.standard_normal(n))).tolist()
        tokens = rng.poisson(TOKENS, n).tolist()
        for i in range(n):
            c = cand[i]
            latency = MEDIAN_MS * math.exp((sc.candidate_sigma if c else SIGMA) * z[i])
            key = str(self.seq)
            self.seq += 1
            if c:
                self.candidate_arrivals.append(arrive[i])
            if u_err[i] < (sc.candidate_errors if c else ERRORS):
                ev = TelemetryEvent(
                    time_unix_ms=arrive[i],
                    variant="canary" if c else "stable",
                    key_hash=key,
                    assignment=Assignment.ASSIGNMENT_STICKY,
                    status=502,
                    error=ErrorClass.ERROR_CLASS_UPSTREAM_5XX,
                )
            else:
                ev = TelemetryEvent(
                    time_unix_ms=arrive[i],
                    variant="canary" if c else "stable",
                    key_hash=key,
                    assignment=Assignment.ASSIGNMENT_STICKY,
                    status=200,
                    headers_ms=ttft[i],
                    first_token_ms=min(ttft[i], latency),
                    duration_ms=latency,
                    completion_tokens=tokens[i],
                    response_bytes=4 * tokens[i] + 200,
                    refusal=u_ref[i] < REFUSALS,
                    answer_chars=4 * tokens[i],
                )
            self.pending.append((arrive[i] + math.ceil(latency), ev))

    def visible(self, now_ms: int) -> Iterable[TelemetryEvent]:
        """Events whose requests ended by ``now_ms`` (the evaluator can read them)."""
        self.pending.sort(key=lambda p: p[0])
        k = 0
        while k < len(self.pending) and self.pending[k][0] <= now_ms:
            k += 1
        ready, self.pending = self.pending[:k], self.pending[k:]
        return (ev for _, ev in ready)


def run(args: tuple[ExperimentSpec, Scenario, int, float, float]) -> Outcome:
    """One rollout from start to rollback, the last stage, or ``max_s`` of virtual time."""
    spec, scenario, seed, rps, max_s = args
    rng = np.random.default_rng(seed)
    traffic = Traffic(rng, scenario, rps)
    cadence_ms = round(spec.rollout.cadence_s * 1000)
    t = machine.start(spec, T0_MS / 1000)
    state: RolloutState = t.state
    weights = dict(t.weights or {})
    if scenario.hold_at_5:
        t = machine.command(spec, state, "promote", "simulation", "hold at 5%", T0_MS / 1000)
        state, weights = t.state, dict(t.weights or weights)
    window = machine.new_window(spec, state.stage_started)
    holds, now = 0, T0_MS
    last = len(spec.rollout.stages) - 1
    while now - T0_MS < max_s * 1000:
        traffic.interval(now, now + cadence_ms, weights["canary"])
        now += cadence_ms
        for ev in traffic.visible(now):
            window.add(ev)
        t = machine.evaluate(spec, state, window, weights, now / 1000)
        state = t.state
        if t.weights is not None:
            weights = dict(t.weights)
        if t.restart_window:
            window = machine.new_window(spec, state.stage_started)
        holds += t.action == "hold"
        if state.status != "running" or (not scenario.hold_at_5 and state.stage == last):
            break
    served = sum(1 for a in traffic.candidate_arrivals if a <= now)
    status: str = state.status
    if status == "running":
        status = "final_stage" if state.stage == last else ("held" if holds else "capped")
    return Outcome(
        status,
        state.stage,
        (now - T0_MS) / 1000,
        served,
        tuple(state.last_reasons),
        holds,
    )


def _pct(values: list[float], q: float, fmt: str = "{:.0f}") -> str:
    return fmt.format(np.percentile(values, q)) if values else "-"


def _many(
    pool: ProcessPoolExecutor, scenario: Scenario, runs: int, seed: int, rps: float, max_s: float
) -> list[Outcome]:
    """``runs`` rollouts of one scenario; the experiment is read once, here, for all of them."""
    spec = load_spec(scenario.hold_at_5)
    jobs = [(spec, scenario, seed * 1_000_003 + i, rps, max_s) for i in range(runs)]
    return list(pool.map(run, jobs, chunksize=max(1, runs // 32)))


def _detection_row(
    spec: ExperimentSpec, label: str, how: str, outs: list[Outcome], max_hours: float
) -> str:
    """One table row; runs that were not rolled back are said, not hidden in the median."""
    hit = [o for o in outs if o.status == "rolled_back"]
    served = [float(o.candidate_served) for o in hit]
    minutes = [o.seconds / 60 for o in hit]
    stages: dict[str, int] = {}
    for o in hit:
        name = f"{spec.rollout.stages[o.stage]:g}%"
        stages[name] = stages.get(name, 0) + 1
    missed = []
    capped = [o.candidate_served for o in outs if o.status == "capped"]
    if capped:
        missed.append(
            f"{len(capped)} still running after {max_hours:g} h "
            f"(~{np.median(capped):.0f} candidate requests)"
        )
    final = sum(o.status == "final_stage" for o in outs)
    if final:
        missed.append(f"{final} reached 100% undetected")
    other = sum(o.status in ("held", "completed") for o in outs)
    if other:
        missed.append(f"{other} held or completed")
    by = sorted({_metric(o) for o in hit})
    return (
        f"| {label} | {how} | {len(hit)}/{len(outs)}{' (' + ', '.join(by) + ')' if by else ''} "
        f"| {'; '.join(missed) or '-'} | {_pct(served, 50)} | {_pct(served, 90)} "
        f"| {_pct(minutes, 50, '{:.0f}')} min "
        f"| {', '.join(f'{k}: {v}' for k, v in stages.items()) or '-'} |"
    )


def _metric(o: Outcome) -> str:
    text = " ".join(o.reasons)
    for key, label in (
        ("latency_p99", "p99"),
        ("ttft_p95", "TTFT p95"),
        ("error rate", "error rate"),
        ("refusal rate", "refusals"),
        ("sample ratio", "SRM"),
    ):
        if key in text:
            return label
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=200, help="A/A rollouts simulated")
    parser.add_argument("--detect-runs", type=int, default=20, help="rollouts per detection row")
    parser.add_argument("--rps", type=float, default=20.0, help="total requests per second")
    parser.add_argument("--max-hours", type=float, default=12.0, help="virtual time cap per run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes")
    parser.add_argument(
        "--rows",
        type=lambda text: set(text.split(",")),
        default=set(),
        help="detection rows to run (default all): p99-held,p99-ramp,errors-held,errors-ramp",
    )
    args = parser.parse_args()
    started = time.perf_counter()
    spec = load_spec(False)
    gated = [g.metric for g in spec.guardrails if g.action in ("rollback", "hold")]
    kw: dict[str, float] = {"rps": args.rps, "max_s": args.max_hours * 3600}
    with ProcessPoolExecutor(args.jobs) as pool:
        print(
            f"Evaluator A/A: {args.runs} rollouts of the default experiment (stages "
            f"{'/'.join(f'{s:g}' for s in spec.rollout.stages)}%, "
            f"{spec.rollout.min_stage_seconds:g} s and {spec.rollout.min_stage_samples} "
            f"candidate requests per stage at least), {args.rps:g} req/s, a checkpoint every "
            f"{spec.rollout.cadence_s:g} s, alpha {spec.rollout.alpha:g} over "
            f"{len(gated)} gating guardrails ({', '.join(gated)}): "
            f"{budget(spec).rollout:.5f} per e-valued check over the rollout, "
            f"{budget(spec).stage:.5f} per quantile check and stage; seed {args.seed}"
        )
        aa = _many(pool, Scenario("A/A"), args.runs, args.seed, **kw)
        rb = sum(o.status == "rolled_back" for o in aa)
        held = sum(o.holds > 0 for o in aa)
        final = [o.seconds for o in aa if o.status == "final_stage"]
        print("\n| outcome | runs | share | 95% CI |")
        print("|---|---|---|---|")
        for label, count in (
            ("false rollback", rb),
            ("held at least once (SRM or a hold guardrail)", held),
            ("reached the last stage (100%)", len(final)),
        ):
            ci = wilson_interval(count, args.runs)
            print(f"| {label} | {count} | {count / args.runs:.1%} | {ci.low:.1%} - {ci.high:.1%} |")
        if rb:
            why: dict[str, int] = {}
            for o in aa:
                if o.status == "rolled_back":
                    why[_metric(o)] = why.get(_metric(o), 0) + 1
            print(f"\nfalse rollbacks by guardrail: {why}")
        print(f"\nmedian time to reach the last stage: {_pct(final, 50, '{:.0f}')} s")

        tail_sigma = SIGMA + math.log(1.3) / Z99  # p99 x1.3, median unchanged
        scenarios = [
            Scenario("p99 +30% (median unchanged)", candidate_sigma=tail_sigma),
            Scenario("error rate 1% -> 3%", candidate_errors=0.03),
        ]
        if args.detect_runs < 1:
            scenarios = []
        print(
            f"\nDetection: {args.detect_runs} rollouts per row, each until a rollback, the last "
            f"stage, or {args.max_hours:g} h of virtual time. Candidate requests served until "
            "the rollback, over the rolled-back runs."
        )
        print(
            "\n| regression | rollout | rolled back | not rolled back | median | p90 "
            "| median time | stage at rollback |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for key, base in zip(("p99", "errors"), scenarios, strict=False):
            for hold, how in ((True, "held at 5%"), (False, "default ramp from 2%")):
                if args.rows and f"{key}-{'held' if hold else 'ramp'}" not in args.rows:
                    continue
                sc = replace(base, hold_at_5=hold)
                outs = _many(pool, sc, args.detect_runs, args.seed + 7, **kw)
                print(_detection_row(spec, sc.name, how, outs, args.max_hours))
    print(f"\n({time.perf_counter() - started:.0f} s, {args.jobs} processes)")


if __name__ == "__main__":
    main()
