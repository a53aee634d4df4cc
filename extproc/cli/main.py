"""The `extproc` command: a thin layer of verbs over library functions that return exit codes.

Exit codes scripts can rely on: 0 success, 1 operational failure (a part did not start, Redis
unreachable), 2 bad usage or bad input (invalid experiment file, unknown variant).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from redis.exceptions import RedisError

from extproc.cli import experiments, local, observe, offline, serving
from extproc.cli.common import EXIT_FAIL, EXIT_USAGE, Verb, err
from extproc.config import ConfigError
from extproc.dev import stack
from extproc.logs import FORMATS


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

    def add(name: str, fn: Verb, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        return p

    for group in (local, observe, experiments, serving, offline):
        group.register(add)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    serving.log_setup(ns).apply()
    fn: Callable[[argparse.Namespace], int] = ns.fn
    try:
        return fn(ns)
    except ConfigError as exc:
        err(str(exc))
        return EXIT_USAGE
    except stack.StackError as exc:
        err(str(exc))
        return EXIT_FAIL
    except (RedisError, OSError) as exc:
        err(f"{type(exc).__name__}: {exc}")
        return EXIT_FAIL
