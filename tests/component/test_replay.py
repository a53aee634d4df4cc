"""Offline replay (`extproc analyze`) and the JSON-lines export (`extproc export`).

Synthetic logs are drawn with numpy: a healthy candidate, and candidates that degrade mid-log.
"""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import yaml

from extproc.config import parse_experiment
from extproc.contract import keys
from extproc.evaluator import machine
from extproc.evaluator.replay import judged_weights, replay
from extproc.evaluator.window import VariantWindow
from extproc.telemetry.export import (
    EventLogError,
    RecordedEvent,
    event_from_dict,
    event_to_dict,
    iter_jsonl,
    parse_since,
    read_jsonl,
)
from extproc.telemetry.v1.event_pb2 import Assignment, ErrorClass, TelemetryEvent
from tests.conftest import run_cli

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
EXPERIMENT: dict[str, Any] = {
    "name": "exp",
    "salt": "s",
    "stable": "stable",
    "variants": {
        "stable": {"cluster": "a", "weight": 90},
        "canary": {"cluster": "b", "weight": 10},
    },
    "rollout": {
        "stages": [10, 50, 100],
        "min_stage_seconds": 120,
        "min_stage_samples": 50,
        "cadence_s": 5,
    },
    "guardrails": [
        {"metric": "error_rate", "max_increase": 0.5, "min_samples": 50},
        {"metric": "latency_p50", "max_increase": 0.2, "min_samples": 50},
        {"metric": "completion_tokens", "max_increase": 0.5, "action": "warn", "min_samples": 50},
    ],
}


def synthetic_log(
    seed: int = 1,
    seconds: float = 480,
    rps: float = 20,
    share: float = 0.2,
    degrade_at_s: float | None = None,
    errors: float = 0.01,
    latency_factor: float = 1.0,
    stream_ids: bool = True,
) -> list[dict[str, Any]]:
    """Exported lines of a recorded canary: after ``degrade_at_s`` the candidate gets worse."""
    rng = np.random.default_rng(seed)
    n = int(rng.poisson(rps * seconds))
    start = np.sort(rng.uniform(0, seconds * 1000, n)).astype(np.int64) + T0
    cand = rng.random(n) < share
    bad = cand & (start >= T0 + 1000 * (degrade_at_s if degrade_at_s is not None else 1e12))
    failed = rng.random(n) < np.where(bad, errors, 0.01)
    latency = rng.lognormal(np.log(800), 0.3, n) * np.where(bad, latency_factor, 1.0)
    tokens = rng.poisson(120, n)
    lines = []
    for i in range(n):
        ev = TelemetryEvent(
            time_unix_ms=int(start[i]),
            request_id=f"r{i}",
            experiment="exp",
            variant="canary" if cand[i] else "stable",
            key_hash=f"k{i}",
            assignment=Assignment.ASSIGNMENT_STICKY,
            streamed=True,
            recorder="test",
        )
        if failed[i]:
            ev.status, ev.error = 502, ErrorClass.ERROR_CLASS_UPSTREAM_5XX
        else:
            ev.status = 200
            ev.duration_ms = float(latency[i])
            ev.first_token_ms = float(latency[i]) / 4
            ev.completion_tokens = int(tokens[i])
            ev.response_bytes = int(4 * tokens[i])
        end = int(start[i] + np.ceil(latency[i]))
        lines.append(event_to_dict(ev, f"{end}-{i}" if stream_ids else None))
    return lines


def recorded(lines: list[dict[str, Any]]) -> list[RecordedEvent]:
    return list(iter_jsonl((json.dumps(d) for d in lines), "log"))


@pytest.fixture
def spec() -> Any:
    return parse_experiment(EXPERIMENT).spec


def test_healthy_candidate_is_walked_to_the_end(spec: Any) -> None:
    res = replay(spec, recorded(synthetic_log()), split="observed")
    actions = [(p.action, p.stage) for p in res.trajectory]
    assert actions == [("start", 0), ("advance", 1), ("advance", 2), ("complete", 2)]
    assert res.status == "completed"
    assert res.weights == {"canary": 100, "stable": 0}
    times = [p.elapsed_s for p in res.trajectory]
    assert all(b - a >= 120 for a, b in itertools.pairwise(times))  # min_stage_seconds
    assert all(t % 5 == 0 for t in times)  # checkpoints at the cadence
    assert all(g.failed == 0 for g in res.guardrails if g.action == "rollback")
    advance = res.trajectory[1]
    assert advance.weights == {"canary": 50, "stable": 50}
    assert 15 < advance.observed["canary"] < 25  # the recorded split, not the schedule's
    assert advance.snapshot["canary"]["requests"] >= 50  # the window the decision was made on


@pytest.mark.parametrize(
    ("case", "changes", "reason"),
    [
        ("errors 1% -> 25%", {"errors": 0.25}, "error rate"),
        ("latency x3", {"latency_factor": 3.0}, "latency_p50"),
    ],
)
def test_degrading_candidate_is_rolled_back_after_it_degrades(
    spec: Any, case: str, changes: dict[str, float], reason: str
) -> None:
    res = replay(spec, recorded(synthetic_log(degrade_at_s=180, **changes)), split="observed")
    assert res.status == "rolled_back", case
    last = res.trajectory[-1]
    assert last.action == "rollback"
    assert 180 < last.elapsed_s <= 240, case  # before the stage it degraded in could end
    assert last.stage == 1
    assert last.weights == {"stable": 100, "canary": 0}
    assert any(reason in r for r in last.reasons), last.reasons
    fired = [g for g in res.guardrails if g.failed]
    assert fired
    assert all(g.first_fail_ms and g.first_fail_ms > T0 + 180_000 for g in fired)
    assert res.to_json()["final"]["status"] == "rolled_back"


def test_replay_is_the_machine_checkpoint_by_checkpoint(spec: Any) -> None:
    """Every checkpoint row matches a hand-driven loop over the machine with plain windows."""
    events = sorted(recorded(synthetic_log(seed=3, seconds=300)), key=lambda e: e.seen_ms)
    res = replay(spec, events, every_checkpoint=True, split="observed")
    start = machine.start(spec, res.start_ms / 1000)
    state, weights = start.state, start.weights or {}
    window = machine.new_window(spec, state.stage_started)
    rows, i, now = [], 0, res.start_ms
    while state.status == "running" and now < res.end_ms:
        now += 5000
        while i < len(events) and events[i].seen_ms <= now:
            window.add(events[i].event)
            i += 1
        t = machine.evaluate(spec, state, window, judged_weights(spec, window, weights), now / 1000)
        rows.append((now, t.action or "none", t.state.stage, t.state.status))
        state, weights = t.state, t.weights or weights
        if t.restart_window:
            window = machine.new_window(spec, state.stage_started, window)
    assert [(p.time_ms, p.action, p.stage, p.status) for p in res.trajectory[1:]] == rows
    assert res.checkpoints == len(rows) > 50
    assert {a for _, a, _, _ in rows} == {"none", "advance"}


def test_judged_weights_follow_the_log_not_the_schedule(spec: Any) -> None:
    window = machine.new_window(spec, T0 / 1000)
    for line in synthetic_log(seconds=60):
        window.add(event_from_dict(line).event)
    w = judged_weights(spec, window, {"stable": 50.0, "canary": 50.0})
    assert 15 < w["canary"] < 25
    assert w["stable"] + w["canary"] == pytest.approx(100)
    empty = machine.new_window(spec, T0 / 1000)
    empty.add(event_from_dict(synthetic_log(share=0.0, seconds=5)[0]).event)
    assert judged_weights(spec, empty, {"stable": 90.0, "canary": 10.0})["canary"] > 0


def test_window_arrays_grow_with_the_window() -> None:
    window = VariantWindow()
    for i, line in enumerate(synthetic_log(seconds=30)):
        window.add(event_from_dict(line).event)
        if i % 97 == 0:
            for metric, source in (
                ("latency", window.latency_ms),
                ("ttft", window.ttft_ms),
                ("completion_tokens", window.completion_tokens),
                ("response_bytes", window.response_bytes),
            ):
                assert np.array_equal(window.samples(metric), np.asarray(source))
    assert not window.samples("latency").flags.writeable


def test_replay_refuses_logs_it_cannot_judge(spec: Any) -> None:
    with pytest.raises(EventLogError, match="no events"):
        replay(spec, [])
    lines = synthetic_log(seconds=20)
    for d in lines:
        d["variant"] = "other"
    with pytest.raises(EventLogError, match="stable variant 'stable'"):
        replay(spec, recorded(lines))


# --- the JSON-lines format ------------------------------------------------------------------


def test_export_line_round_trips_and_keeps_unknown_unknown() -> None:
    ev = TelemetryEvent(time_unix_ms=T0, variant="canary", status=200, response_bytes=2**40)
    ev.duration_ms = 812.5
    doc = event_to_dict(ev, f"{T0 + 900}-3")
    assert doc["time_unix_ms"] == T0
    assert doc["response_bytes"] == 2**40
    assert doc["error"] == "ERROR_CLASS_NONE"
    assert doc["shadow"] is False
    assert doc["assignment"] == "ASSIGNMENT_UNSPECIFIED"
    assert "first_token_ms" not in doc
    assert "completion_tokens" not in doc
    back = event_from_dict(json.loads(json.dumps(doc)))
    assert back.event == ev
    assert back.stream_id == f"{T0 + 900}-3"
    assert back.seen_ms == T0 + 900
    assert not back.event.HasField("first_token_ms")
    no_id = event_from_dict({k: v for k, v in doc.items() if k != "stream_id"})
    assert no_id.seen_ms == T0 + 813  # end of the request when there is no stream id
    assert event_from_dict({**doc, "added_later": 1}).event == ev  # newer fields are skipped


def test_every_schema_field_is_documented() -> None:
    text = (ROOT / "docs" / "EVALUATOR.md").read_text()
    for f in TelemetryEvent.DESCRIPTOR.fields:
        assert f"`{f.name}`" in text, f"docs/EVALUATOR.md does not describe {f.name}"
    assert "`stream_id`" in text


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: not JSON"),
        ('["a"]', "line 2: expected a JSON object"),
        ('{"time_unix_ms": 5, "error": "ERROR_CLASS_NOPE"}', "line 2: .*ERROR_CLASS_NOPE"),
        ('{"time_unix_ms": 5, "status": "teapot"}', "line 2: .*status"),
        ('{"variant": "a"}', "line 2: time_unix_ms is missing"),
        ('{"time_unix_ms": 5, "stream_id": "x"}', "line 2: stream_id 'x'"),
    ],
)
def test_bad_lines_are_named(line: str, message: str) -> None:
    good = json.dumps({"time_unix_ms": T0, "variant": "stable"})
    with pytest.raises(EventLogError, match=message):
        list(iter_jsonl([good, line], "f.jsonl"))


def test_since_accepts_ms_and_iso() -> None:
    assert parse_since("1767225600000") == T0
    assert parse_since("2026-01-01T00:00:00Z") == T0
    assert parse_since("2026-01-01T01:00:00+01:00") == T0
    assert parse_since("2026-01-01T00:00:00") == T0  # naive is UTC
    with pytest.raises(EventLogError, match="--since"):
        parse_since("yesterday")


# --- the CLI, end to end -------------------------------------------------------------------


def extproc(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args)


def write_log(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in lines))
    return path


def test_analyze_cli_end_to_end(tmp_path: Path) -> None:
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(EXPERIMENT))
    log = write_log(tmp_path / "events.jsonl", synthetic_log(degrade_at_s=180, errors=0.25))
    out = extproc("analyze", str(log), "--config", str(config), "--split", "observed", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [p["action"] for p in doc["trajectory"]] == ["start", "advance", "rollback"]
    assert doc["final"] == {"status": "rolled_back", "stage": 1, "weights": doc["final"]["weights"]}
    assert doc["trajectory"][-1]["time"].endswith("Z")
    fired = [g for g in doc["guardrails"] if g["failed"]]
    assert fired[0]["metric"] == "error_rate"
    assert fired[0]["first_fail_elapsed_s"] > 180
    text = extproc("analyze", str(log), "--config", str(config), "--split", "observed")
    assert text.returncode == 0, text.stderr
    assert "rollback" in text.stdout
    assert "result: rolled back at stage 2/3" in text.stdout
    assert "canary error_rate (rollback): failed first at +0:03:" in text.stdout


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "cannot read"),
        ("garbage", "line 3: not JSON"),
        ("wrong variants", "does not match the experiment"),
        ("bad config", "problem"),
        ("bad cadence", "--cadence"),
    ],
)
def test_analyze_cli_bad_input_exits_2(tmp_path: Path, setup: str, message: str) -> None:
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(EXPERIMENT))
    lines = synthetic_log(seconds=10)
    log = write_log(tmp_path / "events.jsonl", lines)
    extra: list[str] = []
    if setup == "missing":
        log = tmp_path / "nope.jsonl"
    elif setup == "garbage":
        log.write_text("\n".join(json.dumps(d) for d in lines[:2]) + "\n{oops\n")
    elif setup == "wrong variants":
        write_log(log, [{**d, "variant": "v2"} for d in lines])
    elif setup == "bad config":
        config.write_text(yaml.safe_dump({**EXPERIMENT, "stable": "nope"}))
    else:
        extra = ["--cadence", "0"]
    out = extproc("analyze", str(log), "--config", str(config), *extra)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr


@pytest.mark.integration
def test_export_cli_from_redis_then_analyze(redis_url: str, tmp_path: Path) -> None:
    r = redis.Redis.from_url(redis_url)
    lines = synthetic_log(seconds=300, degrade_at_s=180, errors=0.25, stream_ids=False)
    records = sorted(recorded(lines), key=lambda e: e.seen_ms)
    pipe = r.pipeline()
    for i, rec in enumerate(records):
        pipe.xadd(
            keys.events("exp"),
            {keys.EVENT_FIELD: rec.event.SerializeToString()},
            id=f"{rec.seen_ms}-{i}",
        )
    pipe.xadd(keys.events("exp"), {b"other": b"not an event"}, id=f"{records[-1].seen_ms + 1}-0")
    pipe.execute()
    out_file = tmp_path / "out.jsonl"
    out = extproc("export", "exp", "--redis-url", redis_url, "-o", str(out_file))
    assert out.returncode == 0, out.stderr
    assert f"exported {len(records)} events" in out.stderr
    exported = read_jsonl(out_file)
    assert [e.event for e in exported] == [e.event for e in records]
    assert [e.stream_id for e in exported] == [f"{e.seen_ms}-{i}" for i, e in enumerate(records)]

    since = records[100].seen_ms
    part = extproc("export", "exp", "--redis-url", redis_url, "--since", str(since), "--count", "7")
    assert part.returncode == 0, part.stderr
    got = list(iter_jsonl(part.stdout.splitlines(), "stdout"))
    assert [e.seen_ms for e in got] == [e.seen_ms for e in records if e.seen_ms >= since][:7]
    newest = extproc("export", "exp", "--redis-url", redis_url, "--count", "3")
    got = list(iter_jsonl(newest.stdout.splitlines(), "stdout"))
    assert [e.event for e in got] == [e.event for e in records[-3:]]

    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(EXPERIMENT))
    analyzed = extproc("analyze", str(out_file), "--config", str(config), "--json")
    assert json.loads(analyzed.stdout)["final"]["status"] == "rolled_back"

    bad = extproc("export", "exp", "--redis-url", redis_url, "--since", "last tuesday")
    assert bad.returncode == 2
    assert "--since" in bad.stderr
    missing = extproc("export", "nope", "--redis-url", redis_url)
    assert missing.returncode == 2
    assert "no such experiment" in missing.stderr


SCHEDULED: dict[str, Any] = {
    **EXPERIMENT,
    "rollout": {
        **EXPERIMENT["rollout"],
        "stages": [10, {"share": 50, "min_seconds": 60, "gate": "manual"}, 100],
    },
}


def test_a_replay_follows_each_stages_schedule_and_holds_at_a_manual_gate() -> None:
    """Stage 2's own 60 s replace the default 120 s; its manual gate holds the replay, unless
    the replay plays an operator who promotes as soon as the stage is ready."""
    spec = parse_experiment(SCHEDULED).spec
    log = recorded(synthetic_log(seconds=600))
    held = replay(spec, log, split="observed")
    assert [(p.action, p.stage) for p in held.trajectory] == [("start", 0), ("advance", 1)]
    assert (held.status, held.stage) == ("running", 1)
    promoted = replay(spec, log, split="observed", promote_when_ready=True)
    rows = [(p.action, p.stage) for p in promoted.trajectory]
    assert rows == [("start", 0), ("advance", 1), ("advance", 2), ("complete", 2)]
    _, first, second, done = (p.elapsed_s for p in promoted.trajectory)
    assert first >= 120
    assert 60 <= second - first < 120, (first, second)
    assert done - second >= 120
    assert promoted.trajectory[2].reasons == ["promote by replay: manual gate: promoted when ready"]


def test_analyze_cli_promotes_manual_gates_on_request(tmp_path: Path) -> None:
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(SCHEDULED))
    log = write_log(tmp_path / "events.jsonl", synthetic_log(seconds=600))
    args = ("analyze", str(log), "--config", str(config), "--split", "observed", "--json")
    for extra, status in (((), "running"), (("--promote-when-ready",), "completed")):
        out = extproc(*args, *extra)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["final"]["status"] == status, extra
