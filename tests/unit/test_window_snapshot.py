"""Window snapshots: a window restored from one and fed the rest of the stream is the window
built from the whole stream, field by field and verdict by verdict; a snapshot that is corrupt,
of another format, stage, attempt or configuration is refused with the reason."""

from __future__ import annotations

import dataclasses
from array import array
from typing import Any

import numpy as np
import pytest

from extproc.config import EXAMPLE_EXPERIMENT, load_experiment
from extproc.contract.signals import (
    FeedbackSignal,
    JudgeScores,
    JudgeSignal,
    Rubric,
    WatchdogSignal,
)
from extproc.evaluator import machine, snapshot
from extproc.evaluator.clusters import Clusters
from extproc.evaluator.snapshot import Identity, SnapshotError
from extproc.evaluator.window import OpenRequests, StageWindow, VariantWindow
from extproc.telemetry.v1.event_pb2 import Assignment, ErrorClass, TelemetryEvent

pytestmark = pytest.mark.timeout(60)

SPEC = load_experiment(EXAMPLE_EXPERIMENT).spec
ATTEMPT_START_S = 1_000.0
STAGE_START_S = 2_000.0
R = Rubric(accuracy=5, clarity=5, completeness=5)
Step = tuple[str, Any]  # ("event", TelemetryEvent) | ("signal", Signal) | ("look", now_ms)


def traffic(n: int, seed: int) -> list[Step]:
    """A stage's stream with every kind of entry the window treats apart: answers with every
    sampled field, server and client errors, timeouts, unkeyed, forced and shadow requests,
    requests of the stage before and of the attempt before, in-flight notices (some end, some
    hang past the bound at a look), and judge, feedback and watchdog signals."""
    rng = np.random.default_rng(seed)
    t0 = int(STAGE_START_S * 1000)
    steps: list[Step] = []
    for i in range(n):
        t = t0 + 10 * i
        variant = "canary" if rng.random() < 0.4 else "stable"
        kind = rng.random()
        ev = TelemetryEvent(
            variant=variant,
            time_unix_ms=t,
            request_id=f"r{i}",
            key_hash="" if rng.random() < 0.1 else f"k{rng.integers(0, n // 5 + 1)}",
            assignment=Assignment.ASSIGNMENT_STICKY,
            streamed=True,
        )
        if kind < 0.05:
            ev.error = ErrorClass.ERROR_CLASS_UPSTREAM_5XX
        elif kind < 0.07:
            ev.error = ErrorClass.ERROR_CLASS_TIMEOUT
        elif kind < 0.09:
            ev.error = ErrorClass.ERROR_CLASS_CLIENT_ERROR
        else:
            ev.duration_ms = float(rng.lognormal(6, 0.7))
            ev.first_token_ms = ev.duration_ms / 3
            ev.prompt_tokens = int(rng.integers(10, 500))
            ev.completion_tokens = int(rng.integers(0, 400))
            ev.cached_prompt_tokens = ev.prompt_tokens // 2
            ev.response_bytes = 100 + ev.completion_tokens * 5
            ev.refusal = bool(rng.random() < 0.05)
            ev.empty_answer = bool(rng.random() < 0.02)
            ev.answer_chars = 4 * ev.completion_tokens
            ev.tool_calls = int(rng.random() < 0.1)
            if rng.random() < 0.3:
                ev.json_valid = bool(rng.random() < 0.9)
        if i % 17 == 0:
            ev.assignment = Assignment.ASSIGNMENT_FORCED
        elif i % 19 == 0:
            ev.shadow = True
        elif i % 23 == 0:
            ev.time_unix_ms = t0 - 500  # started in the stage before
        elif i % 29 == 0:
            ev.time_unix_ms = int(ATTEMPT_START_S * 1000) - 1  # of the attempt before
        elif i % 13 == 0:  # reported open first; every other one never ends
            notice = TelemetryEvent()
            notice.CopyFrom(ev)
            notice.in_flight = True
            notice.time_unix_ms, notice.duration_ms = t + 6000, 6000.0
            steps.append(("event", notice))
            if i % 26 == 0:
                continue
        steps.append(("event", ev))
        if i % 31 == 0:
            steps.append(
                (
                    "signal",
                    FeedbackSignal(time_ms=t, request_id=f"r{i - 3}", key_hash=None, value="down"),
                )
            )
        if i % 37 == 0:
            steps.append(
                (
                    "signal",
                    JudgeSignal(
                        time_ms=t,
                        request_id=f"r{i}",
                        primary="stable",
                        shadow="canary",
                        winner=("primary", "shadow", "tie")[i % 3],  # type: ignore[arg-type]
                        scores=JudgeScores(primary=R, shadow=R),
                        consistent=i % 3 != 2,
                    ),
                )
            )
        if i % 41 == 0:
            steps.append(
                (
                    "signal",
                    WatchdogSignal(
                        time_ms=t,
                        variant="canary",
                        prompt_id="p",
                        passed=i % 2 == 0,
                        checks={},
                        latency_ms=1.0,
                    ),
                )
            )
        if i % 97 == 0:
            steps.append(("look", t + 60_000))
    return steps


def new_window() -> StageWindow:
    return machine.new_window(SPEC, STAGE_START_S, None, ATTEMPT_START_S)


def feed(window: StageWindow, steps: list[Step]) -> None:
    for what, x in steps:
        if what == "event":
            window.add(x)
        elif what == "signal":
            window.add_signal(x)
        else:
            window.look(x)


def identity(window: StageWindow, stage: int = 3, attempt: int = 2) -> Identity:
    return Identity.of(attempt, stage, window)


def differences(a: Any, b: Any, path: str = "window") -> list[str]:
    """The fields (by path, nested dataclasses and dicts followed) where two windows differ."""
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
        return [
            d
            for f in dataclasses.fields(a)
            for d in differences(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
        ]
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        out = [d for k in a for d in differences(a[k], b[k], f"{path}[{k}]")]
        if list(a) != list(b) and type(a) is not dict:  # order matters in an OrderedDict
            out.append(f"{path} (order)")
        return out
    return [] if a == b and type(a) is type(b) else [path]


def roundtrip(window: StageWindow, level: int) -> snapshot.Restored:
    captured = snapshot.capture(window, identity(window), "5-1", "4-0", 123)
    stored = snapshot.encode(captured, level)
    return snapshot.restore(snapshot.decode(stored), identity(window), new_window())


def test_every_window_field_has_a_place_in_the_snapshot() -> None:
    """A field added to the window without a place here would be lost at every takeover."""
    names = {f.name for f in dataclasses.fields(VariantWindow)}
    placed = snapshot.VARIANT_COUNTS + snapshot.VARIANT_COLUMNS
    assert names == set(placed + snapshot.VARIANT_OTHER + snapshot.VARIANT_CONFIG)
    names = {f.name for f in dataclasses.fields(StageWindow)}
    placed = snapshot.STAGE_IDENTITY + snapshot.STAGE_CONFIG + snapshot.STAGE_COUNTS
    assert names == set(placed + snapshot.STAGE_OTHER)
    assert {f.name for f in dataclasses.fields(Clusters)} == {
        "index",
        "size",
        "totals",
        "ids",
        "seen",
    }
    assert {f.name for f in dataclasses.fields(OpenRequests)} == {
        "pending",
        "hung",
        "stable_p99_ms",
    }


@pytest.mark.parametrize("level", [0, 1])
@pytest.mark.parametrize("cut", [0, 1, 700, 2999, 3000])
def test_restored_window_plus_the_tail_is_the_whole_streams_window(level: int, cut: int) -> None:
    steps = traffic(3000, seed=cut)
    whole = new_window()
    feed(whole, steps)
    head = new_window()
    feed(head, steps[:cut])
    restored = roundtrip(head, level)
    assert (restored.events_seen, restored.signals_seen, restored.written_ms) == ("5-1", "4-0", 123)
    feed(restored.window, steps[cut:])
    assert differences(restored.window, whole) == []
    assert restored.window == whole
    # the traffic reached every path the snapshot has to carry
    canary = whole.variants["canary"]
    reached = {
        "forced": whole.forced,
        "shadow": whole.shadow,
        "late": whole.late,
        "earlier attempt": whole.earlier_attempt,
        "pending": whole.open.pending,
        "hung": canary.hung,
        "stable p99": whole.open.stable_p99_ms,
        "feedback": canary.feedback,
        "judge": canary.judge_wins,
        "watchdog": canary.probes,
        "cost": canary.cost,
        "cached tokens": canary.cached_prompt_tokens,
        "unkeyed": canary.unkeyed,
        "json": canary.json_invalid,
    }
    assert [path for path, seen in reached.items() if not seen] == []
    # and the judge sees the same: every check, estimate and bound
    state = machine.start(SPEC, STAGE_START_S).state
    weights = {"stable": 90.0, "canary": 10.0}
    now = STAGE_START_S + 3600
    a = machine.evaluate(SPEC, state, restored.window, weights, now).verdict
    b = machine.evaluate(SPEC, state, whole, weights, now).verdict
    assert a is not None
    assert b is not None
    assert [c.to_json() for c in a.checks] == [c.to_json() for c in b.checks]
    assert a.action == b.action


def test_a_restored_window_does_not_share_memory_with_the_captured_one() -> None:
    head = new_window()
    feed(head, traffic(500, seed=3))
    restored = roundtrip(head, 0).window
    before = len(head.variants["canary"].latency_ms)
    feed(restored, traffic(500, seed=4))
    assert len(head.variants["canary"].latency_ms) == before


def stored_window(level: int = 0) -> tuple[StageWindow, dict[bytes, bytes]]:
    w = new_window()
    feed(w, traffic(400, seed=5))
    return w, snapshot.encode(snapshot.capture(w, identity(w), "1-0", "0-0", 0), level)


@pytest.mark.parametrize("level", [0, 1])
def test_a_corrupt_part_is_refused(level: int) -> None:
    _, stored = stored_window(level)
    name = b"p:v0/col/latency_ms"
    data = bytearray(stored[name])
    data[len(data) // 2] ^= 0x01
    stored[name] = bytes(data)
    with pytest.raises(SnapshotError, match=r"corrupt|unreadable"):
        snapshot.decode(stored)


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda s: s.pop(b"meta"), "no readable meta"),
        (lambda s: s.__setitem__(b"meta", b"{not json"), "no readable meta"),
        (lambda s: s.pop(b"p:by_request/keys"), "parts unreadable"),
        (lambda s: s.__setitem__(b"p:by_key/keys", s[b"p:by_key/keys"][:-3]), "corrupt"),
    ],
)
def test_missing_or_truncated_fields_are_refused(damage: Any, why: str) -> None:
    _, stored = stored_window()
    damage(stored)
    with pytest.raises(SnapshotError, match=why):
        snapshot.decode(stored)


def test_another_format_version_is_refused() -> None:
    w = new_window()
    captured = snapshot.capture(w, identity(w), "1-0", "0-0", 0)
    captured.meta["format"] = snapshot.FORMAT + 1
    with pytest.raises(SnapshotError, match=f"format {snapshot.FORMAT + 1}"):
        snapshot.decode(snapshot.encode(captured, 0))


def test_parts_that_do_not_fit_together_are_refused() -> None:
    """Checksums hold (the parts were written so), but a column has lost its last sample."""
    w = new_window()
    feed(w, traffic(400, seed=6))
    captured = snapshot.capture(w, identity(w), "1-0", "0-0", 0)
    captured.parts["v0/col/latency_ms"] = captured.parts["v0/col/latency_ms"][:-8]
    decoded = snapshot.decode(snapshot.encode(captured, 0))
    with pytest.raises(SnapshotError, match="ids/latency do not fit"):
        snapshot.restore(decoded, identity(w), new_window())


@pytest.mark.parametrize(
    "other",
    [
        {"stage": 4},
        {"attempt": 3},
        {"started_ms": int(STAGE_START_S * 1000) + 1},
        {"attempt_started_ms": 0},
        {"config": "another experiment file"},
    ],
)
def test_a_snapshot_of_another_stage_attempt_or_configuration_is_refused(
    other: dict[str, Any],
) -> None:
    w, stored = stored_window()
    wanted = dataclasses.replace(identity(w), **other)
    with pytest.raises(SnapshotError, match="of another stage or configuration"):
        snapshot.restore(snapshot.decode(stored), wanted, new_window())


def test_the_configuration_fingerprint_follows_the_experiment_file() -> None:
    w = new_window()
    changed = dataclasses.replace(w, hang_multiple=w.hang_multiple + 1)
    assert identity(w).config != identity(changed).config
    prices = {**w.prices, "canary": w.prices["stable"]}
    assert identity(w).config != identity(dataclasses.replace(w, prices=prices)).config


def test_ids_holding_newlines_survive() -> None:
    """Ids are stored one a line; an id with a newline (any client can send one) makes its
    collection JSON instead, still exact."""
    w = new_window()
    t0 = int(STAGE_START_S * 1000)
    for rid, key in (("a\nb", "k\n1"), ("c", "k2"), ("", "")):
        w.add(TelemetryEvent(variant="canary", time_unix_ms=t0, request_id=rid, key_hash=key))
    restored = roundtrip(w, 0).window
    assert differences(restored, w) == []
    assert list(restored.by_request) == ["a\nb", "c"]
    assert restored.variants["canary"].keys == {"k\n1", "k2"}


@pytest.mark.parametrize(
    "values",
    [
        [0.0, -0.0, 1.0],  # -0.0 is not stored as the integer 0
        [1.5, 2.0],
        [float("nan"), 1.0],
        [float("inf"), 3.0],
        [2.0**40, 7.0],  # integral, but wider than 32 bits
        [-128.0, 127.0],
        [-129.0, 40_000.0],
        [],
    ],
)
def test_sample_columns_come_back_bit_for_bit(values: list[float]) -> None:
    """Integral columns are stored narrower; nothing else changes, not even a NaN's bits."""
    w = new_window()
    w.add(TelemetryEvent(variant="canary", time_unix_ms=int(STAGE_START_S * 1000)))
    canary = w.variants["canary"]
    canary.latency_ms = array("d", values)
    canary.clusters.ids["latency"] = array("q", [0] * len(values))
    canary.clusters.totals["requests"] = array("q", [2**40])  # a count wider than 32 bits
    restored = roundtrip(w, 0).window.variants["canary"]
    assert restored.latency_ms.tobytes() == canary.latency_ms.tobytes()
    assert restored.clusters.totals["requests"] == array("q", [2**40])


def test_conversation_keys_outside_the_index_are_kept_too() -> None:
    """Keys are stored as flags over the conversation index; one the index lacks (never so
    through ``add``) makes them stored as strings, still exact."""
    w = new_window()
    feed(w, traffic(300, seed=8))
    w.variants["canary"].keys.add("not indexed")
    restored = roundtrip(w, 0).window
    assert differences(restored, w) == []
