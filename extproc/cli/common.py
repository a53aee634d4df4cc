"""What every verb shares: exit codes, the experiment file, which Redis, and one helper that
opens and closes a Redis client around a verb's calls."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis

from extproc import store
from extproc.config import EXAMPLE_EXPERIMENT, Experiment, load_experiment
from extproc.dev import stack

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
T = TypeVar("T")
Verb = Callable[[argparse.Namespace], int]
AddVerb = Callable[[str, Verb, str], argparse.ArgumentParser]
"""``add(name, function, help)``: a new subcommand's parser (see ``main.build_parser``)."""
EXPERIMENT_HELP = "experiment file (default: the bundled example)"


def err(msg: str) -> None:
    print(f"extproc: {msg}", file=sys.stderr)


def load(path: str | None) -> tuple[Experiment, Path]:
    p = Path(path) if path else EXAMPLE_EXPERIMENT
    return load_experiment(p), p


def stack_state(ns: argparse.Namespace) -> dict[str, Any]:
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
            err(
                f"ignoring {Path(state_dir) / stack.STATE_FILE}: none of the processes it "
                "records is running (`extproc down` clears it, `extproc up` starts a new stack)"
            )
            ns._stale_reported = True
        return {}
    return st


def redis_url(ns: argparse.Namespace) -> str:
    """--redis-url, else $REDIS_URL, else the running local stack's, else the default: an
    explicit choice always wins over what a state file remembers."""
    if getattr(ns, "redis_url", None):
        return str(ns.redis_url)
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"]
    st = stack_state(ns)
    if st.get("endpoints", {}).get("redis"):
        return str(st["endpoints"]["redis"])
    return store.DEFAULT_REDIS_URL


async def using_redis(ns: argparse.Namespace, fn: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    """Run a verb's Redis calls with one client, always closed: the one way a verb opens Redis."""
    r = store.connect(redis_url(ns))
    try:
        return await fn(r)
    finally:
        await r.aclose()


def with_redis(ns: argparse.Namespace, fn: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    """:func:`using_redis` for a verb that is not async itself."""
    return asyncio.run(using_redis(ns, fn))


def positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return n


_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def span_s(text: str) -> int:
    """argparse type of a span of time: seconds, or a number with s, m, h or d ("5m", "6h")."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS_S else (text, "s")
    try:
        value = float(number) * _UNITS_S[unit]
    except ValueError:
        value = 0.0
    if not value >= 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a span of at least 1 s, such as 300, 90s, 5m, 6h or 2d"
        )
    return int(value)


WINDOW_HELP = "summarise the requests that started in this last span (default 5m)"


def add_common(p: argparse.ArgumentParser) -> None:
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
