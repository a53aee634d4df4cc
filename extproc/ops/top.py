"""`extproc top`: a live per-variant table of one experiment, redrawn in place, for shell users.

It shows what ``extproc status --json`` holds (the same document, read from Redis only), plus
what only a repeated read can give: requests per second, from the change of each variant's exact
request counter between two frames. Nothing here decides anything; it is a window on Redis.

Plain ANSI escape codes rather than a TUI library: the project does not depend on one, and a
table redrawn from the home position of the alternate screen is all a top needs. Without a
terminal (a pipe, a log) frames are printed one after another with no escape codes, and
``--once`` prints a single frame, so scripts and tests read the same text a person sees.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from redis.exceptions import RedisError

from extproc.ops.figures import countdown_text, duration_text, fixed, significant, verdict
from extproc.supervise import raise_if_cancelled

Doc = dict[str, Any]
Fetch = Callable[[str | None], Awaitable[Doc | None]]
"""The status document of an experiment by name (None: the one asked for at the start)."""

# SGR codes; a span with style "" is plain.
BOLD, DIM, RED, GREEN, YELLOW, CYAN = "1", "2", "31", "32", "33", "36"
_STATUS_STYLE = {
    "warming_up": YELLOW,
    "running": GREEN,
    "completed": GREEN,
    "paused": YELLOW,
    "rolled_back": RED,
    "aborted": RED,
}
_ALT_ON, _ALT_OFF = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"
_HOME, _EOL, _EOS = "\x1b[H", "\x1b[K", "\x1b[J"

Span = tuple[str, str]
Line = list[Span]


def _visible(line: Line, width: int | None) -> Line:
    """Cut a line to ``width`` visible characters: a wrapped line would break the redraw."""
    if width is None:
        return line
    out: Line = []
    left = width
    for text, style in line:
        if left <= 0:
            break
        out.append((text[:left], style))
        left -= len(text)
    return out


def _paint(line: Line, color: bool) -> str:
    if not color:
        return "".join(text for text, _ in line)
    return "".join(f"\x1b[{style}m{text}\x1b[0m" if style else text for text, style in line)


@dataclass
class RateTracker:
    """Requests per second per variant, from the exact counters of two consecutive frames."""

    _last: tuple[float, dict[str, int]] | None = None
    rates: dict[str, float] = field(default_factory=dict)

    def update(self, doc: Doc, now: float) -> dict[str, float]:
        counts = {name: int(v.get("requests", 0)) for name, v in doc.get("variants", {}).items()}
        if self._last is not None and now > self._last[0]:
            then, before = self._last
            self.rates = {
                name: max(0, n - before.get(name, n)) / (now - then) for name, n in counts.items()
            }
        self._last = (now, counts)
        return self.rates


def _ms(x: float | None) -> str:
    return "-" if x is None else fixed(x, 0) if x >= 100 else fixed(x, 1)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{fixed(x, 1)}%"


def _ratio(x: float | None) -> str:
    """A rate (0..1) as a percentage, without the sign: the header says %."""
    return "-" if x is None else fixed(100 * x, 1)


def _num(x: float | None) -> str:
    return "-" if x is None else fixed(x, 1) if abs(x) >= 10 else significant(x, 3)


COLUMNS: tuple[tuple[str, int], ...] = (
    ("variant", -14),
    ("weight", 8),
    ("requests", 10),
    ("req/s", 8),
    ("err%", 7),
    ("refuse%", 8),
    ("p50 ms", 8),
    ("p95 ms", 8),
    ("p99 ms", 8),
    ("ttft p50", 9),
    ("tok in", 9),
    ("tok out", 9),
    ("out/req", 8),
)
"""Header and width of each column (negative: left-aligned)."""
_ERR_COLUMN = 4

SIGNAL_COLUMNS: tuple[tuple[str, int], ...] = (
    ("variant", -14),
    ("timeout%", 9),
    ("client%", 8),
    ("tools%", 7),
    ("empty%", 7),
    ("badjson%", 9),
    ("tok/s", 8),
    ("cost/req", 11),
    ("cached/req", 11),
    ("forced", 7),
    ("open", 6),
)
"""The second table: the answer signals the guardrails can judge, and the traffic left out of
the comparison (forced tester requests; requests still open past the in-flight bound)."""


def _cell(text: str, width: int) -> str:
    return f"{text:<{-width}}" if width < 0 else f"{text:>{width}}"


def _variant_row(label: str, v: Doc, rate: float | None, first: int) -> Line:
    lat = v.get("latency_ms") or {}
    n = int(v.get("window_requests") or 0)
    out_per_req = None if not n else v.get("completion_tokens", 0) / n
    err = v.get("error_rate")
    values = [
        label,
        _pct(v.get("weight")),
        str(v.get("requests", v.get("window_requests", 0))),
        "-" if rate is None else fixed(rate, 1),
        _ratio(err),
        _ratio(v.get("refusal_rate")),
        _ms(lat.get("p50")),
        _ms(lat.get("p95")),
        _ms(lat.get("p99")),
        _ms((v.get("ttft_ms") or {}).get("p50")),
        str(v.get("prompt_tokens", 0)),
        str(v.get("completion_tokens", 0)),
        "-" if out_per_req is None else fixed(out_per_req, 0),
    ]
    widths = [-first, *(w for _, w in COLUMNS[1:])]
    line = [(_cell(text, width), "") for width, text in zip(widths, values, strict=True)]
    if err:
        line[_ERR_COLUMN] = (line[_ERR_COLUMN][0], RED)
    return line


def _signal_row(label: str, v: Doc, first: int) -> Line:
    values = [
        label,
        _ratio(v.get("timeout_rate")),
        _ratio(v.get("client_error_rate")),
        _ratio(v.get("tool_call_rate")),
        _ratio(v.get("empty_answer_rate")),
        _ratio(v.get("json_invalid_rate")),
        _num(v.get("output_tokens_per_s")),
        _num(v.get("cost_per_request")),
        _num(v.get("cached_prompt_tokens")),
        str(v.get("forced_requests", "-")),
        str(v.get("open_requests", 0)),
    ]
    widths = [-first, *(w for _, w in SIGNAL_COLUMNS[1:])]
    return [(_cell(text, width), "") for width, text in zip(widths, values, strict=True)]


_STEP_STYLE = {"done": GREEN, "current": BOLD, "paused": YELLOW, "rolled back": RED, "aborted": RED}
_VERDICT_STYLE = {"passing": GREEN, "waiting": YELLOW, "failing": RED}


def _ladder_lines(ladder: Doc | None, now: float) -> list[Line]:
    """The stages as the dashboard's ladder shows them: the current one in brackets, then its
    countdown to the minimum time and its samples (the same texts: figures.ladder)."""
    if not ladder:
        return []
    steps: Line = [("stages    ", DIM)]
    for i, st in enumerate(ladder["stages"]):
        text = st["text"]["share"]
        mark = " ✓" if st["state"] == "done" else ""
        here = i == ladder["stage"] and st["state"] not in ("done", "next")
        steps += [
            (f"[{text} {st['state']}]" if here else text + mark, _STEP_STYLE.get(st["state"], DIM))
        ]
        steps.append(("  ", ""))
    steps.append((ladder["phase"], ""))
    if ladder.get("attempt"):
        steps.append((f" · attempt {ladder['attempt']}", ""))
    out = [steps]
    p = ladder.get("progress")
    if p:
        out.append(
            [
                ("progress  ", DIM),
                (f"{countdown_text(p['ends_at'] - now)} left", BOLD),
                (f" of the minimum {p['text']['min_time']}", ""),
                (f" · {p['text']['samples']}", ""),
                (f" · {p['text']['gate']}", DIM),
            ]
        )
    return out


def _verdict_lines(checks: list[Doc]) -> list[Line]:
    """The evaluator's newest verdict per guardrail, as the dashboard's table shows it: the
    harm with the evaluator's bound, the limit, the evidence or what a waiting check needs."""
    if not checks:
        return []
    out: list[Line] = [[], [("guardrails", BOLD), ("  (worse by · bound · limit · evidence)", DIM)]]
    for c in checks:
        v = verdict(c)
        t = v["text"]
        out.append(
            [
                (f"{c.get('variant')!s:<10}", ""),
                (f"{v['label']:<36}", ""),
                (f"{v['state']:<8}", _VERDICT_STYLE.get(v["state"], "")),
                (f"{t['estimate']:>9}", _VERDICT_STYLE.get(v["state"], "")),
                (f"  {t['bound']:<10}", ""),
                (f" limit {t['margin']:<7}", DIM),
                (f"  {t['needs'] or t['evidence']}", ""),
                (f"  ({c.get('action')})", DIM),
            ]
        )
    return out


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def frame_lines(
    doc: Doc | None,
    *,
    rates: dict[str, float] | None = None,
    now: float | None = None,
    interval: float | None = None,
    problem: str = "",
) -> list[Line]:
    """One frame as styled lines: a pure function of the status document (testable as text)."""
    now = time.time() if now is None else now
    every = f"every {interval:g}s, q quits" if interval else "one frame"
    names = (doc or {}).get("experiments") or []
    if interval and len(names) > 1:
        here = names.index(doc["experiment"]) + 1 if doc and doc["experiment"] in names else 0
        every += f", n/p: next/previous experiment ({here} of {len(names)})"
    if doc is None:
        lines: list[Line] = [
            [("extproc top", BOLD), (f"   {_clock(now)}  {every}", DIM)],
            [],
            [("no experiment in Redis yet: is the stack up (`extproc up`)?", YELLOW)],
        ]
        if problem:
            lines.append([(problem, RED)])
        return lines

    lines = [
        [
            ("extproc top", BOLD),
            (" · ", ""),
            (str(doc.get("experiment")), BOLD + ";" + CYAN),
            (f"  (stable: {doc.get('stable')}, {doc.get('strategy') or '-'})", ""),
            (f"   {_clock(now)}  {every}", DIM),
        ]
    ]
    ro = doc.get("rollout")
    if ro:
        reasons = "; ".join(ro.get("last_reasons") or [])
        lines.append(
            [
                ("rollout   ", DIM),
                (str(ro.get("status")), _STATUS_STYLE.get(str(ro.get("status")), "")),
                (f" · stage {int(ro.get('stage', 0)) + 1}", BOLD),
                (f" · last: {ro.get('last_action') or '-'}", ""),
                (f" · {reasons}" if reasons else "", DIM),
            ]
        )
    else:
        lines.append([("rollout   ", DIM), ("no evaluator state (fixed weights)", DIM)])
    lines += _ladder_lines(doc.get("ladder"), now)
    routing = doc.get("routing")
    if routing:
        w = ", ".join(f"{k} {v:g}%" for k, v in routing["weights"].items())
        lines.append(
            [
                ("routing   ", DIM),
                (f"v{routing['version']}", BOLD),
                (f": {w}", ""),
                (f"  ({routing.get('actor')}: {routing.get('reason')})", DIM),
            ]
        )
    name = doc.get("experiment")
    evals = [e for e in doc.get("evaluators", []) if e.get("experiment") == name]
    leader = next((e["instance"] for e in evals if e.get("active")), None)
    dropped = int((doc.get("telemetry") or {}).get("dropped", 0))
    health: Line = [
        ("replicas  ", DIM),
        (f"{len(doc.get('sidecars', []))} sidecar(s)", ""),
        (" · evaluator ", ""),
        (leader or ("standby only" if evals else "none"), "" if leader else YELLOW),
        (" · events dropped ", ""),
        (str(dropped), RED if dropped else ""),
    ]
    others = [n for n in doc.get("experiments", []) if n != name]
    if others:
        health.append((f" · also: {', '.join(others)}", DIM))
    lines.append(health)
    if problem:
        lines.append([(problem, RED)])

    stable = doc.get("stable")
    rows: list[tuple[str, Doc, float | None]] = [
        (var + (" *" if var == stable else ""), v, None if rates is None else rates.get(var))
        for var, v in doc.get("variants", {}).items()
    ]
    # Tester traffic and mirrored copies: never compared, so no weight and no exact total, only
    # the window.
    for kind in ("forced", "shadow"):
        rows += [(f"{var} ({kind})", v, None) for var, v in (doc.get(kind) or {}).items()]
    first = max([-COLUMNS[0][1], *(len(label) + 2 for label, _, _ in rows)])
    for columns in (COLUMNS, SIGNAL_COLUMNS):
        head = _cell(columns[0][0], -first) + "".join(_cell(h, w) for h, w in columns[1:])
        lines += [[], [(head, BOLD)]]
        if columns is COLUMNS:
            lines += [_variant_row(label, v, rate, first) for label, v, rate in rows]
        else:
            lines += [_signal_row(label, v, first) for label, v, _ in rows]
    refused = int(doc.get("window_refused") or 0)
    lines.append(
        [
            (
                f"* stable · figures over the last {duration_text(doc.get('window_s') or 0)}"
                + f" ({doc.get('window_events', 0)} requests"
                + (f", {refused} refused before routing)" if refused else ")")
                + "; requests are exact totals (forced included), the rest assigned traffic;"
                + " err% counts server errors, client% the clients' own",
                DIM,
            )
        ]
    )
    lines += _verdict_lines((doc.get("evaluation") or {}).get("checks") or [])
    audit = doc.get("audit") or []
    if audit:
        lines += [[], [("recent decisions", BOLD)]]
        for rec in audit[-3:]:
            action = str(rec.get("action"))
            style = RED if action in ("rollback", "abort") else GREEN if action == "advance" else ""
            lines.append(
                [
                    (f"{_clock(float(rec.get('time', 0)))}  ", DIM),
                    (f"{action:<9}", style),
                    (f" stage {int(rec.get('stage', 0)) + 1}  by {rec.get('actor')}  ", ""),
                    ("; ".join(rec.get("reasons") or []), DIM),
                ]
            )
    return lines


def render(
    doc: Doc | None,
    *,
    width: int | None = None,
    color: bool = False,
    rates: dict[str, float] | None = None,
    now: float | None = None,
    interval: float | None = None,
    problem: str = "",
) -> str:
    """One frame as text, cut to ``width`` columns, with colours only if ``color``."""
    lines = frame_lines(doc, rates=rates, now=now, interval=interval, problem=problem)
    return "\n".join(_paint(_visible(line, width), color) for line in lines)


def render_for(doc: Doc, out: TextIO) -> str:
    """One frame for ``out``: cut to the terminal's width and coloured on a terminal only."""
    width = shutil.get_terminal_size().columns if out.isatty() else None
    return render(doc, width=width, color=use_color(out))


def seconds(text: str) -> float:
    """argparse type of ``--interval``: a positive number of seconds (else exit code 2)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds above 0")
    return value


def use_color(out: TextIO) -> bool:
    """Colour on a terminal unless NO_COLOR is set (https://no-color.org)."""
    return out.isatty() and not os.environ.get("NO_COLOR")


@contextlib.contextmanager
def _keys(on_key: Callable[[bytes], None], stdin: TextIO | None) -> Iterator[None]:
    """Hand each key read from a terminal to ``on_key``: cbreak mode (keys without Enter;
    Ctrl-C still works). Without a terminal, no keys."""
    if stdin is None or not stdin.isatty():
        yield
        return
    import termios
    import tty

    fd = stdin.fileno()
    saved = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()
    tty.setcbreak(fd)
    loop.add_reader(fd, lambda: on_key(os.read(fd, 32)[:1].lower()))
    try:
        yield
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def step_experiment(doc: Doc | None, step: int) -> str | None:
    """The experiment ``step`` places from the one shown, in the list Redis holds (wrapping
    around); None when there is nothing to switch to."""
    if doc is None:
        return None
    names = list(doc.get("experiments") or [])
    here = doc.get("experiment")
    if here not in names or len(names) < 2:
        return None
    return str(names[(names.index(here) + step) % len(names)])


async def live(
    fetch: Fetch,
    *,
    interval: float,
    out: TextIO | None = None,
    stdin: TextIO | None = None,
    frames: int | None = None,
) -> None:
    """Redraw a frame every ``interval`` seconds until 'q', Ctrl-C or ``frames`` frames; 'n'
    and 'p' switch to the next and the previous experiment in Redis (``fetch(name)``, None
    first: the one asked for on the command line), redrawn at once.

    Redis trouble does not end the top: the last good frame stays, with the error above the
    table, and the next tick tries again (a rollout is most worth watching when things break).
    """
    out = sys.stdout if out is None else out
    tty_out = out.isatty()
    color = use_color(out)
    stop, wake = asyncio.Event(), asyncio.Event()
    tracker = RateTracker()
    doc: Doc | None = None
    name: str | None = None
    shown = 0
    text = ""

    def on_key(key: bytes) -> None:
        nonlocal name, tracker
        if key == b"q":
            stop.set()
        elif key in (b"n", b"p") and (other := step_experiment(doc, 1 if key == b"n" else -1)):
            name, tracker = other, RateTracker()  # rates are per experiment
        wake.set()

    if tty_out:
        out.write(_ALT_ON)
    try:
        with _keys(on_key, stdin):
            while not stop.is_set():
                raise_if_cancelled()  # Ctrl-C's cancel, swallowed by a stalled Redis's command
                problem = ""
                try:
                    doc = await fetch(name)
                    if doc is not None:
                        tracker.update(doc, time.monotonic())
                except (RedisError, OSError) as err:
                    problem = f"redis: {type(err).__name__}: {err} (retrying)"
                size = shutil.get_terminal_size()
                text = render(
                    doc,
                    width=size.columns if tty_out else None,
                    color=color,
                    rates=tracker.rates if doc is not None else None,
                    interval=interval,
                    problem=problem,
                )
                if tty_out:
                    rows = text.split("\n")[: max(1, size.lines - 1)]
                    out.write(_HOME + "".join(row + _EOL + "\n" for row in rows) + _EOS)
                else:
                    out.write(text + "\n\n")
                out.flush()
                shown += 1
                if frames is not None and shown >= frames:
                    break
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), interval)
    finally:
        if tty_out:  # leave the last frame in the scrollback, as a record of what was seen
            out.write(_ALT_OFF + text + "\n")
            out.flush()
