"""`extproc up`, `demo` and `down`: the local stack for development and demos."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

from extproc.cli.common import (
    EXIT_FAIL,
    EXIT_OK,
    EXPERIMENT_HELP,
    AddVerb,
    add_common,
    load,
)
from extproc.cli.observe import cmd_status
from extproc.dev import stack
from extproc.ops import status


def cmd_up(ns: argparse.Namespace) -> int:
    exp, p = load(ns.experiment)
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
        inspecting = state.get("inspector") or {}
        if inspecting.get("fallback"):
            print(f"  inspector  lua: the compiled one did not build ({inspecting['fallback']})")
        elif inspecting:
            print(f"  inspector  {inspecting['kind']}")
        print("Try:  extproc status   |   extproc down")
    return EXIT_OK


def cmd_demo(ns: argparse.Namespace) -> int:
    from extproc.dev import demo

    exp, p = load(ns.experiment or str(demo.DEMO_EXPERIMENT))
    print("Starting the local stack: Redis, Envoy 1.40, the ext_proc sidecar, the evaluator and")
    print("two OpenAI-compatible model stand-ins (stable and canary).")
    opts = stack.UpOptions(
        experiment=exp,
        experiment_path=p.resolve(),
        state_dir=Path(ns.state_dir),
        mock_models=True,
        auto_ports=ns.ports == "auto",
        redis_url=os.environ.get("REDIS_URL") or None,
        mock_args=demo.DEMO_MODELS,
    )
    state = stack.up(opts)
    ep = state["endpoints"]
    print(f"  listener {ep['listener']}   (state and logs in {ns.state_dir}/)")
    print(f"  dashboard {stack.dashboard_url(state)}   <- open it to watch the rollout")
    stages = ", ".join(f"{s:g}%" for s in exp.spec.rollout.shares)
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
    ns.name, ns.window, ns.json, ns.schema = exp.name, status.DEFAULT_WINDOW_S, False, False
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


def register(add: AddVerb) -> None:
    exp_help = EXPERIMENT_HELP
    p = add("up", cmd_up, "start the local stack: Redis, Envoy, the sidecar (and model stand-ins)")
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
    add_common(p)

    p = add("demo", cmd_demo, "a whole canary rollout (and rollback) on the local stack")
    p.add_argument("--experiment", help="experiment file (default: the bundled demo schedule)")
    p.add_argument("--ports", choices=["default", "auto"], default="default")
    p.add_argument("--scenario", choices=["regression", "healthy"], default="regression")
    p.add_argument("--limit", type=float, default=300, help="give up after this many seconds")
    add_common(p)

    p = add("down", cmd_down, "stop what `extproc up` started, and nothing else")
    add_common(p)
