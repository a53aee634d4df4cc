"""`extproc experiment create | list | show | restart` against a real Redis: JSON output and exit
codes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis

from extproc.config import EXAMPLE_EXPERIMENT
from extproc.contract import keys
from extproc.evaluator.rollout import RolloutState
from tests.conftest import run_cli

pytestmark = pytest.mark.timeout(60)


def cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("experiment", *args, "--redis-url", redis_url)


def doc(out: subprocess.CompletedProcess[str]) -> Any:
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_create_list_show(redis_url: str, tmp_path: Path) -> None:
    first = doc(cli(redis_url, "create", str(EXAMPLE_EXPERIMENT), "--json"))
    assert first["experiment"] == "chat-upgrade"
    assert first["weights"] == {"stable": 95.0, "canary": 5.0}

    again = cli(redis_url, "create", str(EXAMPLE_EXPERIMENT))
    assert again.returncode == 2
    assert "already exists" in again.stderr
    assert "--replace" in again.stderr

    changed = tmp_path / "exp.yaml"
    changed.write_text(EXAMPLE_EXPERIMENT.read_text().replace("alpha: 0.05", "alpha: 0.01"))
    replaced = doc(cli(redis_url, "create", str(changed), "--replace", "--json"))
    assert replaced["version"] == first["version"]  # live weights are kept

    rows = doc(cli(redis_url, "list", "--json"))
    row = next(r for r in rows if r["name"] == "chat-upgrade")
    assert row["status"] == "not started"
    assert row["weights"] == first["weights"]

    shown = doc(cli(redis_url, "show", "chat-upgrade", "--json"))
    assert shown["routing"]["version"] == first["version"]
    assert shown["rollout"] is None
    assert shown["definition"]["rollout"]["alpha"] == pytest.approx(0.01)


def test_errors_say_what_to_do(redis_url: str, tmp_path: Path) -> None:
    missing = cli(redis_url, "show", "no-such")
    assert missing.returncode == 2
    assert "extproc experiment list" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsalt: s\nstable: a\nvariants: {a: {cluster: c, weight: 150}}\n")
    out = cli(redis_url, "create", str(bad))
    assert out.returncode == 2
    assert "variants.a.weight: must be 0..100" in out.stderr
    assert "variants" in out.stderr


def test_restart_is_recorded_only_after_the_rollout_ended(redis_url: str) -> None:
    """The evaluator would ignore a restart of a running rollout; the CLI says so at once."""
    doc(cli(redis_url, "create", str(EXAMPLE_EXPERIMENT), "--replace", "--json"))
    r = redis.Redis.from_url(redis_url)
    r.delete(keys.rollout("chat-upgrade"), keys.commands("chat-upgrade"))
    state = RolloutState(status="running", stage=2, stage_started=1.0, strategy="canary")
    for status, refusal in ((None, "not started"), ("running", "running"), ("paused", "paused")):
        if status is not None:
            state.status = status
            r.set(keys.rollout("chat-upgrade"), state.to_json())
        out = cli(redis_url, "restart", "chat-upgrade")
        assert out.returncode == 2, status
        assert f"rollout is {refusal}" in out.stderr
        assert "experiment rollback" in out.stderr
    assert r.xlen(keys.commands("chat-upgrade")) == 0
    state.status = "rolled_back"
    r.set(keys.rollout("chat-upgrade"), state.to_json())
    recorded = doc(cli(redis_url, "restart", "chat-upgrade", "--reason", "fixed", "--json"))
    assert recorded["command"] == "restart"
    [(_, fields)] = r.xrange(keys.commands("chat-upgrade"))
    assert (fields[b"command"], fields[b"reason"]) == (b"restart", b"fixed")


def _matching(tmp_path: Path, name: str, match: str) -> Path:
    """The example experiment under another name, taking the requests ``match`` (YAML) names."""
    text = EXAMPLE_EXPERIMENT.read_text().replace("name: chat-upgrade", f"name: {name}")
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"{text}\nmatch: {match}\n")
    return path


def test_end_retires_an_experiment_and_keeps_its_data(redis_url: str, tmp_path: Path) -> None:
    code = str(_matching(tmp_path, "code-x", "{routes: [code]}"))
    created = doc(cli(redis_url, "create", code, "--json"))
    assert created["experiment"] == "code-x"
    ended = doc(cli(redis_url, "end", "code-x", "--reason", "shipped", "--json"))
    assert ended == {"experiment": "code-x", "ended": True}
    r = redis.Redis.from_url(redis_url)
    assert not r.sismember(keys.EXPERIMENTS, "code-x")
    assert r.zscore(keys.ENDED, "code-x") is not None
    assert r.exists(keys.definition("code-x"))
    audit = [json.loads(f[b"j"]) for _, f in r.xrange(keys.audit("code-x"))]
    assert audit[-1]["event"] == "ended"
    assert audit[-1]["reason"] == "shipped"
    again = doc(cli(redis_url, "end", "code-x", "--json"))
    assert again["ended"] is False
    # Created again, it is live again.
    doc(cli(redis_url, "create", code, "--replace", "--json"))
    assert r.sismember(keys.EXPERIMENTS, "code-x")
    assert r.zscore(keys.ENDED, "code-x") is None


def test_create_refuses_an_experiment_overlapping_a_live_one(
    redis_url: str, tmp_path: Path
) -> None:
    doc(
        cli(redis_url, "create", str(_matching(tmp_path, "chat-a", "{models: [m1, m2]}")), "--json")
    )
    clash = cli(redis_url, "create", str(_matching(tmp_path, "chat-b", "{models: [m2, m3]}")))
    assert clash.returncode == 2
    assert "match: chat-b and chat-a both match model 'm2'" in clash.stderr
    doc(cli(redis_url, "create", str(_matching(tmp_path, "chat-c", "{models: [m3]}")), "--json"))
    # Once chat-a ended, its models are free.
    doc(cli(redis_url, "end", "chat-a", "--json"))
    doc(cli(redis_url, "create", str(_matching(tmp_path, "chat-b", "{models: [m2]}")), "--json"))
