"""`extproc top`: frames built from a real Redis (events written by the real telemetry writer),
checked against `extproc status --json`; the live mode driven through a pseudo-terminal, and,
where tmux exists, inside a real tmux pane."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from extproc import store
from extproc.config import EXAMPLE_EXPERIMENT, load_experiment, parse_experiment
from extproc.contract import keys
from extproc.dev import stack
from extproc.evaluator.rollout import RolloutState, append_audit
from extproc.ops import top
from extproc.ops.figures import fixed
from extproc.telemetry.v1.event_pb2 import Assignment, ErrorClass, TelemetryEvent
from extproc.telemetry.writer import TelemetryWriter
from tests.conftest import run_cli

pytestmark = pytest.mark.timeout(60)

EXP = load_experiment(EXAMPLE_EXPERIMENT)
NAME = EXP.name


def events(variant: str, n: int, *, duration_ms: float, errors: int = 0) -> list[TelemetryEvent]:
    out = []
    for i in range(n):
        failed = i < errors
        out.append(
            TelemetryEvent(
                experiment=NAME,
                variant=variant,
                request_id=f"{variant}-{time.monotonic_ns()}-{i}",
                time_unix_ms=int(time.time() * 1000),  # within the figures' window
                assignment=Assignment.ASSIGNMENT_STICKY,
                status=502 if failed else 200,
                error=ErrorClass.ERROR_CLASS_UPSTREAM_5XX
                if failed
                else ErrorClass.ERROR_CLASS_NONE,
                duration_ms=duration_ms + i,
                first_token_ms=duration_ms / 4,
                prompt_tokens=20,
                completion_tokens=50,
            )
        )
    return out


def write(url: str, evs: list[TelemetryEvent]) -> None:
    async def go() -> None:
        r = store.connect(url)
        try:
            w = TelemetryWriter(r)
            for ev in evs:
                w.submit(ev)
            await w.flush()
        finally:
            await r.aclose()

    asyncio.run(go())


@pytest.fixture
def seeded(redis_url: str) -> str:
    """An experiment with routing, 40 stable and 10 canary events, rollout state and an audit."""

    async def go() -> None:
        r = store.connect(redis_url)
        try:
            await r.flushdb()
            await store.register_experiment(r, EXP)
            state = RolloutState(
                status="running",
                stage=1,
                stage_started=time.time(),
                strategy="canary",
                last_action="advance",
                last_reasons=["guardrails pass"],
            )
            await r.set(keys.rollout(NAME), state.to_json())
            await append_audit(
                r,
                NAME,
                {
                    "time": time.time(),
                    "action": "advance",
                    "actor": "evaluator test",
                    "reasons": ["guardrails pass"],
                    "stage": 1,
                    "status": "running",
                    "weights": {"stable": 95, "canary": 5},
                },
            )
        finally:
            await r.aclose()

    asyncio.run(go())
    write(redis_url, events("stable", 40, duration_ms=100) + events("canary", 10, duration_ms=300))
    return redis_url


def cli(url: str, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """In-process; its output is no terminal, so `top` draws no colours (as with NO_COLOR)."""
    return run_cli(*args, "--redis-url", url, "--state-dir", str(tmp))


def row(text: str, label: str) -> list[str]:
    """The cells of a variant's row (the label may contain spaces: 'stable *')."""
    for line in text.splitlines():
        if line.startswith(label + " ") or line == label:
            return line[len(label) :].split()
    raise AssertionError(f"no row {label!r} in:\n{text}")


HEAD = [h for h, _ in top.COLUMNS]


def test_once_matches_status_json(seeded: str, tmp_path: Path) -> None:
    out = cli(seeded, tmp_path, "top", NAME, "--once")
    assert out.returncode == 0, out.stderr
    assert "\x1b[" not in out.stdout  # not a terminal: no escape codes
    status = cli(seeded, tmp_path, "status", NAME, "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)

    for label, name in (("stable *", "stable"), ("canary", "canary")):
        cells = dict(zip(HEAD[1:], row(out.stdout, label), strict=True))
        v = doc["variants"][name]
        assert int(cells["requests"]) == v["requests"]
        assert cells["weight"] == f"{v['weight']:.1f}%"
        assert float(cells["err%"]) == pytest.approx(100 * v["error_rate"], abs=0.05)
        for q in ("p50", "p95", "p99"):
            assert float(cells[f"{q} ms"]) == pytest.approx(v["latency_ms"][q], abs=0.5)
        assert float(cells["ttft p50"]) == pytest.approx(v["ttft_ms"]["p50"], abs=0.5)
        assert int(cells["tok in"]) == v["prompt_tokens"]
        assert int(cells["tok out"]) == v["completion_tokens"]
        assert cells["req/s"] == "-"  # one frame: no rate yet
    assert doc["variants"]["stable"]["requests"] == 40
    assert doc["variants"]["canary"]["requests"] == 10
    assert "rollout   running · stage 2 · last: advance · guardrails pass" in out.stdout
    assert f"routing   v{doc['routing']['version']}: stable 95%, canary 5%" in out.stdout
    assert "recent decisions" in out.stdout
    assert "advance   stage 2  by evaluator test" in out.stdout


def test_once_without_experiment_fails_with_advice(redis_url: str, tmp_path: Path) -> None:
    async def empty() -> None:
        r = store.connect(redis_url)
        try:
            await r.flushdb()
        finally:
            await r.aclose()

    asyncio.run(empty())
    out = cli(redis_url, tmp_path, "top", "--once")
    assert out.returncode == 1
    assert "extproc up" in out.stderr


def test_interval_must_be_positive(redis_url: str, tmp_path: Path) -> None:
    for bad in ("0", "-1", "soon"):
        out = cli(redis_url, tmp_path, "top", "--interval", bad)
        assert out.returncode == 2
        assert "above 0" in out.stderr


def test_unreachable_redis_is_an_operational_failure(tmp_path: Path) -> None:
    out = cli(f"redis://127.0.0.1:{stack.free_port()}/0", tmp_path, "top", "--once")
    assert out.returncode == 1
    assert "extproc:" in out.stderr


def test_render_cuts_lines_to_the_width_and_colours_only_on_request() -> None:
    doc = {
        "experiment": NAME,
        "stable": "stable",
        "variants": {
            "stable": {"requests": 5, "error_rate": 0.0, "weight": 90.0},
            "canary": {"requests": 1, "error_rate": 0.5, "weight": 10.0},
        },
        "rollout": {"status": "rolled_back", "stage": 0, "last_action": "rollback"},
    }
    plain = top.render(doc, width=40)
    assert max(len(line) for line in plain.splitlines()) <= 40
    assert "\x1b[" not in plain
    coloured = top.render(doc, color=True)
    assert "\x1b[31mrolled_back\x1b[0m" in coloured  # a rollback stands out
    assert top.render(None).count("extproc up") == 1


def test_rates_come_from_the_exact_counters_between_frames() -> None:
    t = top.RateTracker()
    assert t.update({"variants": {"a": {"requests": 10}}}, 100.0) == {}
    assert t.update({"variants": {"a": {"requests": 30}, "b": {"requests": 4}}}, 102.0) == {
        "a": 10.0,
        "b": 0.0,
    }


# --- live mode ---------------------------------------------------------------------------------


def _read_until(fd: int, done: Callable[[bytes], bool], timeout_s: float = 20.0) -> bytes:
    """Read a pty until ``done(everything read so far)``; waits on readiness, with a deadline."""
    got = b""
    deadline = time.monotonic() + timeout_s
    while not done(got):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out; read so far:\n{got.decode(errors='replace')}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            got += chunk
    return got


def _last_frame(raw: bytes) -> str:
    """The last complete frame drawn in place, without escape codes."""
    frames = raw.split(b"\x1b[H")
    text = frames[-1] if b"\x1b[J" in frames[-1] else frames[-2] if len(frames) > 1 else b""
    return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", text.decode(errors="replace"))


def _canary_requests(raw: bytes) -> str:
    try:
        return row(_last_frame(raw), "canary")[1]
    except AssertionError:
        return ""


def spawn_top(url: str, tmp: Path, *args: str, columns: int) -> tuple[subprocess.Popen[bytes], int]:
    """`extproc top NAME ARGS` on Redis ``url`` in a pseudo-terminal 40 rows by ``columns``; the
    process and the terminal's master side (the caller closes it)."""
    where = ["--redis-url", url, "--state-dir", str(tmp)]
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "top", NAME, *args, *where],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")},
        close_fds=True,
    )
    os.close(slave)
    return proc, master


def test_live_redraws_in_place_updates_and_quits_on_q(seeded: str, tmp_path: Path) -> None:
    proc, master = spawn_top(seeded, tmp_path, "--interval", "0.2", columns=160)
    try:
        seen = _read_until(master, lambda b: b.count(b"\x1b[H") >= 2)
        assert seen.startswith(b"\x1b[?1049h")  # the alternate screen, like top(1)
        assert b"canary" in seen
        # New traffic shows up in a later frame, with a request rate.
        write(seeded, events("canary", 25, duration_ms=300))
        seen += _read_until(master, lambda b: _canary_requests(seen + b) == "35")
        cells = row(_last_frame(seen), "canary")
        assert float(cells[2]) > 0  # req/s, from the counters of two frames
        os.write(master, b"q")
        tail = _read_until(master, lambda b: b"\x1b[?1049l" in b and b.endswith(b"\n"))
        assert proc.wait(timeout=10) == 0
        assert b"\x1b[?25h" in tail  # the cursor is back
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(master)


def test_n_and_p_switch_between_the_experiments_in_redis(seeded: str, tmp_path: Path) -> None:
    other = parse_experiment({**EXP.to_json_dict(), "name": "code-upgrade", "salt": "c"})

    async def add() -> None:
        r = store.connect(seeded)
        try:
            await store.register_experiment(r, other)
        finally:
            await r.aclose()

    asyncio.run(add())
    proc, master = spawn_top(seeded, tmp_path, "--interval", "60", columns=200)

    def showing(name: str, seen: bytes) -> bool:
        return f"extproc top · {name} " in _last_frame(seen)

    try:
        seen = _read_until(master, lambda b: showing(NAME, b))
        assert "n/p: next/previous experiment (1 of 2)" in _last_frame(seen)
        os.write(master, b"n")  # redrawn at once, not at the next tick a minute later
        seen += _read_until(master, lambda b: showing("code-upgrade", seen + b))
        assert "(2 of 2)" in _last_frame(seen)
        os.write(master, b"p")
        seen += _read_until(master, lambda b: showing(NAME, seen + b))
        os.write(master, b"q")
        _read_until(master, lambda b: b"\x1b[?1049l" in b)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(master)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_live_in_a_tmux_pane(seeded: str, tmp_path: Path) -> None:
    sock = f"extproc-test-{os.getpid()}"
    tmux = ["tmux", "-L", sock, "-f", "/dev/null"]
    rc_file = tmp_path / "rc"
    cmd = (
        f"{sys.executable} -m extproc top {NAME} --interval 0.2 --redis-url {seeded} "
        f"--state-dir {tmp_path}; echo $? > {rc_file}"
    )
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", "top", "-x", "160", "-y", "40", cmd],
        check=True,
        timeout=10,
    )

    def pane() -> str:
        out = subprocess.run(
            [*tmux, "capture-pane", "-p", "-t", "top"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return out.stdout

    def table() -> str:
        text = pane()
        return text if "recent decisions" in text else ""

    try:
        shown = stack.wait_until(table, "top in tmux")
        assert row(shown, "stable *")[1] == "40"
        assert row(shown, "canary")[1] == "10"
        subprocess.run([*tmux, "send-keys", "-t", "top", "q"], check=True, timeout=10)
        stack.wait_until(lambda: rc_file.exists() and rc_file.read_text().strip(), "top to quit")
        assert rc_file.read_text().strip() == "0"
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10, check=False)


def test_signals_and_forced_traffic_match_status_json(redis_url: str, tmp_path: Path) -> None:
    """The second table shows the answer signals as status counts them (assigned traffic only),
    and tester traffic gets rows of its own instead of moving the variant's figures."""

    async def register() -> None:
        r = store.connect(redis_url)
        try:
            await r.flushdb()
            await store.register_experiment(r, EXP)
        finally:
            await r.aclose()

    asyncio.run(register())
    stable = events("stable", 8, duration_ms=100)
    for i, ev in enumerate(stable):
        ev.tool_calls = i < 2
        ev.empty_answer = i == 0
        ev.cached_prompt_tokens = 10
        ev.streamed = True
    forced = events("canary", 6, duration_ms=300, errors=6)
    for ev in forced:
        ev.assignment = Assignment.ASSIGNMENT_FORCED
    write(redis_url, stable + events("canary", 4, duration_ms=300) + forced)
    out = cli(redis_url, tmp_path, "top", NAME, "--once")
    assert out.returncode == 0, out.stderr
    doc = json.loads(cli(redis_url, tmp_path, "status", NAME, "--json").stdout)
    signals = out.stdout.split("timeout%", 1)[1]  # the second table
    head = [h for h, _ in top.SIGNAL_COLUMNS[1:]]
    st = dict(zip(head, row(signals, "stable *"), strict=True))
    v = doc["variants"]["stable"]
    assert st["tools%"] == "25.0" == f"{100 * v['tool_call_rate']:.1f}"
    assert st["empty%"] == "12.5"
    assert st["cached/req"] == "10.0"
    assert st["tok/s"] == fixed(v["output_tokens_per_s"], 1)
    canary = dict(zip(head, row(signals, "canary"), strict=True))
    assert canary["forced"] == "6"
    # The forced failures are not the canary's: its err% is 0, its forced row's 100.
    assert row(out.stdout, "canary")[3] == "0.0"
    assert row(out.stdout, "canary (forced)")[3] == "100.0"
    assert doc["forced"]["canary"]["error_rate"] == 1.0


FAILING = {
    "variant": "canary",
    "metric": "latency_p99",
    "action": "rollback",
    "status": "fail",
    "estimate": 8.709,
    "bound": 6.2,
    "margin": 0.5,
    "detail": "latency_p99: tail ratio 9.71; evidence e=77.4 over the rollout (fails at 60)",
    "evidence": 4.349,
    "threshold": 60.0,
}
WAITING = {
    "variant": "canary",
    "metric": "error_rate",
    "action": "rollback",
    "status": "waiting",
    "estimate": None,
    "bound": None,
    "margin": 0.5,
    "detail": "12/100 candidate requests",
    "evidence": None,
    "have": 12,
    "need": 100,
    "counting": "candidate requests",
}


def test_top_shows_the_ladder_and_the_dashboards_verdicts(seeded: str, tmp_path: Path) -> None:
    """The same texts as the dashboard's guardrail table and ladder (both from figures)."""
    from extproc.ops import figures

    look = {"time": time.time(), "stage": 1, "variants": {"canary": {"requests": 10}}}
    look["checks"] = [FAILING, WAITING]
    store.connect_sync(seeded).set(keys.evaluation(NAME), json.dumps(look))
    out = cli(seeded, tmp_path, "top", NAME, "--once")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "2% \u2713  [5% current]  10%  25%  50%  100%  stage 2 of 6 (5%), running" in out.stdout
    assert "of the minimum 5 min · 10 of 200 candidate requests · then the guardrails" in out.stdout
    failing = next(line for line in lines if "p99 latency (ms)" in line)
    want = figures.verdict(FAILING)["text"]
    assert want["evidence"] == "e = 77 of 60 needed"
    for part in ("failing", want["estimate"], want["bound"], want["margin"], want["evidence"]):
        assert part in failing
    waiting = next(line for line in lines if figures.label("error_rate") in line)
    assert "needs 88 more candidate requests (12 of 100)" in waiting
