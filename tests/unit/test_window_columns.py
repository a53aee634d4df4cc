"""The stage window's sample columns: what they hold, what ``samples()`` hands out, who is counted.

The columns are ``array("d")`` so the judge gets numpy arrays by memcpy (docs/PERFORMANCE.md,
recommendation 3); these tests pin what the list-based window did, so the change stays invisible.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from extproc.evaluator import window as window_module
from extproc.evaluator.window import StageWindow, VariantWindow
from extproc.telemetry.v1.event_pb2 import Assignment, ErrorClass, TelemetryEvent

METRICS = ("latency", "ttft", "completion_tokens", "response_bytes", "answer_chars")


def event(i: int, **fields: Any) -> TelemetryEvent:
    """An answered request: every sampled field set, different per ``i``."""
    base: dict[str, Any] = {
        "time_unix_ms": 2000,
        "variant": "canary",
        "assignment": Assignment.ASSIGNMENT_STICKY,
        "key_hash": f"k{i % 7}",
        "request_id": f"r{i}",
        "error": ErrorClass.ERROR_CLASS_NONE,
        "duration_ms": 100.0 + i + 0.25,
        "first_token_ms": 10.0 + i,
        "completion_tokens": 3 * i,
        "response_bytes": 2**40 + i,  # a 64-bit count, exact as a double
        "refusal": i % 5 == 0,
        "answer_chars": 4 * i,
    }
    return TelemetryEvent(**{**base, **fields})


def test_columns_hold_each_answered_event_as_a_float() -> None:
    w = VariantWindow()
    for i in range(50):
        w.add(event(i))
    w.add(event(50, error=ErrorClass.ERROR_CLASS_UPSTREAM_5XX))  # counted, not sampled
    w.add(event(51, error=ErrorClass.ERROR_CLASS_CLIENT_ERROR))  # neither
    bare = TelemetryEvent(time_unix_ms=2000, variant="canary", response_bytes=9)
    w.add(bare)  # only response_bytes is always sampled; unkeyed
    assert (w.requests, w.errors, w.answered, w.refusals, w.unkeyed) == (53, 1, 50, 10, 1)
    assert len(w.keys) == 7
    n = np.arange(50, dtype=np.float64)
    expected = {
        "latency": 100.25 + n,
        "ttft": 10.0 + n,
        "completion_tokens": 3 * n,
        "response_bytes": np.append(2.0**40 + n, 9.0),
        "answer_chars": 4 * n,
    }
    for metric in METRICS:
        got = w.samples(metric)
        assert got.dtype == np.float64
        assert np.array_equal(got, expected[metric]), metric
    with pytest.raises(KeyError):
        w.samples("duration")


def test_samples_are_read_only_copies_that_do_not_pin_the_window() -> None:
    """A numpy view of an ``array("d")`` would stop it growing (BufferError): the judge may keep
    what it was given while ingest goes on."""
    w = VariantWindow()
    w.add(event(0))
    held = [w.samples(m) for m in METRICS]
    for i in range(1, 5000):  # enough appends to make every column reallocate
        w.add(event(i))
    assert [h.size for h in held] == [1] * len(METRICS)
    assert all(not h.flags.writeable for h in held)
    assert w.samples("latency").size == 5000
    with pytest.raises(ValueError, match="read-only"):
        held[0][0] = 1.0


def test_summary_matches_numpy_over_the_samples() -> None:
    rng = np.random.default_rng(4)
    w = VariantWindow()
    latency = rng.lognormal(6, 0.8, 999)
    for i, ms in enumerate(latency):
        w.add(event(i, duration_ms=float(ms)))
    s = w.summary()
    for q in (50, 95, 99):
        assert s[f"latency_p{q}"] == round(float(np.percentile(latency.tolist(), q)), 2)
    assert s["completion_tokens_mean"] == round(float(np.mean([3 * i for i in range(999)])), 2)
    empty = VariantWindow().summary()
    assert empty["latency_p50"] is empty["answer_chars_mean"] is empty["error_rate"] is None


def test_stage_window_counts_forced_shadow_and_late_events_apart() -> None:
    w = StageWindow(started_ms=1000)
    w.add(event(0))
    first = w.variants["canary"]
    w.add(event(1))
    assert w.variants["canary"] is first  # one window per variant, reused
    w.add(event(2, assignment=Assignment.ASSIGNMENT_FORCED))
    w.add(event(3, shadow=True))
    w.add(event(4, time_unix_ms=999))  # started before the stage: judged here, not a unit
    w.add(event(5, variant=""))
    assert (first.requests, w.forced, w.shadow, w.late) == (3, 1, 1, 1)
    assert first.assignment_units == 2
    assert set(w.by_request) == {"r0", "r1", "r4"}
    assert w.of("stable").requests == 0
    assert "stable" not in w.variants

    mirrored = StageWindow(started_ms=1000, shadow_as_candidate=True)
    mirrored.add(event(3, shadow=True))
    assert mirrored.variants["canary"].requests == 1
    assert (mirrored.by_request, mirrored.by_key) == ({}, {})  # feedback never names a shadow


def test_stage_window_remembers_only_the_newest_request_ids(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(window_module, "MAX_REQUESTS_REMEMBERED", 3)
    w = StageWindow(started_ms=0)
    for i in range(5):
        w.add(event(i))
    assert list(w.by_request) == ["r2", "r3", "r4"]
    w.add(event(2))  # a repeated id keeps its place, as in a dict
    assert list(w.by_request) == ["r2", "r3", "r4"]
    assert w.variants["canary"].requests == 6
