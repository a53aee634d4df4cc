"""What operators read: `status`, `top`, `pairs`, `log`, and the web `dashboard`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

from redis.exceptions import RedisError

from extproc.cli.common import (
    EXIT_FAIL,
    EXIT_OK,
    WINDOW_HELP,
    AddVerb,
    add_common,
    err,
    redis_url,
    span_s,
    stack_state,
    using_redis,
    with_redis,
)
from extproc.dev import stack
from extproc.ops import model, status


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
    lines += _decision_lines(doc)
    return "\n".join(lines)


def _decision_lines(doc: dict[str, Any]) -> list[str]:
    """An A/B run's stated decisions, from the evaluator's latest look: none until it ends."""
    from extproc.evaluator.decision import render

    found = (doc.get("evaluation") or {}).get("decisions") or []
    return [line for d in found for line in render(d)]


def _stack_report(ns: argparse.Namespace) -> dict[str, Any] | None:
    """Which processes of the running local stack are up and which are down (None: no stack)."""
    st = stack_state(ns)
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


async def _status_doc(ns: argparse.Namespace, name: str | None = None) -> model.StatusDoc | None:
    """The status read model (``ops.status.status_doc``) plus what only the local stack knows:
    its endpoints, the dashboard's address, the feedback token and which of its parts are down."""
    st = stack_state(ns)
    name = name or ns.name or st.get("experiment", {}).get("name")
    doc = await using_redis(ns, lambda r: status.status_doc(r, name, ns.window))
    if doc is None:
        return None
    report = _stack_report(ns)
    return doc.model_copy(
        update={
            "endpoints": st.get("endpoints", {}),
            "dashboard_url": stack.dashboard_url(st) or None,
            "feedback_token": st.get("feedback_token") or None,
            "stack": None if report is None else model.StackReport.model_validate(report),
        }
    )


async def status_json(ns: argparse.Namespace, name: str | None = None) -> dict[str, Any] | None:
    """The read model as the JSON object `status --json` prints (what `top` renders; what the
    tests read in-process instead of starting a CLI process per look); ``name`` instead of the
    experiment the command line asked for."""
    doc = await _status_doc(ns, name)
    return None if doc is None else doc.model_dump(mode="json")


def cmd_status(ns: argparse.Namespace) -> int:
    """Figures from Redis. A part of the local stack that is down is named in the table, in
    ``stack.down`` of the JSON and on stderr with it, and on stderr when there are no figures to
    show (the part that is down may be Redis itself)."""
    if ns.schema:
        print(json.dumps(model.StatusDoc.model_json_schema(), indent=2))
        return EXIT_OK
    try:
        doc = asyncio.run(status_json(ns))
    except (RedisError, OSError):
        _print_down(ns)
        raise
    if doc is None:
        _print_down(ns)
        err("no experiment found in Redis: is the stack up (`extproc up`)?")
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


def cmd_top(ns: argparse.Namespace) -> int:
    """A live per-variant table; ``--once`` prints one frame (exit 1 if there is no experiment)."""
    from extproc.ops import top

    if ns.once:
        doc = asyncio.run(status_json(ns))
        if doc is None:
            err("no experiment found in Redis: is the stack up (`extproc up`)?")
            return EXIT_FAIL
        print(top.render_for(doc, sys.stdout))
        return EXIT_OK
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            top.live(lambda name: status_json(ns, name), interval=ns.interval, stdin=sys.stdin)
        )
    return EXIT_OK


TEXT_LIMIT = 300  # characters of a prompt or an answer in the text view; --json has them all


def hanging(head: str, text: str) -> str:
    """``head`` then ``text``, its later lines indented under its first: a multi-line prompt
    or answer stays one block beside its label instead of running back to the margin, where it
    reads as the next pair's label."""
    lines = text[:TEXT_LIMIT].splitlines() or [""]
    pad = "\n" + " " * len(head)
    return head + pad.join(lines)


def cmd_pairs(ns: argparse.Namespace) -> int:
    from extproc.ops.status import recent_pairs

    pairs = with_redis(ns, lambda r: recent_pairs(r, ns.name, ns.count))
    if ns.json:
        print(json.dumps(pairs, indent=2))
        return EXIT_OK
    for p in pairs:
        print(f"== {p['request_id']}")
        if "primary" in p and p["primary"].get("prompt"):
            print(hanging("   prompt: ", p["primary"]["prompt"]))
        for role in ("primary", "shadow"):
            side = p.get(role)
            if side:
                head = f"   {role:<8}({side['variant']}, {side['status']}): "
                print(hanging(head, side.get("answer") or ""))
        if p.get("judge"):
            j = p["judge"]
            agreed = "both orders agree" if j["consistent"] else "orders disagree"
            print(f"   judge:   {j['winner']} ({agreed}; {j['model']})")
    return EXIT_OK


def cmd_log(ns: argparse.Namespace) -> int:
    from extproc.evaluator.rollout import read_audit

    records = with_redis(ns, lambda r: read_audit(r, ns.name, ns.count))
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


def cmd_dashboard(ns: argparse.Namespace) -> int:
    """The web dashboard; actions need --token, else $EXTPROC_DASHBOARD_TOKEN, else a new one."""
    from extproc.ops.dashboard import TOKEN_ENV, server

    token = ns.token or os.environ.get(TOKEN_ENV) or None
    server.run(redis_url(ns), ns.host, ns.port, token)
    return EXIT_OK


def register(add: AddVerb) -> None:
    p = add("status", cmd_status, "per-variant requests, latency, TTFT, errors, tokens, weights")
    p.add_argument("name", nargs="?", help="experiment (default: the local stack's)")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--schema", action="store_true", help="print the JSON schema of --json's output and exit"
    )
    p.add_argument("--window", type=span_s, default=status.DEFAULT_WINDOW_S, help=WINDOW_HELP)
    add_common(p)
    p = add("pairs", cmd_pairs, "captured primary and shadow answers, side by side")
    p.add_argument("name")
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--json", action="store_true")
    add_common(p)

    p = add("log", cmd_log, "the audit log: decisions, their reasons, operator actions")
    p.add_argument("name")
    p.add_argument("--count", type=int, default=50)
    p.add_argument("--json", action="store_true")
    add_common(p)
    p = add("dashboard", cmd_dashboard, "the web dashboard: figures, decisions, pairs, actions")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--token",
        default=None,
        help="bearer token for actions and captured texts (default: $EXTPROC_DASHBOARD_TOKEN, "
        "else a new one; prefer the variable: every local user can read a command line)",
    )
    add_common(p)

    from extproc.ops.top import seconds

    p = add(
        "top",
        cmd_top,
        "live per-variant table of an experiment (n/p: next/previous experiment; q or Ctrl-C "
        "quits)",
    )
    p.add_argument("name", nargs="?", help="experiment (default: the local stack's)")
    p.add_argument("--interval", type=seconds, default=2.0, help="seconds between frames")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--window", type=span_s, default=status.DEFAULT_WINDOW_S, help=WINDOW_HELP)
    add_common(p)
