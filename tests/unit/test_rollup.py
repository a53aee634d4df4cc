"""Rollups: the figures of merged buckets are the figures of the raw events (quantiles within the
sketch's stated accuracy), and a bucket read back is the bucket written."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.config import Price
from extproc.ops.status import summarise
from extproc.telemetry import rollup
from extproc.telemetry.v1.event_pb2 import Assignment, ErrorClass, TelemetryEvent

pytestmark = pytest.mark.timeout(60)

PRICE = Price(input_per_mtok=3.0, output_per_mtok=15.0)


@st.composite
def events(draw: st.DrawFn) -> TelemetryEvent:
    ev = TelemetryEvent(
        experiment="e",
        request_id=f"r{draw(st.integers(0, 10**9))}",
        variant=draw(st.sampled_from(["stable", "canary"])),
        time_unix_ms=draw(st.integers(1_700_000_000_000, 1_700_000_900_000)),
        error=draw(st.sampled_from([int(e) for e in ErrorClass.values()])),
        assignment=draw(st.sampled_from([int(a) for a in Assignment.values()])),
        shadow=draw(st.booleans()),
        streamed=draw(st.booleans()),
        tool_calls=draw(st.booleans()),
    )
    ms = st.floats(0, 60_000, allow_nan=False)
    if draw(st.booleans()):
        ev.duration_ms = draw(ms)
    if draw(st.booleans()):
        ev.first_token_ms = draw(ms)
    if draw(st.booleans()):
        ev.prompt_tokens = draw(st.integers(0, 5_000))
        ev.completion_tokens = draw(st.integers(0, 5_000))
    if draw(st.booleans()):
        ev.cached_prompt_tokens = draw(st.integers(0, 5_000))
    if draw(st.booleans()):
        ev.refusal = draw(st.booleans())
        ev.answer_chars = draw(st.integers(0, 10_000))
    if draw(st.booleans()):
        ev.empty_answer = draw(st.booleans())
    if draw(st.booleans()):
        ev.json_valid = draw(st.booleans())
    return ev


def _close(got: object, want: object) -> bool:
    if isinstance(want, float) and isinstance(got, float):
        return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-6)
    return got == want


@settings(max_examples=200, deadline=None)
@given(st.lists(events(), max_size=60), st.sampled_from(rollup.WIDTHS_S))
def test_merged_buckets_give_the_figures_of_the_raw_events(
    evs: list[TelemetryEvent], width: int
) -> None:
    # Written bucket by bucket, read back field by field, then merged: as a reader sees them.
    buckets = []
    for start, (ints, floats) in rollup.bucket_fields(evs, width).items():
        raw = {k.encode(): str(v).encode() for k, v in ints.items()}
        raw |= {k.encode(): repr(v).encode() for k, v in floats.items()}
        buckets.append((start, rollup.parse(raw)))
    merged = rollup.merged(buckets)
    for kind in ("assigned", "forced", "shadow"):
        want = summarise(evs, ["stable", "canary"], kind=kind, prices={"canary": PRICE})
        for variant, figures in want.items():
            t = merged.get((kind, variant), rollup.Tally())
            got = t.figures(PRICE if variant == "canary" else None)
            for name, value in figures.items():
                if name in ("latency_ms", "ttft_ms", "open_requests", "forced_requests"):
                    continue
                assert _close(got[name], value), (kind, variant, name, got[name], value)
            if kind == "assigned":
                assert t.counts["requests"] + figures["forced_requests"] == sum(
                    1 for e in evs if e.variant == variant and not e.shadow
                )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0.001, 1e6, allow_nan=False), min_size=1, max_size=300),
    st.sampled_from([0.0, 0.5, 0.9, 0.95, 0.99, 1.0]),
)
def test_a_sketch_quantile_is_within_alpha_of_the_sample_quantile(
    xs: list[float], q: float
) -> None:
    s = rollup.Sketch()
    for x in xs:
        s.add(x)
    exact = float(np.percentile(xs, 100 * q, method="lower"))
    got = s.quantile(q)
    assert got is not None
    assert abs(got - exact) <= rollup.ALPHA * exact * (1 + 1e-9)


def test_sketches_merge_as_if_filled_as_one() -> None:
    a, b, both = rollup.Sketch(), rollup.Sketch(), rollup.Sketch()
    for i in range(1, 500):
        (a if i % 3 else b).add(i * 1.7)
        both.add(i * 1.7)
    a.merge(b)
    assert a.bins == both.bins
    assert rollup.Sketch().quantile(0.5) is None


def test_zero_latencies_and_unknown_fields() -> None:
    s = rollup.Sketch()
    for x in (0.0, 0.0, 5.0):
        s.add(x)
    assert s.quantile(0.0) == 0.0
    assert s.quantile(1.0) == pytest.approx(5.0, rel=rollup.ALPHA)
    # A field a newer writer added, and one of no variant, are left out.
    parsed = rollup.parse(
        {b"assigned|stable|novel": b"3", b"bogus": b"1", b"forced|stable|requests": b"2"}
    )
    assert list(parsed) == [("forced", "stable")]
    assert parsed[("forced", "stable")].counts == {"requests": 2}
