"""Counting open requests as hung: false rollbacks in A/A, and how fast real hangs are caught.

Why: a request counts as hung (a server error and a timeout of its variant) once it is open
longer than max(notice_ms, hang_multiple x stable's p99). In an A/A rollout both variants have
the same slow tail, so the count must not roll back more often than alpha, even with a bound so
tight that 1% of every arm's requests cross it (``--hang-multiple 1``); and a candidate whose
requests hang until the upstream timeout must be rolled back before they time out.

How: recorded logs are generated and replayed through ``extproc analyze``'s ``replay()`` (the
live decision path, with in-flight notices followed at the replay clock). Traffic: 20 req/s,
the candidate at 10% of conversations, latency lognormal (median 800 ms, sigma 0.8, p99 about
5.1 s); every request still open at ``notice_ms`` gets a notice. Hanging requests (detection
row) end at the 300 s upstream timeout. The experiment: the bundled default guardrails and alpha,
stages 2/5/10/25/50/100% of at least 120 s and 50 candidate requests; the log's split is fixed,
so each stage is judged under the observed split (``split="observed"``).

Run: ``.venv/bin/python bench/hangs_aa.py --runs 40`` (about two minutes).
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from extproc.cli import EXAMPLE_EXPERIMENT
from extproc.config import load_experiment, parse_experiment
from extproc.evaluator.replay import replay
from extproc.export import RecordedEvent
from extproc.stats import wilson_interval
from extproc.telemetry.v1.event_pb2 import Assignment, ErrorClass, TelemetryEvent

T0 = 1_767_225_600_000
TIMEOUT_MS = 300_000


def log(seed: int, seconds: int, notice_ms: int, hang: float) -> list[RecordedEvent]:
    rng = np.random.default_rng(seed)
    n = int(rng.poisson(20 * seconds))
    starts = np.sort(rng.uniform(0, seconds * 1000, n)).astype(np.int64) + T0
    cand = rng.random(n) < 0.1
    latency = rng.lognormal(np.log(800), 0.8, n)
    hung = cand & (rng.random(n) < hang)
    out = []
    for i in range(n):
        start, rid = int(starts[i]), f"r{i}"
        variant = "canary" if cand[i] else "stable"
        common = {
            "request_id": rid,
            "experiment": "chat-upgrade",
            "variant": variant,
            "key_hash": f"k{i}",
            "assignment": Assignment.ASSIGNMENT_STICKY,
        }
        ms = TIMEOUT_MS if hung[i] else float(latency[i])
        if ms >= notice_ms:
            notice = TelemetryEvent(
                time_unix_ms=start + notice_ms, duration_ms=notice_ms, in_flight=True, **common
            )
            out.append(RecordedEvent(notice, start + notice_ms + 1))
        ev = TelemetryEvent(time_unix_ms=start, duration_ms=ms, status=200, **common)
        if hung[i]:
            ev.status, ev.error = 504, ErrorClass.ERROR_CLASS_TIMEOUT
        else:
            ev.first_token_ms = ms / 4
            ev.completion_tokens = int(rng.poisson(150))
            ev.refusal = bool(rng.random() < 0.02)
        out.append(RecordedEvent(ev, start + int(ms) + 1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--seconds", type=int, default=900)
    p.add_argument("--notice-ms", type=int, default=1000)
    p.add_argument("--hang-multiple", type=float, default=4)
    p.add_argument("--hang", type=float, default=0.05, help="share of candidate requests hung")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--aa-only", action="store_true", help="only the A/A row")
    ns = p.parse_args()
    doc = load_experiment(EXAMPLE_EXPERIMENT).to_json_dict()
    doc["rollout"] |= {"min_stage_seconds": 120, "min_stage_samples": 50}
    doc["inflight"] = {"notice_ms": ns.notice_ms, "hang_multiple": ns.hang_multiple}
    spec = parse_experiment(doc).spec
    print(
        f"{ns.runs} runs per row, {ns.seconds} s logs, notice_ms {ns.notice_ms}, "
        f"hang_multiple {ns.hang_multiple:g}, seed {ns.seed}\n"
    )
    print(
        "| row | rolled back | 95% CI (Wilson) | before the first timeout "
        "| median candidate requests |"
    )
    print("|---|---|---|---|---|")
    rows = [("A/A", 0.0), (f"{ns.hang:.0%} of candidate requests hang", ns.hang)]
    for name, hang in rows[:1] if ns.aa_only else rows:
        rolled, early, served = 0, 0, []
        for r in range(ns.runs):
            events = log(ns.seed + r, ns.seconds, ns.notice_ms, hang)
            res = replay(spec, events, split="observed")
            if res.status != "rolled_back":
                continue
            rolled += 1
            decided = res.trajectory[-1].time_ms
            timeouts = [e.seen_ms for e in events if e.event.error]
            early += not timeouts or decided < min(timeouts)
            served.append(
                sum(
                    1
                    for e in events
                    if e.event.variant == "canary"
                    and not e.event.in_flight
                    and e.event.time_unix_ms <= decided
                )
            )
        ci = wilson_interval(rolled, ns.runs)
        median = statistics.median(served) if served else "-"
        print(
            f"| {name} | {rolled}/{ns.runs} | {ci.low:.1%} - {ci.high:.1%} | "
            f"{early}/{rolled} | {median} |"
        )


if __name__ == "__main__":
    main()
