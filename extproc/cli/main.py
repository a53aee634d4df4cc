"""The `extproc` command: a thin layer of verbs over library functions that return exit codes.

Exit codes scripts can rely on: 0 success, 1 operational failure (a part did not start, Redis
unreachable), 2 bad usage or bad input (invalid experiment file, unknown variant).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from extproc import store
from extproc.config import ConfigError, Experiment, load_experiment
from extproc.contract import keys
from extproc.dev import stack
from extproc.logs import FORMATS, LogSetup

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
T = TypeVar("T")
EXAMPLE_EXPERIMENT = Path(__file__).parent.parent / "data" / "experiment.yaml"
DEMO_EXPERIMENT = Path(__file__).parent.parent / "data" / "demo-experiment.yaml"


def _err(msg: str) -> None:
    print(f"extproc: {msg}", file=sys.stderr)


def _experiment(path: str | None) -> tuple[Experiment, Path]:
    p = Path(path) if path else EXAMPLE_EXPERIMENT
    return load_experiment(p), p


def _stack_state(ns: argparse.Namespace) -> dict[str, Any]:
    """The local stack's recorded state while any of its processes runs, else {}.

    A state file whose processes are all gone (a reboot, a kill) describes nothing: it is
    reported once on stderr and ignored, so a verb never silently talks to a dead stack's Redis.
    """
    state_dir = getattr(ns, "state_dir", None)
    if state_dir is None:
        return {}
    st = stack.load_state(Path(state_dir))
    if not st:
        return {}
    if not stack.running(st):
        if not getattr(ns, "_stale_reported", False):
            _err(
                f"ignoring {Path(state_dir) / stack.STATE_FILE}: none of the processes it "
                "records is running (`extproc down` clears it, `extproc up` starts a new stack)"
            )
            ns._stale_reported = True
        return {}
    return st


def _redis_url(ns: argparse.Namespace) -> str:
    """--redis-url, else $REDIS_URL, else the running local stack's, else the default: an
    explicit choice always wins over what a state file remembers."""
    if getattr(ns, "redis_url", None):
        return str(ns.redis_url)
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"]
    st = _stack_state(ns)
    if st.get("endpoints", {}).get("redis"):
        return str(st["endpoints"]["redis"])
    return store.DEFAULT_REDIS_URL


def _with_redis(ns: argparse.Namespace, fn: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    """Run one async Redis call for a verb, with a client that is always closed."""

    async def go() -> T:
        r = store.connect(_redis_url(ns))
        try:
            return await fn(r)
        finally:
            await r.aclose()

    return asyncio.run(go())


# --- verbs -----------------------------------------------------------------------------------


def cmd_check(ns: argparse.Namespace) -> int:
    from extproc.quality.watchdog import load_probes, probe_file

    exp, p = _experiment(ns.experiment)
    probes = probe_file(exp)
    if probes is not None:
        load_probes(probes)
    print(f"{p}: ok: experiment {exp.name!r}, variants {exp.file_weights()}, stable {exp.stable!r}")
    return EXIT_OK


def cmd_envoy_config(ns: argparse.Namespace) -> int:
    from extproc.envoyconf.bootstrap import EnvoyLayout, SidecarTls, render

    exp, _ = _experiment(ns.experiment)
    tls = None
    if ns.sidecar_ca:
        try:
            tls = SidecarTls(
                ca=ns.sidecar_ca,
                server_name=ns.sidecar_server_name,
                cert=ns.sidecar_client_cert,
                key=ns.sidecar_client_key,
            )
        except ValueError as err:
            _err(f"--sidecar-client-cert/--sidecar-client-key: {err}")
            return EXIT_USAGE
    elif ns.sidecar_server_name or ns.sidecar_client_cert or ns.sidecar_client_key:
        _err("the --sidecar-* TLS options need --sidecar-ca")
        return EXIT_USAGE
    layout = EnvoyLayout(
        listen_host=ns.listen_host,
        listen_port=ns.listen_port,
        admin_port=ns.admin_port,
        sidecar=tuple(ns.sidecar or ["127.0.0.1:50051"]),
        sidecar_tls=tls,
    )
    text = render(exp, layout)
    if ns.output:
        Path(ns.output).write_text(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_serve(ns: argparse.Namespace) -> int:
    from extproc.dataplane import workers
    from extproc.dataplane.server import Sidecar, SidecarSettings, TlsFiles

    exp, _ = _experiment(ns.experiment)
    if (ns.tls_cert is None) != (ns.tls_key is None) or (ns.tls_client_ca and not ns.tls_cert):
        _err("--tls-cert and --tls-key go together (and --tls-client-ca needs them)")
        return EXIT_USAGE
    problem = workers.problem(ns.listen, ns.workers)
    if problem:
        _err(problem)
        return EXIT_USAGE
    settings = SidecarSettings(
        listen=ns.listen,
        redis_url=_redis_url(ns),
        instance=ns.instance,
        metrics=ns.metrics,
        tls=TlsFiles(ns.tls_cert, ns.tls_key, ns.tls_client_ca) if ns.tls_cert else None,
        max_capture_bytes=ns.capture_buffer_mb * 1024 * 1024,
    )
    if ns.workers > 1:
        return workers.Supervisor(exp, settings, ns.workers, _log_setup(ns)).run()
    asyncio.run(Sidecar(exp, settings).run())
    return EXIT_OK


def cmd_evaluate(ns: argparse.Namespace) -> int:
    from extproc.evaluator.service import serve

    exp, _ = _experiment(ns.experiment)
    asyncio.run(serve(exp, _redis_url(ns), ns.instance, ns.metrics))
    return EXIT_OK


def cmd_quality(ns: argparse.Namespace) -> int:
    """The judge, the watchdog and the feedback endpoint (extproc/quality/worker.py)."""
    from extproc.quality import feedback
    from extproc.quality import worker as quality_worker

    exp, _ = _experiment(ns.experiment)
    settings = quality_worker.QualitySettings(
        redis_url=_redis_url(ns),
        listener=ns.listener,
        feedback_listen=ns.feedback_listen,
        feedback_token=os.environ.get(feedback.TOKEN_ENV, ""),
        feedback_insecure=ns.feedback_insecure,
    )
    prepared = quality_worker.prepare(exp, settings)
    asyncio.run(quality_worker.serve(exp, settings, prepared))
    return EXIT_OK


def cmd_command(ns: argparse.Namespace) -> int:
    """pause | resume | promote | rollback | abort: record intent; the evaluator acts on it."""
    from extproc.evaluator.rollout import send_command

    async def go() -> str:
        r = store.connect(_redis_url(ns))
        try:
            if await store.get_definition(r, ns.name) is None:
                raise ConfigError(ns.name, ["no such experiment in Redis (see `extproc status`)"])
            return await send_command(r, ns.name, ns.action, ns.actor, ns.reason)
        finally:
            await r.aclose()

    entry = asyncio.run(go())
    if ns.json:
        print(json.dumps({"experiment": ns.name, "command": ns.action, "id": entry}))
    else:
        print(
            f"{ns.name}: {ns.action} recorded ({entry}); the evaluator applies it on its next tick"
        )
    return EXIT_OK


def cmd_log(ns: argparse.Namespace) -> int:
    from extproc.evaluator.rollout import read_audit

    records = _with_redis(ns, lambda r: read_audit(r, ns.name, ns.count))
    if ns.json:
        print(json.dumps(records, indent=2))
        return EXIT_OK
    for rec in records:
        when = time.strftime("%H:%M:%S", time.localtime(rec["time"]))
        w = ", ".join(f"{k} {v:g}%" for k, v in (rec.get("weights") or {}).items())
        print(f"{when}  {rec['action']:<9} stage {rec['stage'] + 1}  [{w}]  by {rec['actor']}")
        for reason in rec.get("reasons", []):
            print(f"          {reason}")
    return EXIT_OK


def cmd_export(ns: argparse.Namespace) -> int:
    """Telemetry events as JSON lines (schema: docs/EVALUATOR.md), to a file or stdout."""
    from extproc.contract import keys
    from extproc.telemetry import export

    try:
        since = None if ns.since is None else export.parse_since(ns.since)
    except export.EventLogError as err:
        _err(str(err))
        return EXIT_USAGE
    if ns.count is not None and ns.count < 1:
        _err(f"--count {ns.count}: must be at least 1")
        return EXIT_USAGE

    async def go(out: Any) -> int:
        r = store.connect(_redis_url(ns), timeout_s=10)
        try:
            return await export.export(r, ns.name, out, since, ns.count)
        finally:
            await r.aclose()

    async def known() -> bool:
        r = store.connect(_redis_url(ns))
        try:
            defined = await store.get_definition(r, ns.name) is not None
            return defined or bool(await r.exists(keys.events(ns.name)))
        finally:
            await r.aclose()

    if not asyncio.run(known()):
        raise ConfigError(ns.name, ["no such experiment in Redis (see `extproc status`)"])
    if ns.output:
        with open(ns.output, "w", encoding="utf-8") as f:
            n = asyncio.run(go(f))
    else:
        n = asyncio.run(go(sys.stdout))
    print(f"exported {n} events of {ns.name} to {ns.output or 'stdout'}", file=sys.stderr)
    return EXIT_OK


def cmd_analyze(ns: argparse.Namespace) -> int:
    """Replay the evaluator's decisions over a recorded log (what would the guardrails do?)."""
    from extproc.evaluator.replay import render, replay
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
        )
    except EventLogError as err:
        _err(str(err))
        return EXIT_USAGE
    print(json.dumps(result.to_json(), indent=2) if ns.json else render(result, exp.spec))
    return EXIT_OK


def cmd_plan(ns: argparse.Namespace) -> int:
    """A risk-graded experiment file from the current and the target model's metadata."""
    from extproc.ops import plan

    base, raw = plan.load_base(ns.base) if ns.base else (None, None)
    p = plan.make_plan(plan.load_meta(ns.current), plan.load_meta(ns.target), base, raw)
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


def cmd_pairs(ns: argparse.Namespace) -> int:
    from extproc.ops.status import recent_pairs

    pairs = _with_redis(ns, lambda r: recent_pairs(r, ns.name, ns.count))
    if ns.json:
        print(json.dumps(pairs, indent=2))
        return EXIT_OK
    for p in pairs:
        print(f"== {p['request_id']}")
        if "primary" in p and p["primary"].get("prompt"):
            print(f"   prompt: {p['primary']['prompt'][:300]}")
        for role in ("primary", "shadow"):
            side = p.get(role)
            if side:
                print(
                    f"   {role:<8}({side['variant']}, {side['status']}): "
                    f"{(side.get('answer') or '')[:300]}"
                )
        if p.get("judge"):
            j = p["judge"]
            agreed = "both orders agree" if j["consistent"] else "orders disagree"
            print(f"   judge:   {j['winner']} ({agreed}; {j['model']})")
    return EXIT_OK


def cmd_top(ns: argparse.Namespace) -> int:
    """A live per-variant table; ``--once`` prints one frame (exit 1 if there is no experiment)."""
    from extproc.ops import top

    if ns.once:
        doc = asyncio.run(_status_doc(ns))
        if doc is None:
            _err("no experiment found in Redis: is the stack up (`extproc up`)?")
            return EXIT_FAIL
        print(top.render_for(doc, sys.stdout))
        return EXIT_OK
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(top.live(lambda: _status_doc(ns), interval=ns.interval, stdin=sys.stdin))
    return EXIT_OK


def cmd_dashboard(ns: argparse.Namespace) -> int:
    """The web dashboard; actions need --token, else $EXTPROC_DASHBOARD_TOKEN, else a new one."""
    from extproc.ops.dashboard import TOKEN_ENV, server

    token = ns.token or os.environ.get(TOKEN_ENV) or None
    server.run(_redis_url(ns), ns.host, ns.port, token)
    return EXIT_OK


def cmd_mock_model(ns: argparse.Namespace) -> int:
    from extproc.dev import mockmodel

    behaviour = mockmodel.behaviour_from_args(ns)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(mockmodel.serve(ns.host, ns.port, behaviour))
    return EXIT_OK


def cmd_up(ns: argparse.Namespace) -> int:
    exp, p = _experiment(ns.experiment)
    opts = stack.UpOptions(
        experiment=exp,
        experiment_path=p.resolve(),
        state_dir=Path(ns.state_dir),
        mock_models=ns.mock_models,
        auto_ports=ns.ports == "auto",
        ports=stack.Ports(
            listener=ns.listen_port,
            admin=ns.admin_port,
            sidecar=ns.sidecar_port,
            redis=ns.redis_port,
            dashboard=ns.dashboard_port,
        ),
        redis_url=ns.redis_url or os.environ.get("REDIS_URL") or None,
    )
    state = stack.up(opts)
    if ns.json:
        print(json.dumps(state, indent=2))
    else:
        ep = state["endpoints"]
        print(f"extproc stack is up (state in {ns.state_dir}/)")
        print(f"  listener   {ep['listener']}   <- send OpenAI requests here")
        print(f"  redis      {stack.redacted(ep['redis'])}")
        print(f"  sidecar    {ep['sidecar']}")
        print(f"  feedback   {ep['feedback']}   <- POST user feedback here, with")
        print(f"             Authorization: Bearer {state['feedback_token']}")
        print(f"  dashboard  {stack.dashboard_url(state)}")
        for v, url in ep.get("models", {}).items():
            print(f"  model      {url}   ({v} stand-in)")
        print("Try:  extproc status   |   extproc down")
    return EXIT_OK


DEMO_MODELS = {
    "stable": [
        "--latency-ms",
        "40",
        "--latency-jitter-ms",
        "15",
        "--tokens-per-s",
        "400",
        "--completion-tokens",
        "60",
    ],
    "canary": [
        "--latency-ms",
        "45",
        "--latency-jitter-ms",
        "15",
        "--tokens-per-s",
        "400",
        "--completion-tokens",
        "70",
    ],
}


def cmd_demo(ns: argparse.Namespace) -> int:
    from extproc.dev import demo

    exp, p = _experiment(ns.experiment or str(DEMO_EXPERIMENT))
    print("Starting the local stack: Redis, Envoy 1.40, the ext_proc sidecar, the evaluator and")
    print("two OpenAI-compatible model stand-ins (stable and canary).")
    opts = stack.UpOptions(
        experiment=exp,
        experiment_path=p.resolve(),
        state_dir=Path(ns.state_dir),
        mock_models=True,
        auto_ports=ns.ports == "auto",
        redis_url=os.environ.get("REDIS_URL") or None,
        mock_args=DEMO_MODELS,
    )
    state = stack.up(opts)
    ep = state["endpoints"]
    print(f"  listener {ep['listener']}   (state and logs in {ns.state_dir}/)")
    print(f"  dashboard {stack.dashboard_url(state)}   <- open it to watch the rollout")
    stages = ", ".join(f"{s:g}%" for s in exp.spec.rollout.stages)
    story = (
        "the candidate degrades at 25% and the evaluator rolls it back"
        if ns.scenario == "regression"
        else "a healthy candidate is promoted to 100%"
    )
    print(
        f"\nCanary rollout of {exp.name!r} through {stages} "
        f"(at least {exp.spec.rollout.min_stage_seconds:g}s per stage); {story}."
    )
    print("Multi-turn chat traffic runs meanwhile. Decisions as the evaluator takes them:\n")
    end = asyncio.run(
        demo.rollout(
            ep["listener"], ep["redis"], exp.name, ep["models"]["canary"], ns.scenario, ns.limit
        )
    )
    ns.redis_url = ep["redis"]
    ns.name, ns.window, ns.json = exp.name, 20_000, False
    print(f"\nRollout ended: {end}. Per-variant figures (extproc status):\n")
    cmd_status(ns)
    print(
        "\nThe stack is still running. Explore it with `extproc status`, `extproc log "
        f"{exp.name}`,\n`extproc pairs {exp.name}`; stop it with `extproc down`."
    )
    expected = "rolled_back" if ns.scenario == "regression" else "completed"
    return EXIT_OK if end == expected else EXIT_FAIL


def cmd_down(ns: argparse.Namespace) -> int:
    stopped = stack.down(Path(ns.state_dir))
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    return EXIT_OK


def _render_status(doc: dict[str, Any]) -> str:
    from extproc.ops import status

    lines = [f"experiment {doc['experiment']}  (stable: {doc.get('stable')})"]
    routing = doc.get("routing") or {}
    if routing:
        w = ", ".join(f"{k} {v:g}%" for k, v in routing["weights"].items())
        lines.append(f"weights    {w}   (version {routing['version']}: {routing['reason']})")
    if doc.get("endpoints", {}).get("listener"):
        lines.append(f"listener   {doc['endpoints']['listener']}")
    if doc.get("endpoints", {}).get("feedback"):
        token = doc.get("feedback_token")
        auth = f"   (Authorization: Bearer {token})" if token else ""
        lines.append(f"feedback   {doc['endpoints']['feedback']}{auth}")
    if doc.get("dashboard_url"):
        lines.append(f"dashboard  {doc['dashboard_url']}")
    lines += _down_lines(doc.get("stack"))
    ro = doc.get("rollout")
    if ro:
        lines.append(
            f"rollout    {ro['status']}, stage {ro['stage'] + 1} ({ro['strategy']}); "
            f"last: {ro['last_action'] or '-'} {'; '.join(ro['last_reasons'])}"
        )
    lines += status.figure_lines(doc)
    return "\n".join(lines)


def _stack_report(ns: argparse.Namespace) -> dict[str, Any] | None:
    """Which processes of the running local stack are up and which are down (None: no stack)."""
    st = _stack_state(ns)
    if not st:
        return None
    parts = stack.components(st)
    return {
        "state_dir": str(ns.state_dir),
        "components": parts,
        "down": [name for name, part in parts.items() if not part["running"]],
    }


def _down_lines(report: dict[str, Any] | None) -> list[str]:
    """One loud line per stopped part of the local stack: a crashed sidecar or evaluator is not
    restarted by itself, and its figures would otherwise just go stale."""
    if not report:
        return []
    lines = []
    for name in report["down"]:
        part = report["components"][name]
        lines.append(f"DOWN       {name} (pid {part['pid']}) is not running; log: {part['log']}")
    if lines:
        lines.append("           restart the stack: `extproc down` then `extproc up`")
    return lines


async def _status_doc(ns: argparse.Namespace) -> dict[str, Any] | None:
    from extproc.ops import status

    r = store.connect(_redis_url(ns))
    try:
        full = await status.full_status(r, ns.window)
    finally:
        await r.aclose()
    names = list(full["experiments"])
    st = _stack_state(ns)
    name = ns.name or st.get("experiment", {}).get("name") or (names[0] if names else None)
    if name is None or name not in full["experiments"]:
        return None
    doc: dict[str, Any] = full["experiments"][name]
    doc["endpoints"] = st.get("endpoints", {})
    if dashboard := stack.dashboard_url(st):
        doc["dashboard_url"] = dashboard
    if st.get("feedback_token"):
        doc["feedback_token"] = st["feedback_token"]
    doc["stack"] = _stack_report(ns)
    doc["sidecars"] = full["sidecars"]
    doc["telemetry"] = full["telemetry"]
    doc["experiments"] = names
    from extproc.evaluator.rollout import load_state, read_audit

    r = store.connect(_redis_url(ns))
    try:
        state = await load_state(r, name)
        doc["rollout"] = None if state is None else json.loads(state.to_json())
        doc["audit"] = await read_audit(r, name, 5)
        doc["evaluation"] = await status.latest_evaluation(r, name)
        doc["evaluators"] = await status.evaluators(r)
    finally:
        await r.aclose()
    return doc


def cmd_status(ns: argparse.Namespace) -> int:
    """Figures from Redis. A part of the local stack that is down is named in the table, in
    ``stack.down`` of the JSON and on stderr with it, and on stderr when there are no figures to
    show (the part that is down may be Redis itself)."""
    try:
        doc = asyncio.run(_status_doc(ns))
    except (RedisError, OSError):
        _print_down(ns)
        raise
    if doc is None:
        _print_down(ns)
        _err("no experiment found in Redis: is the stack up (`extproc up`)?")
        return EXIT_FAIL
    if ns.json:
        _print_down(ns)
        print(json.dumps(doc, indent=2))
    else:
        print(_render_status(doc))
    return EXIT_OK


def _print_down(ns: argparse.Namespace) -> None:
    for line in _down_lines(_stack_report(ns)):
        print(line, file=sys.stderr)


def cmd_create(ns: argparse.Namespace) -> int:
    """Publish an experiment file to Redis: definition and, when new, its file weights."""
    exp, p = _experiment(ns.file)

    async def go(r: aioredis.Redis) -> store.RoutingState | None:
        if await store.get_definition(r, exp.name) is not None and not ns.replace:
            return None
        return await store.register_experiment(r, exp)

    state = _with_redis(ns, go)
    if state is None:
        _err(
            f"experiment {exp.name!r} already exists in Redis; "
            "`--replace` publishes the new definition (live weights are kept)"
        )
        return EXIT_USAGE
    if ns.json:
        print(
            json.dumps({"experiment": exp.name, "version": state.version, "weights": state.weights})
        )
    else:
        print(f"{exp.name}: published from {p}; routing version {state.version}: {state.weights}")
    return EXIT_OK


async def _experiment_rows(r: aioredis.Redis) -> list[dict[str, Any]]:
    from extproc.evaluator.rollout import load_state

    rows = []
    for raw in sorted(await r.smembers(keys.EXPERIMENTS)):
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        definition = await store.get_definition(r, name) or {}
        routing = await store.get_routing(r, name)
        state = await load_state(r, name)
        rows.append(
            {
                "name": name,
                "strategy": definition.get("strategy", "canary"),
                "stable": definition.get("stable"),
                "weights": routing.weights if routing else None,
                "routing_version": routing.version if routing else None,
                "status": state.status if state else "not started",
                "stage": state.stage + 1 if state else None,
            }
        )
    return rows


def cmd_list(ns: argparse.Namespace) -> int:
    rows = _with_redis(ns, _experiment_rows)
    if ns.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no experiments in Redis (`extproc experiment create FILE`, or `extproc up`)")
    for row in rows:
        w = ", ".join(f"{k} {v:g}%" for k, v in (row["weights"] or {}).items())
        stage = f" stage {row['stage']}" if row["stage"] else ""
        print(f"{row['name']:<24} {row['strategy']:<10} {row['status']}{stage}  [{w}]")
    return EXIT_OK


def cmd_show(ns: argparse.Namespace) -> int:
    from extproc.evaluator.rollout import load_state

    async def go(r: aioredis.Redis) -> dict[str, Any] | None:
        definition = await store.get_definition(r, ns.name)
        if definition is None:
            return None
        routing = await store.get_routing(r, ns.name)
        state = await load_state(r, ns.name)
        return {
            "definition": definition,
            "routing": None if routing is None else dataclasses.asdict(routing),
            "rollout": None if state is None else json.loads(state.to_json()),
        }

    doc = _with_redis(ns, go)
    if doc is None:
        _err(f"no experiment {ns.name!r} in Redis (see `extproc experiment list`)")
        return EXIT_USAGE
    if ns.json:
        print(json.dumps(doc, indent=2))
    else:
        import yaml

        sys.stdout.write(yaml.safe_dump(doc, sort_keys=False))
    return EXIT_OK


def cmd_set_weights(ns: argparse.Namespace) -> int:
    weights: dict[str, Any] = {}
    for item in ns.weights:
        name, sep, value = item.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            _err(f"{item!r}: expected VARIANT=PERCENT, e.g. canary=10")
            return EXIT_USAGE

    async def go() -> store.RoutingState:
        r = store.connect(_redis_url(ns))
        try:
            definition = await store.get_definition(r, ns.name)
            if definition is None:
                raise ConfigError(ns.name, ["no such experiment in Redis"])
            from extproc.config import parse_experiment

            exp = parse_experiment(definition, f"experiment {ns.name}")
            return await store.set_weights(r, exp, weights, reason=ns.reason, actor=ns.actor)
        finally:
            await r.aclose()

    state = asyncio.run(go())
    if ns.json:
        print(json.dumps({"version": state.version, "weights": state.weights}))
    else:
        print(f"{ns.name}: routing version {state.version}: {state.weights}")
    return EXIT_OK


# --- parser ----------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return n


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        default=str(stack.default_state_dir()),
        help="folder of the local stack's state (default: $EXTPROC_STATE_DIR or .extproc)",
    )
    p.add_argument(
        "--redis-url",
        default=None,
        help="Redis to use: redis://, rediss:// or, for Redis Cluster, redis+cluster:// "
        "(default: $REDIS_URL, else the running local stack's)",
    )


def _log_setup(ns: argparse.Namespace) -> LogSetup:
    return LogSetup(logging.DEBUG if ns.verbose else logging.INFO, ns.log_format)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extproc", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text",
        help="text lines (default) or one JSON object per line, for a log collector",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(
        name: str, fn: Callable[[argparse.Namespace], int], help_: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        return p

    exp_help = "experiment file (default: the bundled example)"
    p = verb("up", cmd_up, "start the local stack: Redis, Envoy, the sidecar (and model stand-ins)")
    p.add_argument("--experiment", help=exp_help)
    p.add_argument(
        "--mock-models",
        action="store_true",
        help="also start an OpenAI-compatible stand-in per variant",
    )
    p.add_argument(
        "--ports",
        choices=["default", "auto"],
        default="default",
        help="auto: pick free ports for everything",
    )
    p.add_argument("--listen-port", type=int, default=10000)
    p.add_argument("--admin-port", type=int, default=9901)
    p.add_argument("--sidecar-port", type=int, default=50051)
    p.add_argument("--redis-port", type=int, default=6390, help="port of the embedded Redis")
    p.add_argument("--dashboard-port", type=int, default=8080)
    p.add_argument("--json", action="store_true")
    _common(p)

    p = verb("demo", cmd_demo, "a whole canary rollout (and rollback) on the local stack")
    p.add_argument("--experiment", help="experiment file (default: the bundled demo schedule)")
    p.add_argument("--ports", choices=["default", "auto"], default="default")
    p.add_argument("--scenario", choices=["regression", "healthy"], default="regression")
    p.add_argument("--limit", type=float, default=300, help="give up after this many seconds")
    _common(p)

    p = verb("down", cmd_down, "stop what `extproc up` started, and nothing else")
    _common(p)

    p = verb("status", cmd_status, "per-variant requests, latency, TTFT, errors, tokens, weights")
    p.add_argument("name", nargs="?", help="experiment (default: the local stack's)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--window", type=int, default=20_000, help="recent events to summarise")
    _common(p)

    p = verb("serve", cmd_serve, "run the ext_proc sidecar in the foreground")
    p.add_argument("--experiment", help=exp_help)
    p.add_argument("--listen", default="127.0.0.1:50051", help="host:port or unix:/path")
    p.add_argument("--instance", default="", help="replica name in Redis (default host-pid)")
    p.add_argument(
        "--metrics",
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus /metrics here (default: off); worker i uses PORT+i",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="processes sharing the TCP address (SO_REUSEPORT), supervised (default 1)",
    )
    p.add_argument(
        "--capture-buffer-mb",
        type=_positive_int,
        default=64,
        help="captured texts kept while Redis is away, per process; then the newest are dropped",
    )
    p.add_argument("--tls-cert", metavar="PEM", help="serve gRPC over TLS with this certificate")
    p.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca", metavar="PEM", help="require client certificates signed by this CA"
    )
    _common(p)

    p = verb("check", cmd_check, "validate an experiment file; every problem is listed")
    p.add_argument("experiment", nargs="?", help=exp_help)

    p = verb("envoy-config", cmd_envoy_config, "print the Envoy bootstrap for an experiment")
    p.add_argument("--experiment", help=exp_help)
    p.add_argument("--listen-host", default="0.0.0.0")
    p.add_argument("--listen-port", type=int, default=10000)
    p.add_argument("--admin-port", type=int, default=9901)
    p.add_argument(
        "--sidecar",
        action="append",
        help="host:port or unix:/path; repeat for several replicas (default 127.0.0.1:50051)",
    )
    p.add_argument("--sidecar-ca", metavar="PEM", help="reach the sidecar over TLS: its CA")
    p.add_argument("--sidecar-server-name", help="SNI, and a DNS name its certificate must have")
    p.add_argument("--sidecar-client-cert", metavar="PEM", help="Envoy's certificate (mTLS)")
    p.add_argument("--sidecar-client-key", metavar="PEM", help="the key of --sidecar-client-cert")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")

    from extproc.dev import mockmodel

    p = verb("mock-model", cmd_mock_model, "run an OpenAI-compatible model stand-in")
    mockmodel.add_arguments(p)

    p = verb("experiment", lambda ns: EXIT_USAGE, "manage experiments")
    esub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    cp = esub.add_parser("create", help="publish an experiment file to Redis")
    cp.set_defaults(fn=cmd_create)
    cp.add_argument("file", help="the experiment file (checked first; every problem listed)")
    cp.add_argument("--replace", action="store_true", help="replace an existing definition")
    cp.add_argument("--json", action="store_true")
    _common(cp)
    lp = esub.add_parser("list", help="experiments in Redis: strategy, status, stage, weights")
    lp.set_defaults(fn=cmd_list)
    lp.add_argument("--json", action="store_true")
    _common(lp)
    shp = esub.add_parser("show", help="one experiment: definition, live routing, rollout state")
    shp.set_defaults(fn=cmd_show)
    shp.add_argument("name")
    shp.add_argument("--json", action="store_true")
    _common(shp)
    sw = esub.add_parser("set-weights", help="change the live weights (every replica follows)")
    sw.set_defaults(fn=cmd_set_weights)
    sw.add_argument("name")
    sw.add_argument("weights", nargs="+", metavar="VARIANT=PERCENT")
    sw.add_argument("--reason", default="set by operator")
    sw.add_argument("--actor", default=os.environ.get("USER", "cli"))
    sw.add_argument("--json", action="store_true")
    _common(sw)
    for action, text in (
        ("pause", "hold the current stage (weights stay)"),
        ("resume", "continue a paused rollout"),
        ("promote", "move to the next stage now"),
        ("rollback", "send all traffic to the stable variant"),
        ("abort", "end the experiment on the stable variant"),
    ):
        ap = esub.add_parser(action, help=text, description=text)
        ap.set_defaults(fn=cmd_command)
        ap.add_argument("name")
        ap.add_argument("--reason", default="")
        ap.add_argument("--actor", default=os.environ.get("USER", "cli"))
        ap.add_argument("--json", action="store_true")
        _common(ap)

    p = verb("evaluate", cmd_evaluate, "run the evaluator (one active per experiment)")
    p.add_argument("--experiment", help=exp_help)
    p.add_argument("--instance", default="", help="evaluator name (default host-pid)")
    p.add_argument(
        "--metrics",
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus /metrics here (default: off)",
    )
    _common(p)

    p = verb("quality", cmd_quality, "run the judge, the watchdog and the feedback endpoint")
    p.add_argument("--experiment", help=exp_help)
    p.add_argument("--listener", help="Envoy listener URL the watchdog probes through")
    p.add_argument(
        "--feedback-listen",
        metavar="HOST:PORT",
        help="serve POST /v1/feedback here (default: off; token: $EXTPROC_FEEDBACK_TOKEN)",
    )
    p.add_argument(
        "--feedback-insecure",
        action="store_true",
        help="serve feedback without a token even when a feedback guardrail acts on it",
    )
    _common(p)

    p = verb("pairs", cmd_pairs, "captured primary and shadow answers, side by side")
    p.add_argument("name")
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--json", action="store_true")
    _common(p)

    p = verb("log", cmd_log, "the audit log: decisions, their reasons, operator actions")
    p.add_argument("name")
    p.add_argument("--count", type=int, default=50)
    p.add_argument("--json", action="store_true")
    _common(p)

    p = verb("export", cmd_export, "telemetry events as JSON lines (for `extproc analyze`)")
    p.add_argument("name")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.add_argument("--since", help="from this time on: ISO 8601 (naive = UTC) or epoch ms")
    p.add_argument("--count", type=int, help="at most this many (without --since: the newest ones)")
    _common(p)

    p = verb("analyze", cmd_analyze, "replay the evaluator's decisions over exported events")
    p.add_argument("events", metavar="EVENTS.jsonl")
    p.add_argument("--config", required=True, help="experiment file whose guardrails to replay")
    p.add_argument("--json", action="store_true")
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

    p = verb("plan", cmd_plan, "write a risk-graded experiment file from model metadata")
    p.add_argument("--current", required=True, metavar="META.yaml", help="the model serving now")
    p.add_argument("--target", required=True, metavar="META.yaml", help="the model to roll out")
    p.add_argument("--base", metavar="EXPERIMENT.yaml", help="keep this file's variants, names")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.add_argument("--json", action="store_true", help="print the plan's summary as JSON")

    p = verb("dashboard", cmd_dashboard, "the web dashboard: figures, decisions, pairs, actions")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--token",
        default=None,
        help="bearer token for actions and captured texts (default: $EXTPROC_DASHBOARD_TOKEN, "
        "else a new one; prefer the variable: every local user can read a command line)",
    )
    _common(p)

    from extproc.ops.top import seconds

    p = verb("top", cmd_top, "live per-variant table of an experiment (q or Ctrl-C quits)")
    p.add_argument("name", nargs="?", help="experiment (default: the local stack's)")
    p.add_argument("--interval", type=seconds, default=2.0, help="seconds between frames")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--window", type=int, default=20_000, help="recent events to summarise")
    _common(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    _log_setup(ns).apply()
    fn: Callable[[argparse.Namespace], int] = ns.fn
    try:
        return fn(ns)
    except ConfigError as err:
        _err(str(err))
        return EXIT_USAGE
    except stack.StackError as err:
        _err(str(err))
        return EXIT_FAIL
    except (RedisError, OSError) as err:
        _err(f"{type(err).__name__}: {err}")
        return EXIT_FAIL
