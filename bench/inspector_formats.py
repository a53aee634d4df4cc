"""What the sidecar's response inspector costs per streamed answer, in each API format.

Why: the inspector reads every chunk of a captured response on the path that forwards it, and
each format's events differ in size and in which of them must be JSON-decoded (the format's
first event, the first token, the usage; every delta while the answer text is captured). The
stand-in renders the same answer (``--tokens`` tokens, one event a chunk) in each format; the
script prints the JSON decodes per answer, and the median and fastest time per answer over
``--repeat`` runs, with capture off and on (``--capture`` bytes of answer kept).

    .venv/bin/python bench/inspector_formats.py [--tokens 200] [--repeat 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from extproc.dev.mockformats import FORMATS, Answer
from extproc.telemetry import inspect as inspect_mod
from extproc.telemetry.inspect import ResponseInspector

SSE = "text/event-stream"


def chunks(path: str, tokens: int) -> list[bytes]:
    """The stream of one answer in the format served at ``path``, one event a chunk."""
    words = [(" " if i else "") + "lorem" for i in range(tokens)]
    answer = Answer("ab" * 16, 0, "m", words, "", False, 9, None, True)
    wire = FORMATS[path]
    pieces = [wire.piece(answer, i) for i in range(tokens)]
    return [wire.head(answer) + pieces[0], *pieces[1:], wire.tail(answer)]


def inspect(stream: list[bytes], capture: int) -> None:
    inspector = ResponseInspector(SSE, capture)
    for i, chunk in enumerate(stream):
        inspector.feed(chunk, i)
    inspector.finish()


def decodes(stream: list[bytes], capture: int) -> int:
    """How many events the inspector JSON-decoded."""
    count = 0
    real = inspect_mod._loads

    def counting(data: Any) -> Any:
        nonlocal count
        count += 1
        return real(data)

    inspect_mod._loads = counting
    try:
        inspect(stream, capture)
    finally:
        inspect_mod._loads = real
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--per-run", type=int, default=50, help="answers inspected per timed run")
    ap.add_argument("--capture", type=int, default=2400)
    ns = ap.parse_args()
    print(f"{'format':22s} {'capture':>7s} {'decodes':>7s} {'median us':>10s} {'fastest us':>10s}")
    for path in FORMATS:
        stream = chunks(path, ns.tokens)
        for capture in (0, ns.capture):
            inspect(stream, capture)  # warm up
            runs = []
            for _ in range(ns.repeat):
                start = time.perf_counter()
                for _ in range(ns.per_run):
                    inspect(stream, capture)
                runs.append((time.perf_counter() - start) / ns.per_run * 1e6)
            print(
                f"{path:22s} {capture:7d} {decodes(stream, capture):7d} "
                f"{statistics.median(runs):10.0f} {min(runs):10.0f}"
            )


if __name__ == "__main__":
    main()
