"""Does the evaluator catch what it must and leave healthy rollouts alone? One table, every case.

Each row simulates many rollouts of the example experiment (``extproc/data/experiment.yaml``:
stages 2/5/10/25/50/100%, at least 300 s and 200 candidate requests per stage, alpha 0.05) with
traffic from ``bench/canary_traffic.py``. Every rollout runs through ``replay_source``, the loop
`extproc analyze` runs (the real window, judge and machine, with in-flight notices followed at
the replay clock and the split judged against the schedule's weights, as live), and closes the
loop: requests arriving after a checkpoint are routed by the weights it set. A run ends at a
rollback, at completion, or after ``--max-hours`` of virtual time.

Per row: runs, rollbacks, SRM holds, the row's rate with a Clopper-Pearson 95% interval, the
target (from the issue the table answers), pass or fail on the point estimate, and the median
candidate requests served until the decision (the rollback for regressions; the first SRM hold
for the share-mismatch row; the end of the rollout for the other A/A rows).

Run (``--markdown`` rewrites the table between the markers of that file):

    nice -n 10 .venv/bin/python bench/simulate_evaluator.py --runs 40 --jobs 2 --seed 1 \\
        --markdown docs/EVALUATOR.md

``--quick`` is a CI-sized check (3 runs per row, 60 s and 50 candidate requests per stage).
"""

from __future__ import annotations

import argparse
import copy
import re
import resource
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from canary_traffic import Arm, Burst, Drift, Scenario, Sessions, Traffic, p95, p99
from scipy.stats import binomtest

from extproc.config import (
    EXAMPLE_EXPERIMENT,
    ConfigError,
    ExperimentSpec,
    load_experiment,
    parse_experiment,
)
from extproc.evaluator.replay import replay_source

T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: virtual time starts here
START, END = "<!-- simulation:start -->", "<!-- simulation:end -->"
HEAVY = Arm(tail_share=0.05, tail_alpha=1.2)
SHARE_FACTOR = 0.9
TOOL_GUARDRAIL = {
    "metric": "tool_call_rate",
    "direction": "both",
    "max_increase": 0.3,
    "max_decrease": 0.3,
    "action": "rollback",
}


@dataclass(frozen=True)
class Row:
    """One case: its traffic, what counts, and the target.

    ``at_most``: the rollback rate must stay at or below ``target`` (A/A); otherwise at or above.
    ``before_share``: a rollback counts only in a stage whose share is below this.
    """

    name: str
    scenario: Scenario
    target: float
    at_most: bool = False
    before_share: float | None = None
    guardrails: tuple[dict[str, Any], ...] = ()
    hold_is_decision: bool = False  # the SRM row: its decision is the first hold
    max_s: float | None = None  # a shorter cap than the command's

    @property
    def target_text(self) -> str:
        sign = "≤" if self.at_most else "≥"
        where = f" before {self.before_share:g}%" if self.before_share else ""
        return f"{sign} {self.target:.0%}{where}"


def _rows() -> list[Row]:
    base = Arm()
    return [
        Row("A/A plain", Scenario(), 0.05, at_most=True),
        Row("A/A shared burst (60 s, both variants)", Scenario(burst=Burst()), 0.05, True),
        Row("A/A clustered sessions", Scenario(sessions=Sessions()), 0.05, True),
        Row("A/A drift", Scenario(drift=Drift()), 0.05, True),
        Row("A/A heavy tails", Scenario(stable=HEAVY, candidate=HEAVY), 0.05, True),
        Row(
            f"A/A share mismatch (candidate at {SHARE_FACTOR:g} x its weight)",
            Scenario(share_factor=SHARE_FACTOR),
            0.05,
            True,
            hold_is_decision=True,
            max_s=3600,  # a held rollout never ends: an hour covers a whole A/A rollout
        ),
        Row(
            "hanging candidate (5% of requests)",
            Scenario(candidate=replace(base, hang_rate=0.05)),
            0.95,
        ),
        Row(
            "p99 +30%",
            Scenario(candidate=replace(base, latency_shift=p99(1.3))),
            0.90,
            before_share=50,
        ),
        Row("p99 +60%", Scenario(candidate=replace(base, latency_shift=p99(1.6))), 0.99),
        Row("TTFT p95 +40%", Scenario(candidate=replace(base, ttft_shift=p95(1.4))), 0.90),
        Row("errors 1% → 3%", Scenario(candidate=replace(base, error_rate=0.03)), 0.95),
        Row("refusals 2% → 6%", Scenario(candidate=replace(base, refusal_rate=0.06)), 0.95),
        Row(
            "tool-call rate halved (30% → 15%)",
            Scenario(candidate=replace(base, tool_call_rate=0.15)),
            0.90,
            guardrails=(TOOL_GUARDRAIL,),
        ),
    ]


@dataclass(frozen=True)
class Settings:
    stage_seconds: float | None  # None: the example's
    stage_samples: int | None
    max_s: float


def make_spec(row: Row, settings: Settings) -> ExperimentSpec:
    """The example experiment, the row's extra guardrails, the stage minimums if overridden.

    Raises ConfigError when this evaluator does not know a guardrail the row needs."""
    doc = copy.deepcopy(load_experiment(EXAMPLE_EXPERIMENT).to_json_dict())
    if settings.stage_seconds is not None:
        doc["rollout"]["min_stage_seconds"] = settings.stage_seconds
    if settings.stage_samples is not None:
        doc["rollout"]["min_stage_samples"] = settings.stage_samples
    doc["guardrails"] = [*doc["guardrails"], *row.guardrails]
    return parse_experiment(doc, str(EXAMPLE_EXPERIMENT)).spec


@dataclass(frozen=True)
class Outcome:
    status: str  # rolled_back, completed, running (the time cap)
    share: float  # the candidate's weight in the stage the run ended in
    srm_hold_ms: int | None  # first hold for a sample-ratio mismatch
    candidate_at_end: int
    candidate_at_srm: int | None
    failed: tuple[str, ...]  # metrics whose checks failed at the rollback


def run_one(row: Row, settings: Settings, seed: int) -> Outcome:
    """One closed-loop rollout through ``replay_source``."""
    spec = make_spec(row, settings)
    cand = next(v for v in spec.variants if v != spec.stable)
    traffic = Traffic(
        row.scenario,
        seed,
        start_ms=T0_MS,
        experiment=spec.name,
        stable=spec.stable,
        candidate=cand,
        notice_ms=spec.inflight.notice_ms,
        timeout_ms=round(spec.envoy.request_timeout_s * 1000),
    )
    max_s = settings.max_s if row.max_s is None else min(row.max_s, settings.max_s)
    res = replay_source(spec, traffic, T0_MS, T0_MS + round(max_s * 1000))
    srm = next(
        (p for p in res.trajectory if p.action == "hold" and "sample ratio" in " ".join(p.reasons)),
        None,
    )
    last = res.trajectory[-1]
    prior = res.trajectory[-2].weights if len(res.trajectory) > 1 else last.weights
    failed = tuple(
        sorted({c["metric"] for c in last.checks if c.get("status") == "fail"})
        if res.status == "rolled_back"
        else ()
    )
    return Outcome(
        status=res.status,
        share=(prior if res.status == "rolled_back" else last.weights).get(cand, 0.0),
        srm_hold_ms=None if srm is None else srm.time_ms,
        candidate_at_end=traffic.candidate_requests,
        candidate_at_srm=None if srm is None else traffic.candidate_by_checkpoint[srm.time_ms],
        failed=failed,
    )


def _task(args: tuple[int, Row, Settings, int]) -> tuple[int, Outcome | str]:
    i, row, settings, seed = args
    try:
        return i, run_one(row, settings, seed)
    except ConfigError as e:  # this evaluator lacks a guardrail the row needs
        return i, f"n/a: this evaluator refuses {e.problems[0].split(':')[0]}"


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval for k successes in n trials."""
    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


@dataclass
class Summary:
    row: Row
    outcomes: list[Outcome] = field(default_factory=list)
    problem: str = ""

    def counted(self, o: Outcome) -> bool:
        if o.status != "rolled_back":
            return False
        return self.row.before_share is None or o.share < self.row.before_share

    def line(self) -> str:
        r, outs = self.row, self.outcomes
        if self.problem:
            return f"| {r.name} | - | - | - | - | - | {r.target_text} | {self.problem} | - |"
        n = len(outs)
        k = sum(map(self.counted, outs))
        rolled = sum(o.status == "rolled_back" for o in outs)
        srm = sum(o.srm_hold_ms is not None for o in outs)
        low, high = clopper_pearson(k, n)
        rate = k / n
        ok = rate <= r.target if r.at_most else rate >= r.target
        if r.hold_is_decision:
            cost = [o.candidate_at_srm for o in outs if o.candidate_at_srm is not None]
        elif r.at_most:
            cost = [o.candidate_at_end for o in outs if o.status != "running"]
        else:
            cost = [o.candidate_at_end for o in outs if self.counted(o)]
        median = f"{statistics.median(cost):.0f}" if cost else "-"
        by = sorted({m for o in outs if o.status == "rolled_back" for m in o.failed})
        why = f" ({', '.join(by)})" if by else ""
        return (
            f"| {r.name} | {n} | {rolled}{why} | {srm} | {rate:.0%} | "
            f"{low:.0%} to {high:.0%} | {r.target_text} | {'pass' if ok else 'FAIL'} | {median} |"
        )


HEADER = (
    "| case | runs | rolled back (failing checks) | held by SRM | rate | 95% CI (Clopper-Pearson) "
    "| target | result | median candidate requests to the decision |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def simulate(
    rows: Sequence[Row],
    settings: Settings,
    runs: int,
    seed: int,
    jobs: int,
) -> list[Summary]:
    """``runs`` rollouts per row, all rows' runs spread over ``jobs`` processes."""
    tasks = [
        (i, row, settings, seed * 1_000_003 + 1009 * i + r)
        for i, row in enumerate(rows)
        for r in range(runs)
    ]
    summaries = [Summary(row) for row in rows]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_task, tasks, chunksize=1))
    else:
        results = list(map(_task, tasks))
    for i, out in results:
        if isinstance(out, str):
            summaries[i].problem = out
        else:
            summaries[i].outcomes.append(out)
    return summaries


def describe(spec: ExperimentSpec, settings: Settings) -> str:
    """The generator's parameters and the rollout, stated from the code's own values."""
    a, s, b, d, r = Arm(), Sessions(), Burst(), Drift(), spec.rollout
    return "\n".join(
        [
            "Traffic (`bench/canary_traffic.py`), both variants unless a row changes it:",
            "",
            f"- arrivals: Poisson, {Scenario().rps:g} req/s, one conversation per request;",
            f"- latency: lognormal (median {a.latency_median_ms:g} ms, sigma "
            f"{a.latency_sigma:g}) mixed with a Pareto tail for {a.tail_share:.0%} of requests "
            f"(from {a.tail_scale_ms:g} ms, shape {a.tail_alpha:g}); TTFT lognormal (median "
            f"{a.ttft_median_ms:g} ms, sigma {a.ttft_sigma:g});",
            f"- per request: {a.error_rate:.0%} server errors (a fast 502), {a.refusal_rate:.0%} "
            f"refusals, {a.tool_call_rate:.0%} tool calls, {a.empty_rate:.1%} empty answers, "
            f"completion tokens Poisson({a.tokens_mean:g});",
            f"- a request still open at `inflight.notice_ms` ({spec.inflight.notice_ms} ms) gets "
            "one in-flight notice, then its final event when it ends; a hanging request ends at "
            f"the upstream timeout ({spec.envoy.request_timeout_s:g} s) with a timeout error;",
            "- p99 +x%: only quantiles above p95 are scaled, by exactly 1 + x at p99 (p50 "
            "unchanged); TTFT p95 +x%: quantiles above p80, by exactly 1 + x at p95;",
            f"- heavy tails: {HEAVY.tail_share:.0%} Pareto with shape {HEAVY.tail_alpha:g};",
            f"- shared burst: {b.seconds:g} s from a uniform time in {b.window_s[0]:g} to "
            f"{b.window_s[1]:g} s, both variants at {b.error_rate:.0%} errors, latency and TTFT "
            f"x{b.latency_factor:g};",
            f"- drift: load x(1 + {d.load_amplitude:g} sin) and latency x(1 + "
            f"{d.latency_amplitude:g} sin, a quarter period later) over a "
            f"{d.period_s / 3600:g} h cycle, both variants;",
            f"- clustered sessions: about {s.mean_requests:g} requests per session, "
            f"{s.mean_gap_s:g} s apart on average, one sticky key per session; per session a "
            f"latency factor exp N(0, {s.latency_sigma:g}^2), a TTFT factor exp N(0, "
            f"{s.ttft_sigma:g}^2), log-odds shifts N(0, {s.logit_sd:g}^2) of errors and tool "
            f"calls and N(0, {s.refusal_logit_sd:g}^2) of refusals;",
            f"- share mismatch: the candidate serves {SHARE_FACTOR:g} x its weight.",
            "",
            f"Rollout: the example experiment, stages "
            f"{'/'.join(f'{x:g}' for x in r.stages)}%, at least {r.min_stage_seconds:g} s and "
            f"{r.min_stage_samples} candidate requests per stage, a checkpoint every "
            f"{r.cadence_s:g} s, alpha {r.alpha:g}, its guardrails (the tool-call row adds "
            f"`{TOOL_GUARDRAIL}`). A run ends at a rollback, at completion, or after "
            f"{settings.max_s / 3600:g} h of virtual time. A rollback in an A/A row is a false "
            "rollback; an SRM hold is reported, not counted as one.",
        ]
    )


def render(
    summaries: Sequence[Summary],
    command: str,
    spec: ExperimentSpec,
    settings: Settings,
    cpu_s: float,
) -> str:
    lines = [
        describe(spec, settings),
        "",
        f"`{command}` (at commit {_commit()}; {cpu_s:.0f} s of CPU):",
        "",
        HEADER,
        *(s.line() for s in summaries),
    ]
    return "\n".join(lines)


def _cpu_s() -> float:
    """CPU seconds of this process and its finished workers: the cost on a shared machine."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _commit() -> str:
    """The commit the table was made at, ``+`` when its code (bench/, extproc/) had changes."""
    git = ["git", "-C", str(Path(__file__).resolve().parents[1])]
    dirty = [*git, "status", "--porcelain", "--untracked-files=no", "--", "bench", "extproc"]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(dirty, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+" if changed else "")


def write_markdown(path: Path, body: str) -> None:
    """Replace the text between the simulation markers of ``path`` with ``body``."""
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path}: no {START} ... {END} markers to write the table between")
    path.write_text(pattern.sub(lambda _: f"{START}\n{body}\n{END}", text), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=int, default=40, help="rollouts per row")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2, help="worker processes")
    p.add_argument("--max-hours", type=float, default=2.0, help="virtual time cap per run")
    p.add_argument("--rows", default="", help="comma-separated substrings of row names")
    p.add_argument("--stage-seconds", type=float, help="override min_stage_seconds")
    p.add_argument("--stage-samples", type=int, help="override min_stage_samples")
    p.add_argument("--quick", action="store_true", help="3 runs, 60 s / 50 requests per stage")
    p.add_argument("--markdown", type=Path, help="rewrite the table between markers in FILE")
    ns = p.parse_args(argv)
    if ns.quick:
        ns.runs = 3
        ns.stage_seconds = ns.stage_seconds or 60
        ns.stage_samples = ns.stage_samples or 50
    settings = Settings(ns.stage_seconds, ns.stage_samples, ns.max_hours * 3600)
    wanted = [w.strip().lower() for w in ns.rows.split(",") if w.strip()]
    rows = [r for r in _rows() if not wanted or any(w in r.name.lower() for w in wanted)]
    summaries = simulate(rows, settings, ns.runs, ns.seed, ns.jobs)
    spec = make_spec(Row("", Scenario(), 0.0), settings)
    command = "nice -n 10 .venv/bin/python bench/simulate_evaluator.py " + shlex.join(
        sys.argv[1:] if argv is None else list(argv)
    )
    body = render(summaries, command, spec, settings, _cpu_s())
    print(body)
    if ns.markdown:
        write_markdown(ns.markdown, body)


if __name__ == "__main__":
    main()
