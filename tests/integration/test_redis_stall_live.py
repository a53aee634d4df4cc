"""Redis stalled under load (``SIGSTOP``, as a slow fsync or a fork would): the sidecar's writes
time out, Redis runs them anyway once it resumes, and the sidecar retries. Every request must
still be recorded exactly once and the exact per-variant counts must equal the events."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import httpx
import pytest

from extproc.contract import keys
from extproc.dev import stack
from tests.conftest import LiveStack, wait_for
from tests.integration.test_faults_load_live import Load, fixed_split_stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def redis_up(s: LiveStack) -> float:
    """The sidecar's own view of Redis (its ``extproc_redis_up`` gauge)."""
    text = httpx.get(s.state["endpoints"]["sidecar_metrics"], timeout=5).text
    line = next(ln for ln in text.splitlines() if ln.startswith("extproc_redis_up "))
    return float(line.split()[1])


def stall(s: LiveStack, load: Load) -> None:
    """Stop Redis until the sidecar's writes have timed out, then let it run what it received."""
    pid = s.pid("redis")
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: redis_up(s) == 0, "the sidecar's writes to time out", timeout_s=30)
        load.wait_more(10, "traffic while redis is stalled")
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: redis_up(s) == 1, "the sidecar to reach redis again", timeout_s=30)


def test_redis_stalls_under_load_record_every_request_once(tmp_path: Path) -> None:
    s = fixed_split_stack(tmp_path, canary=50, request_timeout_s=2)
    try:
        with Load(s) as load:
            load.wait_more(20, "traffic before the stalls")
            for _ in range(2):
                stall(s, load)
                load.wait_more(20, "traffic after the stall")
        sent = {r.request_id for r in load.results if r.status == 200}
        r = s.redis()

        def recorded() -> list[str] | None:
            got = [ev.request_id for ev in s.events()]
            return got if sent <= set(got) else None

        ids = wait_for(recorded, "every request's event", timeout_s=60)
        twice = [rid for rid, n in Counter(ids).items() if n > 1]
        print(
            f"\n[redis stalled twice] requests {len(sent)}, events {len(ids)}, twice {len(twice)}"
        )
        assert load.non_2xx() == 0, load.failures
        assert twice == []
        counts = {k.decode(): int(v) for k, v in r.hgetall(keys.counts("chat-upgrade")).items()}
        assert sum(counts.values()) == len(ids)
    finally:
        stack.down(s.state_dir)
