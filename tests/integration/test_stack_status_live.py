"""`extproc status` names the parts of the local stack that have stopped.

`up` starts its processes and returns; a crashed sidecar or evaluator is not restarted, so the
operator must learn of it from `status` rather than from figures that quietly stop moving.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from extproc.cli import common
from extproc.dev import stack
from tests.conftest import LiveStack, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def kill(s: LiveStack, name: str) -> int:
    """SIGKILL one of the stack's processes and wait until it is gone; returns its pid."""
    proc = s.state["processes"][name]
    os.kill(int(proc["pid"]), signal.SIGKILL)
    wait_for(lambda: not stack._alive(proc), f"{name} to die")
    return int(proc["pid"])


def test_status_names_a_killed_evaluator_and_then_a_killed_redis(own_stack: LiveStack) -> None:
    s = own_stack
    assert s.status()["stack"]["down"] == []
    assert "DOWN" not in s.cli("status").stdout

    pid = kill(s, "evaluator")
    out = s.cli("status", "--json")
    assert out.returncode == common.EXIT_OK, out.stderr
    report = json.loads(out.stdout)["stack"]
    assert report["down"] == ["evaluator"]
    assert report["components"]["evaluator"] == {
        "pid": pid,
        "running": False,
        "log": s.state["processes"]["evaluator"]["log"],
    }
    assert all(
        part["running"] for name, part in report["components"].items() if name != "evaluator"
    )
    assert f"DOWN       evaluator (pid {pid}) is not running" in out.stderr
    human = s.cli("status")
    assert f"DOWN       evaluator (pid {pid}) is not running" in human.stdout
    assert "restart the stack" in human.stdout

    # With Redis gone there are no figures, but status still says what is down.
    kill(s, "redis")
    out = s.cli("status")
    assert out.returncode == common.EXIT_FAIL
    assert "DOWN       evaluator" in out.stderr
    assert "DOWN       redis" in out.stderr
