"""`extproc experiment ...`: publish, list and show experiments, set weights, and record an
operator's intent (pause, resume, promote, rollback, abort, restart) for the evaluator to apply."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError

from extproc import store
from extproc.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    AddVerb,
    add_common,
    err,
    load,
    with_redis,
)
from extproc.config import ConfigError, Experiment, parse_experiment
from extproc.contract import keys
from extproc.contract.selection import Selector, Selectors
from extproc.evaluator.rollout import append_audit


def cmd_command(ns: argparse.Namespace) -> int:
    """pause | resume | promote | rollback | abort | restart: record intent; the evaluator acts
    on it.

    A restart is refused here already when the rollout has not ended (the evaluator would
    ignore it), so that the operator learns at once to roll back or abort first.
    """
    from extproc.evaluator.machine import RESTARTABLE
    from extproc.evaluator.rollout import load_state, send_command

    async def go(r: aioredis.Redis) -> str:
        if await store.get_definition(r, ns.name) is None:
            raise ConfigError(ns.name, ["no such experiment in Redis (see `extproc status`)"])
        if ns.action == "restart":
            state = await load_state(r, ns.name)
            status = "not started" if state is None else state.status
            if status not in RESTARTABLE:
                raise ConfigError(
                    ns.name,
                    [
                        f"rollout is {status}: a new attempt follows a rollback, an abort or a "
                        "completion (`extproc experiment rollback` first)"
                    ],
                )
        return await send_command(r, ns.name, ns.action, ns.actor, ns.reason)

    entry = with_redis(ns, go)
    if ns.json:
        print(json.dumps({"experiment": ns.name, "command": ns.action, "id": entry}))
    else:
        print(
            f"{ns.name}: {ns.action} recorded ({entry}); the evaluator applies it on its next tick"
        )
    return EXIT_OK


def cmd_create(ns: argparse.Namespace) -> int:
    """Publish an experiment file to Redis: definition and, when new, its file weights."""
    exp, p = load(ns.file)

    async def go(r: aioredis.Redis) -> store.RoutingState | None:
        if await store.get_definition(r, exp.name) is not None and not ns.replace:
            return None
        clashes = await _overlaps(r, exp)
        if clashes:
            raise ConfigError(str(p), clashes)
        if exp.spec.match is None:
            others = await _catch_alls(r, exp.name)
            if others:
                err(
                    f"note: {', '.join(others)} also take every request (no `match`): a fleet "
                    "sidecar files a request no `match` takes under the first by name"
                )
        return await store.register_experiment(r, exp)

    state = with_redis(ns, go)
    if state is None:
        err(
            f"experiment {exp.name!r} already exists in Redis; "
            "`--replace` publishes the new definition (live weights, the rollout state and the "
            "audit log are kept; `experiment restart` runs the rollout again)"
        )
        return EXIT_USAGE
    if ns.json:
        print(
            json.dumps({"experiment": exp.name, "version": state.version, "weights": state.weights})
        )
    else:
        print(f"{exp.name}: published from {p}; routing version {state.version}: {state.weights}")
    return EXIT_OK


async def _live_matches(r: aioredis.Redis, but: str) -> dict[str, Selectors | None]:
    """The ``match`` of every live experiment but one (None: it takes every request)."""
    live: dict[str, Selectors | None] = {}
    for raw in sorted(await r.smembers(keys.EXPERIMENTS)):
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        definition = await store.get_definition(r, name)
        if name == but or definition is None:
            continue
        try:
            found = definition.get("match")
            live[name] = None if found is None else Selectors.model_validate(found)
        except ValidationError:
            continue  # a definition this release cannot read; `extproc check` says why
    return live


async def _overlaps(r: aioredis.Redis, exp: Experiment) -> list[str]:
    """The models, routes and headers ``exp`` would match that a live experiment matches too:
    a fleet sidecar files a request under one experiment only, so an overlap would silently
    starve one of them."""
    live = {k: v for k, v in (await _live_matches(r, exp.name)).items() if v is not None}
    if exp.spec.match is None:
        return []
    _, clashes = Selector.build({**live, exp.name: exp.spec.match})
    return [f"match: {c}" for c in clashes if exp.name in c.split()]


async def _catch_alls(r: aioredis.Redis, name: str) -> list[str]:
    return [n for n, m in (await _live_matches(r, name)).items() if m is None]


async def _experiment_rows(r: aioredis.Redis) -> list[dict[str, Any]]:
    from extproc.evaluator.rollout import load_state

    rows = []
    live = {
        raw.decode() if isinstance(raw, bytes) else str(raw)
        for raw in await r.smembers(keys.EXPERIMENTS)
    }
    ended = {
        raw.decode() if isinstance(raw, bytes) else str(raw)
        for raw in await r.zrange(keys.ENDED, 0, -1)
    }
    for name in sorted(live | ended):
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
                "ended": name in ended,
                "stage": state.stage + 1 if state else None,
                "attempt": state.attempt if state else None,
                "phase": state.phase + 1 if state and definition.get("phases") else None,
                "phases": len(definition.get("phases") or []),
            }
        )
    return rows


def cmd_end(ns: argparse.Namespace) -> int:
    """Retire a live experiment: fleet sidecars stop filing requests under it within a second
    and fleet evaluators stop judging it; everything it recorded stays readable."""

    async def go(r: aioredis.Redis) -> bool:
        if await store.get_definition(r, ns.name) is None:
            raise ConfigError(ns.name, ["no such experiment in Redis (see `extproc status`)"])
        ended = await store.end_experiment(r, ns.name)
        if ended:
            await append_audit(
                r, ns.name, {"event": "ended", "actor": ns.actor, "reason": ns.reason or ""}
            )
        return ended

    ended = with_redis(ns, go)
    if ns.json:
        print(json.dumps({"experiment": ns.name, "ended": ended}))
    elif ended:
        print(f"{ns.name}: ended; its requests pass through from now on, its data stays")
    else:
        print(f"{ns.name}: already ended")
    return EXIT_OK


def cmd_list(ns: argparse.Namespace) -> int:
    rows = with_redis(ns, _experiment_rows)
    if ns.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no experiments in Redis (`extproc experiment create FILE`, or `extproc up`)")
    for row in rows:
        w = ", ".join(f"{k} {v:g}%" for k, v in (row["weights"] or {}).items())
        stage = f" stage {row['stage']}" if row["stage"] else ""
        if row["phase"]:
            stage = f" phase {row['phase']}/{row['phases']}{stage}"
        if (row["attempt"] or 1) > 1:
            stage += f" (attempt {row['attempt']})"
        ended = "  (ended)" if row["ended"] else ""
        print(f"{row['name']:<24} {row['strategy']:<10} {row['status']}{stage}  [{w}]{ended}")
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

    doc = with_redis(ns, go)
    if doc is None:
        err(f"no experiment {ns.name!r} in Redis (see `extproc experiment list`)")
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
            err(f"{item!r}: expected VARIANT=PERCENT, e.g. canary=10")
            return EXIT_USAGE

    async def go(r: aioredis.Redis) -> store.RoutingState:
        definition = await store.get_definition(r, ns.name)
        if definition is None:
            raise ConfigError(ns.name, ["no such experiment in Redis"])

        exp = parse_experiment(definition, f"experiment {ns.name}")
        return await store.set_weights(r, exp, weights, reason=ns.reason, actor=ns.actor)

    state = with_redis(ns, go)
    if ns.json:
        print(json.dumps({"version": state.version, "weights": state.weights}))
    else:
        print(f"{ns.name}: routing version {state.version}: {state.weights}")
    return EXIT_OK


def register(add: AddVerb) -> None:
    p = add("experiment", lambda ns: EXIT_USAGE, "manage experiments")
    esub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    cp = esub.add_parser("create", help="publish an experiment file to Redis")
    cp.set_defaults(fn=cmd_create)
    cp.add_argument("file", help="the experiment file (checked first; every problem listed)")
    cp.add_argument(
        "--replace",
        action="store_true",
        help="replace an existing definition (keeps live weights, rollout state and audit log)",
    )
    cp.add_argument("--json", action="store_true")
    add_common(cp)
    ep = esub.add_parser(
        "end",
        help="retire an experiment: fleet sidecars stop routing by it, its data stays",
    )
    ep.set_defaults(fn=cmd_end)
    ep.add_argument("name")
    ep.add_argument("--reason", default="")
    ep.add_argument("--actor", default=os.environ.get("USER", "cli"))
    ep.add_argument("--json", action="store_true")
    add_common(ep)
    lp = esub.add_parser("list", help="experiments in Redis: strategy, status, stage, weights")
    lp.set_defaults(fn=cmd_list)
    lp.add_argument("--json", action="store_true")
    add_common(lp)
    shp = esub.add_parser("show", help="one experiment: definition, live routing, rollout state")
    shp.set_defaults(fn=cmd_show)
    shp.add_argument("name")
    shp.add_argument("--json", action="store_true")
    add_common(shp)
    sw = esub.add_parser("set-weights", help="change the live weights (every replica follows)")
    sw.set_defaults(fn=cmd_set_weights)
    sw.add_argument("name")
    sw.add_argument("weights", nargs="+", metavar="VARIANT=PERCENT")
    sw.add_argument("--reason", default="set by operator")
    sw.add_argument("--actor", default=os.environ.get("USER", "cli"))
    sw.add_argument("--json", action="store_true")
    add_common(sw)
    for action, text in (
        ("pause", "hold the current stage (weights stay)"),
        ("resume", "continue a paused rollout"),
        ("promote", "move to the next stage now"),
        ("rollback", "send all traffic to the stable variant"),
        ("abort", "end the experiment on the stable variant"),
        (
            "restart",
            "after a rollback, an abort or a completion: a new attempt from stage 1 with fresh "
            "evidence (the old state is archived in the audit log)",
        ),
    ):
        ap = esub.add_parser(action, help=text, description=text)
        ap.set_defaults(fn=cmd_command)
        ap.add_argument("name")
        ap.add_argument("--reason", default="")
        ap.add_argument("--actor", default=os.environ.get("USER", "cli"))
        ap.add_argument("--json", action="store_true")
        add_common(ap)
