"""Work on recorded data: `export` telemetry, `analyze` (replay the evaluator over it), and
`plan` an experiment file from model metadata."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from extproc import store
from extproc.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    AddVerb,
    add_common,
    err,
    redis_url,
    with_redis,
)
from extproc.config import ConfigError, load_experiment
from extproc.contract import keys


def cmd_export(ns: argparse.Namespace) -> int:
    """Telemetry events as JSON lines (schema: docs/EVALUATOR.md), to a file or stdout."""
    from extproc.telemetry import export

    try:
        since = None if ns.since is None else export.parse_since(ns.since)
    except export.EventLogError as exc:
        err(str(exc))
        return EXIT_USAGE
    if ns.count is not None and ns.count < 1:
        err(f"--count {ns.count}: must be at least 1")
        return EXIT_USAGE
    if ns.signals and (ns.since is not None or ns.count is not None):
        err("--since and --count select events; --signals exports the whole signal stream")
        return EXIT_USAGE

    async def go(out: Any) -> int:
        r = store.connect(redis_url(ns), timeout_s=10)
        try:
            if ns.signals:
                from extproc.evaluator.signal_log import export_signals

                return await export_signals(r, ns.name, out)
            return await export.export(r, ns.name, out, since, ns.count)
        finally:
            await r.aclose()

    async def known(r: aioredis.Redis) -> bool:
        defined = await store.get_definition(r, ns.name) is not None
        return defined or bool(await r.exists(keys.events(ns.name)))

    if not with_redis(ns, known):
        raise ConfigError(ns.name, ["no such experiment in Redis (see `extproc status`)"])
    if ns.output:
        with open(ns.output, "w", encoding="utf-8") as f:
            n = asyncio.run(go(f))
    else:
        n = asyncio.run(go(sys.stdout))
    what = "signals" if ns.signals else "events"
    print(f"exported {n} {what} of {ns.name} to {ns.output or 'stdout'}", file=sys.stderr)
    return EXIT_OK


def cmd_analyze(ns: argparse.Namespace) -> int:
    """Replay the evaluator's decisions over a recorded log (what would the guardrails do?)."""
    from extproc.evaluator.replay import render, replay
    from extproc.evaluator.signal_log import read_signals
    from extproc.telemetry.export import EventLogError, read_jsonl

    exp = load_experiment(ns.config)
    try:
        if ns.cadence is not None and not ns.cadence > 0:
            raise EventLogError(f"--cadence {ns.cadence}: must be a positive number of seconds")
        result = replay(
            exp.spec,
            read_jsonl(ns.events),
            cadence_s=ns.cadence,
            every_checkpoint=ns.every_checkpoint,
            split=ns.split,
            promote_when_ready=ns.promote_when_ready,
            signals=read_signals(ns.signals) if ns.signals else (),
        )
    except EventLogError as exc:
        err(str(exc))
        return EXIT_USAGE
    print(json.dumps(result.to_json(), indent=2) if ns.json else render(result, exp.spec))
    return EXIT_OK


def cmd_plan(ns: argparse.Namespace) -> int:
    """A risk-graded experiment file from the current and the target model's metadata."""
    from extproc.ops import plan

    base, raw = plan.load_base(ns.base) if ns.base else (None, None)
    if ns.error_rate is not None and not 0 < ns.error_rate < 1:
        err(f"--error-rate {ns.error_rate}: stable's error rate, a fraction in (0, 1)")
        return EXIT_USAGE
    current, target = plan.load_meta(ns.current), plan.load_meta(ns.target)
    p = plan.make_plan(current, target, base, raw, ns.error_rate)
    if ns.output:
        Path(ns.output).write_text(p.text, encoding="utf-8")
    else:
        sys.stdout.write(p.text)
    s = p.summary()
    if ns.json:
        print(json.dumps({**s, "output": ns.output}), file=sys.stdout if ns.output else sys.stderr)
    else:
        print(
            f"{s['tier']}: {s['label']} from {s['canary_share']:g}%, "
            f"{s['evaluation']} over {len(s['stages'])} stages"
            + (f" -> {ns.output}" if ns.output else ""),
            file=sys.stderr,
        )
    return EXIT_OK


def cmd_sample_size(ns: argparse.Namespace) -> int:
    """Requests per arm to detect a harm of a guardrail metric (fixed horizon, one-sided)."""
    from extproc.ops.plan import metric_sample_size

    try:
        got = metric_sample_size(
            ns.metric,
            ns.mde,
            baseline=ns.baseline,
            sd=ns.sd,
            relative=ns.relative,
            share=ns.share,
            alpha=ns.alpha,
            power=ns.power,
        )
    except ValueError as exc:
        err(str(exc))
        return EXIT_USAGE
    if ns.json:
        print(json.dumps(got.to_json()))
        return EXIT_OK
    s = got.size
    if got.kind == "win_rate":
        print(
            f"{got.metric}: {got.baseline:g} -> {got.target:g} ({s.alternative}, alpha "
            f"{s.alpha:g}, power {s.power:.0%}, {s.method}, effect size {s.effect_size:+.3f})\n"
            f"{s.n_treatment} decisive judge verdicts (pairs whose judge picked a side; ties "
            "are not counted), whatever the split"
        )
        return EXIT_OK
    what = " (share of requests beyond stable's quantile)" if got.kind == "quantile" else ""
    print(
        f"{got.metric}{what}: {got.baseline:g} -> {got.target:g} ({s.alternative}, "
        f"alpha {s.alpha:g}, power {s.power:.0%}, {s.method}, effect size {s.effect_size:+.3f})\n"
        f"candidate {s.n_treatment} requests, stable {s.n_control} ({got.share:g}% candidate "
        f"share), {s.total} in all\n"
        "a fixed-horizon size: the evaluator's sequential tests, read at every checkpoint and "
        "with alpha split over the gating guardrails, need more"
    )
    return EXIT_OK


def register(add: AddVerb) -> None:
    p = add("export", cmd_export, "telemetry events as JSON lines (for `extproc analyze`)")
    p.add_argument("name")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.add_argument("--since", help="from this time on: ISO 8601 (naive = UTC) or epoch ms")
    p.add_argument("--count", type=int, help="at most this many (without --since: the newest ones)")
    p.add_argument(
        "--signals",
        action="store_true",
        help="the quality signals (judge verdicts, feedback, probes) instead of the events",
    )
    add_common(p)

    p = add("analyze", cmd_analyze, "replay the evaluator's decisions over exported events")
    p.add_argument("events", metavar="EVENTS.jsonl")
    p.add_argument("--config", required=True, help="experiment file whose guardrails to replay")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--signals",
        metavar="SIGNALS.jsonl",
        help="quality signals to replay beside the events (`extproc export NAME --signals`)",
    )
    p.add_argument("--cadence", type=float, help="seconds between checkpoints (default: file's)")
    p.add_argument(
        "--every-checkpoint", action="store_true", help="a trajectory row for every checkpoint"
    )
    p.add_argument(
        "--split",
        choices=("schedule", "observed"),
        default="schedule",
        help="judge the recorded split against the schedule's weights (sample-ratio check, as "
        "live; default) or under the observed split (a log recorded at another split)",
    )
    p.add_argument(
        "--promote-when-ready",
        action="store_true",
        help="promote a stage behind a manual gate as soon as it is ready (default: it holds, "
        "as no operator is there)",
    )

    p = add("plan", cmd_plan, "write a risk-graded experiment file from model metadata")
    p.add_argument("--current", required=True, metavar="META.yaml", help="the model serving now")
    p.add_argument("--target", required=True, metavar="META.yaml", help="the model to roll out")
    p.add_argument("--base", metavar="EXPERIMENT.yaml", help="keep this file's variants, names")
    p.add_argument(
        "--error-rate",
        type=float,
        metavar="RATE",
        help="stable's error rate (0.01): also say how many candidate requests detecting the "
        "tier's error margin takes",
    )
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.add_argument("--json", action="store_true", help="print the plan's summary as JSON")

    p = add(
        "sample-size",
        cmd_sample_size,
        "requests per arm to detect a given harm of a guardrail metric",
    )
    p.add_argument("metric", help="a guardrail metric: error_rate, latency_p99, completion_tokens")
    p.add_argument("--mde", type=float, required=True, help="the harm to detect, positive")
    p.add_argument("--relative", action="store_true", help="--mde is a fraction of --baseline")
    p.add_argument("--baseline", type=float, help="stable's rate (a rate) or mean (a mean)")
    p.add_argument("--sd", type=float, help="the metric's standard deviation (a mean)")
    p.add_argument(
        "--share", type=float, default=50.0, help="candidate percent of traffic (default 50)"
    )
    p.add_argument("--alpha", type=float, default=0.05, help="one-sided (default 0.05)")
    p.add_argument("--power", type=float, default=0.8, help="default 0.8")
    p.add_argument("--json", action="store_true")
