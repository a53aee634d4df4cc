"""`extproc pairs` as text: a multi-line prompt or answer stays one block under its label."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from extproc import store
from extproc.contract import keys
from tests.conftest import run_cli

pytestmark = pytest.mark.timeout(60)
NAME = "chat-upgrade"


def test_multi_line_prompts_and_answers_are_indented_under_their_label(
    redis_url: str, tmp_path: Path
) -> None:
    r = store.connect_sync(redis_url)
    r.flushdb()
    r.zadd(keys.pairs(NAME), {"req-1": 1.0})
    primary = {
        "variant": "stable",
        "status": 200,
        "prompt": "Summarise:\nfirst point\nsecond point",
        "answer": "Two points:\n- first\n- second",
    }
    shadow = {"variant": "canary", "status": 200, "answer": "One line."}
    r.hset(
        keys.pair(NAME, "req-1"),
        mapping={"primary": json.dumps(primary), "shadow": json.dumps(shadow)},
    )
    out = run_cli("pairs", NAME, "--redis-url", redis_url, "--state-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    answer = "   primary (stable, 200): "
    assert out.stdout.splitlines() == [
        "== req-1",
        "   prompt: Summarise:",
        "           first point",
        "           second point",
        answer + "Two points:",
        " " * len(answer) + "- first",
        " " * len(answer) + "- second",
        "   shadow  (canary, 200): One line.",
    ]
