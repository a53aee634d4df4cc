"""An A/B run in a real Redis ends in a stated decision: the evaluator publishes it (its
evaluation, the audit log, `extproc status`), and `extproc export` plus `extproc analyze
--signals` replay the same decision from the same streams.

The run is simulated (``bench/ab_traffic.py``: events and judge verdicts, rubric scores and
feedback with a known truth) and written into the streams the sidecars and the quality worker
write, with stream ids at the times they would have been written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from extproc import store
from extproc.config import load_experiment
from extproc.contract import keys, signals
from extproc.evaluator.rollout import RolloutState, read_audit
from extproc.evaluator.service import Evaluator
from extproc.evaluator.signal_log import RecordedSignal
from extproc.telemetry.export import RecordedEvent
from tests.conftest import run_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import ab_traffic as at
import simulate_ab_decision as sim

pytestmark = pytest.mark.timeout(120)
HEADLINE = {"ship": "SHIP THE CANDIDATE", "keep": "KEEP STABLE"}


async def write_run(
    r: aioredis.Redis, name: str, events: list[RecordedEvent], sigs: list[RecordedSignal]
) -> None:
    """The events and signals, each stream in the order (and at the ids) of its writers."""
    async with r.pipeline(transaction=False) as pipe:
        for k, e in enumerate(sorted(events, key=lambda e: e.seen_ms)):
            pipe.xadd(
                keys.events(name),
                {keys.EVENT_FIELD: e.event.SerializeToString()},
                id=f"{e.seen_ms}-{k}",
            )
        for k, s in enumerate(sorted(sigs, key=lambda s: s.seen_ms)):
            pipe.xadd(
                keys.signals(name),
                {signals.FIELD: signals.to_json(s.signal)},
                id=f"{s.seen_ms}-{k}",
            )
        await pipe.execute()


@pytest.mark.parametrize(("truth", "outcome"), [(at.BETTER, "ship"), (at.WORSE, "keep")])
async def test_the_ab_run_states_its_decision_live_and_in_the_replay(
    client: aioredis.Redis, redis_url: str, tmp_path: Path, truth: at.Truth, outcome: str
) -> None:
    config = tmp_path / "ab.yaml"
    config.write_text(json.dumps(sim.EXPERIMENT), encoding="utf-8")
    exp = load_experiment(config)
    events, sigs = at.ab_run(truth, 7)
    await store.register_experiment(client, exp)
    await write_run(client, exp.name, events, sigs)
    # The run began with its first request: the evaluator takes over a running A/B there.
    began = RolloutState("running", 0, at.T0 / 1000, "ab")
    await client.set(keys.rollout(exp.name), began.to_json())

    evaluator = Evaluator(exp, client, "ab-test", lease_ttl_s=30)
    assert await evaluator._hold_lease()
    await evaluator.tick()
    assert evaluator.state is not None
    assert evaluator.state.status == "completed"

    evaluation = json.loads(await client.get(keys.evaluation(exp.name)))
    assert [d["outcome"] for d in evaluation["decisions"]] == [outcome]
    audit = (await read_audit(client, exp.name))[-1]
    assert audit["action"] == "complete"
    assert [d["outcome"] for d in audit["decisions"]] == [outcome]
    win = next(m for m in audit["decisions"][0]["metrics"] if m["metric"] == "judge_win_rate")
    assert win["n_candidate"] > 900  # the judge's verdicts came from the signal stream

    status = run_cli("status", exp.name, "--redis-url", redis_url, "--state-dir", str(tmp_path))
    assert status.returncode == 0, status.stderr
    assert f"A/B decision for canary: {HEADLINE[outcome]}" in status.stdout
    assert "judge win rate (primary, higher is better)" in status.stdout

    logged, signalled = tmp_path / "events.jsonl", tmp_path / "signals.jsonl"
    for extra, path in (((), logged), (("--signals",), signalled)):
        out = run_cli("export", exp.name, *extra, "-o", str(path), "--redis-url", redis_url)
        assert out.returncode == 0, out.stderr
    assert len(signalled.read_text(encoding="utf-8").splitlines()) == len(sigs)
    replayed = run_cli("analyze", str(logged), "--config", str(config), "--signals", str(signalled))
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.splitlines()[-1].startswith(
        f"A/B decision for canary: {HEADLINE[outcome]}"
    )


def test_a_bad_signal_log_is_refused_with_its_line(tmp_path: Path) -> None:
    config = tmp_path / "ab.yaml"
    config.write_text(json.dumps(sim.EXPERIMENT), encoding="utf-8")
    events = tmp_path / "events.jsonl"
    events.write_text("", encoding="utf-8")
    bad = tmp_path / "signals.jsonl"
    bad.write_text('{"kind": "feedback"}\n', encoding="utf-8")
    out = run_cli("analyze", str(events), "--config", str(config), "--signals", str(bad))
    assert out.returncode == 2
    assert f"{bad} line 1: not a valid signal" in out.stderr
