"""Requests that hang: counted while open, credited to the stage they started in, caught in a
replay at the replay clock's crossing time; the 100% stage's holdback; SRM in replay; the
window's counters for every signal."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from extproc.config import ConfigError, parse_experiment
from extproc.evaluator import machine
from extproc.evaluator.replay import replay
from extproc.evaluator.rollout import stage_weights
from extproc.evaluator.window import StageWindow, VariantWindow
from extproc.telemetry import outcome
from extproc.telemetry.export import RecordedEvent
from extproc.telemetry.v1.event_pb2 import Assignment, ErrorClass, TelemetryEvent

pytestmark = pytest.mark.timeout(60)

T0 = 1_767_225_600_000
EXPERIMENT: dict[str, Any] = {
    "name": "exp",
    "salt": "s",
    "stable": "stable",
    "variants": {
        "stable": {
            "cluster": "a",
            "weight": 90,
            "price": {"input_per_mtok": 1, "output_per_mtok": 2},
        },
        "canary": {"cluster": "b", "weight": 10},
    },
    "rollout": {"stages": [10, 50, 100], "min_stage_seconds": 600, "min_stage_samples": 50},
    "inflight": {"notice_ms": 1000, "hang_multiple": 4},
    "guardrails": [{"metric": "error_rate", "max_increase": 0.5, "min_samples": 50}],
}


@pytest.fixture
def spec() -> Any:
    return parse_experiment(EXPERIMENT).spec


def final(rid: str, start: int, variant: str = "canary", **fields: Any) -> TelemetryEvent:
    base: dict[str, Any] = {
        "time_unix_ms": start,
        "request_id": rid,
        "variant": variant,
        "key_hash": f"k-{rid}",
        "assignment": Assignment.ASSIGNMENT_STICKY,
        "status": 200,
        "duration_ms": 100.0,
    }
    return TelemetryEvent(**{**base, **fields})


def notice(
    rid: str, start: int, age: int, variant: str = "canary", **fields: Any
) -> TelemetryEvent:
    return TelemetryEvent(
        time_unix_ms=start + age,
        duration_ms=float(age),
        in_flight=True,
        request_id=rid,
        variant=variant,
        key_hash=f"k-{rid}",
        assignment=fields.pop("assignment", Assignment.ASSIGNMENT_STICKY),
        **fields,
    )


def timed_out(rid: str, start: int, variant: str = "canary") -> TelemetryEvent:
    return final(
        rid, start, variant, status=504, error=ErrorClass.ERROR_CLASS_TIMEOUT, duration_ms=300_000.0
    )


def with_stable_p99(w: StageWindow, ms: float) -> StageWindow:
    for i in range(200):
        w.add(final(f"s{i}", w.started_ms, "stable", duration_ms=ms))
    return w


def test_a_request_counts_as_hung_when_its_age_crosses_the_bound_and_once(spec: Any) -> None:
    w = with_stable_p99(machine.new_window(spec, T0 / 1000), 500.0)
    assert w.hang_bound_ms() == 2000  # max(notice 1000, 4 x stable p99 500)
    w.add(notice("h", T0 + 10, 1000))
    assert w.look(T0 + 10 + 1999) == 0
    assert w.of("canary").requests == 0  # a notice is not a request
    assert w.look(T0 + 10 + 2000) == 1
    c = w.of("canary")
    assert (c.requests, c.errors, c.timeouts, c.hung, c.assignment_units) == (1, 1, 1, 1, 1)
    assert w.look(T0 + 100_000) == 0  # counted once
    w.add(timed_out("h", T0 + 10))  # its final event, minutes later
    assert (c.requests, c.errors, c.timeouts) == (1, 1, 1)
    w.add(notice("ok", T0 + 20, 1000))
    w.add(final("ok", T0 + 20, duration_ms=1500.0))  # ended before the bound
    assert w.look(T0 + 100_000) == 0
    assert (c.requests, c.errors, c.hung, len(c.latency_ms)) == (2, 1, 1, 1)


def test_without_stable_latencies_the_bound_is_a_multiple_of_the_notice_age(spec: Any) -> None:
    w = machine.new_window(spec, T0 / 1000)
    assert w.hang_bound_ms() == 4000
    w.add(notice("h", T0, 1000))
    assert w.look(T0 + 3999) == 0
    assert w.look(T0 + 4000) == 1


def test_forced_shadow_and_unmatchable_notices_are_not_followed(spec: Any) -> None:
    w = machine.new_window(spec, T0 / 1000)
    w.add(notice("f", T0, 1000, assignment=Assignment.ASSIGNMENT_FORCED))
    w.add(notice("s", T0, 1000, shadow=True))
    w.add(notice("", T0, 1000))
    assert w.look(T0 + 10**6) == 0
    assert (w.forced, w.shadow, w.variants) == (0, 0, {})


def test_a_hang_after_the_advance_counts_in_the_next_window_without_a_unit(spec: Any) -> None:
    first = machine.new_window(spec, T0 / 1000)
    first.add(notice("h", T0 + 500, 1000))
    second = machine.new_window(spec, (T0 + 2000) / 1000, first)
    assert second.look(T0 + 500 + 4000) == 1
    c = second.of("canary")
    assert (c.requests, c.errors, c.hung, c.assignment_units, second.late) == (1, 1, 1, 0, 1)
    second.add(timed_out("h", T0 + 500))
    assert c.requests == 1
    second.add(final("done", T0 + 1900))  # a late final event: judged here, not a unit
    assert (c.requests, c.assignment_units, second.late) == (2, 0, 2)


def hanging_log(share_hung: float, seed: int = 1, seconds: int = 240) -> list[RecordedEvent]:
    """A canary recorded at its 10% weight whose requests hang with probability ``share_hung``
    until the 300 s timeout; a notice goes out 1 s after each request still open."""
    rng = np.random.default_rng(seed)
    out = []
    n = int(rng.poisson(20 * seconds))
    for i, start in enumerate(np.sort(rng.uniform(0, seconds * 1000, n)).astype(int) + T0):
        variant = "canary" if rng.random() < 0.1 else "stable"
        rid = f"r{i}"
        latency = float(rng.lognormal(np.log(300), 0.3))
        if variant == "canary" and rng.random() < share_hung:
            out.append(RecordedEvent(notice(rid, int(start), 1000, variant), int(start) + 1001))
            out.append(RecordedEvent(timed_out(rid, int(start), variant), int(start) + 300_001))
        else:
            ev = final(rid, int(start), variant, duration_ms=latency)
            out.append(RecordedEvent(ev, int(start) + int(latency) + 1))
    return out


def test_replay_rolls_back_a_hanging_candidate_before_its_requests_time_out(spec: Any) -> None:
    events = hanging_log(0.05)
    res = replay(spec, events)
    assert res.status == "rolled_back"
    rollback = res.trajectory[-1]
    first_timeout = min(e.seen_ms for e in events if e.event.error)
    assert rollback.time_ms < first_timeout  # decided while every hung request was still open
    assert rollback.snapshot["canary"]["hung"] > 0
    assert rollback.snapshot["canary"]["timeouts"] == rollback.snapshot["canary"]["hung"]
    assert any("error rate" in r for r in rollback.reasons)


def test_replay_counts_a_hang_at_the_replay_clocks_crossing_time(spec: Any) -> None:
    events = hanging_log(0.0, seconds=60)
    start = T0 + 12_345
    events.append(RecordedEvent(notice("h", start, 1000), start + 1001))
    events.append(RecordedEvent(timed_out("h", start), start + 300_001))
    res = replay(spec, events, every_checkpoint=True)
    p99 = np.percentile([e.event.duration_ms for e in events if e.event.variant == "stable"], 99)
    crossing = start + max(1000, 4 * p99)
    hung = [(p.time_ms, p.snapshot.get("canary", {}).get("hung", 0)) for p in res.trajectory[1:]]
    assert all(n == 0 for t, n in hung if t < crossing - 500)  # p99 moves a little as data comes
    first = next(t for t, n in hung if n)
    assert crossing - 500 <= first < crossing + 5000 + 500  # the first checkpoint past it
    assert hung[-1][1] == 1  # and its final event, 300 s later, is not counted again


def test_replay_judges_the_split_against_the_schedule(spec: Any) -> None:
    """A canary recorded at 15% against a 10% weight: the sequential SRM check holds, as live."""
    rng = np.random.default_rng(3)
    events = []
    for i, start in enumerate(np.sort(rng.uniform(0, 300_000, 6000)).astype(int) + T0):
        variant = "canary" if rng.random() < 0.15 else "stable"
        events.append(RecordedEvent(final(f"r{i}", int(start), variant), int(start) + 101))
    held = replay(spec, events)
    assert any(
        p.action == "hold" and "sample ratio mismatch" in p.reasons[0] for p in held.trajectory
    )
    observed = replay(spec, events, split="observed")
    assert not any(p.action == "hold" for p in observed.trajectory)
    matched = replay(spec, hanging_log(0.0, seconds=300))  # recorded at the weight: no hold
    assert not any(p.action == "hold" for p in matched.trajectory)


def test_the_last_stage_keeps_a_holdback_until_complete(spec: Any) -> None:
    assert stage_weights(spec, 2) == {"canary": 99.0, "stable": 1.0}
    assert stage_weights(spec, 1) == {"canary": 50, "stable": 50}
    three = parse_experiment(
        {
            **EXPERIMENT,
            "variants": {
                "stable": {"cluster": "a", "weight": 98},
                "a": {"cluster": "b", "weight": 1},
                "b": {"cluster": "c", "weight": 1},
            },
            "rollout": {"stages": [1, 50], "holdback": 2.5},
        }
    ).spec
    assert stage_weights(three, 1) == {"a": 48.75, "b": 48.75, "stable": 2.5}
    state = machine.start(spec, 0).state
    state.stage = 2
    done = machine.command(spec, state, "promote", "op", "", 1.0)
    assert done.action == "complete"
    assert done.weights == {"canary": 100, "stable": 0}
    off = parse_experiment({**EXPERIMENT, "rollout": {"stages": [10, 100], "holdback": 0}}).spec
    assert stage_weights(off, 1) == {"canary": 100, "stable": 0}


def test_the_last_stage_is_judged_against_the_holdback(spec: Any) -> None:
    """A candidate that hangs at 99% is rolled back on the comparison with the holdback."""
    w = machine.new_window(spec, T0 / 1000)
    for i in range(200):
        if i % 4 == 0:
            w.add(notice(f"c{i}", T0 + i, 1000))
        else:
            w.add(final(f"c{i}", T0 + i))
    for i in range(100):
        w.add(final(f"s{i}", T0 + i, "stable"))
    state = machine.start(spec, T0 / 1000).state
    state.stage, state.stage_started = 2, T0 / 1000
    t = machine.evaluate(spec, state, w, stage_weights(spec, 2), T0 / 1000 + 700)
    assert t.action == "rollback", t.reasons


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"inflight": {"notice_ms": 300_000}}, "inflight.notice_ms: 300000 is not below"),
        ({"inflight": {"notice_ms": 50}}, "inflight.notice_ms:"),
        ({"inflight": {"hang_multiple": 0.5}}, "inflight.hang_multiple:"),
        ({"inflight": {"notice": 5}}, "inflight.notice:"),
        ({"rollout": {"holdback": 60}}, "rollout.holdback:"),
        (
            {"inflight": {"notice_ms": 20_000}, "envoy": {"request_timeout_s": 10}},
            "not below envoy.request_timeout_s (10 s)",
        ),
    ],
)
def test_inflight_settings_are_validated_with_their_path(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_experiment({**EXPERIMENT, **changes})
    assert any(message in p for p in err.value.problems), err.value.problems


def test_inflight_defaults() -> None:
    spec = parse_experiment({k: v for k, v in EXPERIMENT.items() if k != "inflight"}).spec
    assert (spec.inflight.notice_ms, spec.inflight.hang_multiple) == (5000, 4)
    assert spec.rollout.holdback == 1


def test_outcome_defines_the_start_of_one_event() -> None:
    assert outcome.started_ms(notice("r", 1000, 700)) == 1000
    assert outcome.started_ms(final("r", 1000)) == 1000


def test_window_counts_every_signal_and_keeps_client_errors_apart(spec: Any) -> None:
    w = machine.new_window(spec, 0)
    answered = {"refusal": False, "empty_answer": False}
    streamed = {"streamed": True, "first_token_ms": 100.0, "duration_ms": 1100.0}
    w.add(
        final(
            "a",
            1,
            "stable",
            tool_calls=True,
            **answered,
            **streamed,
            prompt_tokens=10,
            completion_tokens=51,
        )
    )
    w.add(final("b", 1, "stable", refusal=False, empty_answer=True, json_valid=False))
    w.add(final("c", 1, "stable", **answered, json_valid=True, cached_prompt_tokens=64))
    w.add(final("d", 1, "stable", status=499, error=ErrorClass.ERROR_CLASS_CLIENT_DISCONNECT))
    w.add(final("e", 1, "stable", status=504, error=ErrorClass.ERROR_CLASS_TIMEOUT))
    w.add(final("f", 1, "stable", assignment=Assignment.ASSIGNMENT_FORCED, status=500))
    w.add(final("g", 1, "stable", tool_calls=True))  # an answer not inspected: still a success
    s = w.of("stable")
    assert (s.requests, s.errors, s.timeouts, s.client_errors) == (6, 1, 1, 1)
    assert (s.successes, s.answered, s.tool_calls, s.empty_answers) == (4, 3, 2, 1)
    assert (s.json_checked, s.json_invalid) == (2, 1)
    assert list(s.samples("cached_prompt_tokens")) == [64.0]
    assert list(s.samples("cost")) == [pytest.approx((10 + 2 * 51) / 1e6)]
    assert list(s.samples("output_tokens_per_s")) == [50.0]  # outcome.output_tokens_per_s
    assert w.forced == 1
    summary = s.summary()
    assert summary["error_rate"] == round(1 / 6, 4)  # server errors over assigned requests
    assert summary["client_error_rate"] == round(1 / 6, 4)
    assert summary["timeout_rate"] == round(1 / 6, 4)
    assert summary["tool_call_rate"] == 0.5  # over complete answers
    assert summary["empty_answer_rate"] == round(1 / 3, 4)
    assert summary["json_invalid_rate"] == 0.5
    assert summary["cached_prompt_tokens"] == 64.0
    assert summary["cost_per_request"] == pytest.approx(112 / 1e6)
    assert VariantWindow().summary()["timeout_rate"] is None


@pytest.mark.parametrize(("timeout_s", "notice_ms"), [(2, 1000), (1, 500), (0.1, 100), (300, 5000)])
def test_a_short_upstream_timeout_shortens_the_default_notice(
    timeout_s: float, notice_ms: int
) -> None:
    """Left out, the notice comes at 5 s or half the upstream timeout: a file that only lowers
    the timeout stays valid and its hangs are still noticed before they time out."""
    raw = {k: v for k, v in EXPERIMENT.items() if k != "inflight"}
    spec = parse_experiment({**raw, "envoy": {"request_timeout_s": timeout_s}}).spec
    assert spec.inflight.notice_ms == notice_ms


def test_a_new_attempt_judges_no_request_of_the_last_one(spec: Any) -> None:
    """After `experiment restart` the stragglers of the ended attempt (a final event, a notice,
    a hang) are not judged, not even as late stage credit; the attempt's own requests are."""
    restart = T0 + 2000
    w = machine.new_window(spec, restart / 1000, attempt_started=restart / 1000)
    w.add(final("old", T0 + 500, duration_ms=3000.0))
    w.add(notice("old-hang", T0 + 900, 1000))
    w.add(final("new", restart + 10))
    assert w.look(restart + 10**6) == 0
    c = w.of("canary")
    assert (c.requests, c.hung, w.late, w.earlier_attempt) == (1, 0, 0, 2)
    # its next stage keeps the attempt's start: its own earlier requests are stage credit
    later = machine.new_window(spec, (restart + 5000) / 1000, w, restart / 1000)
    later.add(final("new-late", restart + 100))
    later.add(final("old-late", T0 + 600))
    assert (later.late, later.earlier_attempt) == (1, 1)
