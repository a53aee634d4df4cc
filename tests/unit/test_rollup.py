"""Rollups: buckets written, read back and merged give the figures of the raw events taken as one
(sketches merge exactly, so quantiles too), a sketch's quantiles are within its stated accuracy
of the sample's, and a span is tiled by whole buckets exactly once."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.config import Price
from extproc.telemetry import rollup
from extproc.telemetry.v1.event_pb2 import Assignment, ErrorClass, TelemetryEvent
from tests.conftest import as_read

pytestmark = pytest.mark.timeout(60)

PRICE = Price(input_per_mtok=3.0, output_per_mtok=15.0)


@st.composite
def events(draw: st.DrawFn) -> TelemetryEvent:
    ev = TelemetryEvent(
        experiment="e",
        request_id=f"r{draw(st.integers(0, 10**9))}",
        variant=draw(st.sampled_from(["stable", "canary", ""])),
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


@settings(max_examples=200, deadline=None)
@given(st.lists(events(), max_size=60), st.sampled_from(rollup.WIDTHS_S))
def test_merged_buckets_give_the_figures_of_the_raw_events(
    evs: list[TelemetryEvent], width: int
) -> None:
    # Written bucket by bucket, read back field by field, then merged: as a reader sees them.
    merged = rollup.merged(as_read(evs, width))
    whole = rollup.tally(evs)
    assert merged.tallies.keys() == whole.keys()
    for key, t in whole.items():
        price = PRICE if key[1] == "canary" else None
        got, want = merged.tallies[key].figures(price), t.figures(price)
        assert got.keys() == want.keys()
        for name, value in want.items():
            if isinstance(value, float):
                assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-6), (key, name)
            else:
                assert got[name] == value, (key, name)
    assert merged.refused == sum(1 for e in evs if not e.variant)
    assert merged.events == len(evs)


@settings(max_examples=200, deadline=None)
@given(st.lists(events(), max_size=60))
def test_coarse_buckets_merged_from_fine_ones_are_those_counted_at_their_width(
    evs: list[TelemetryEvent],
) -> None:
    """The writer tallies each event once, into fine buckets, and merges them into coarse ones:
    the fields it writes are those of counting the events at the coarse width."""
    merged = rollup.fields_of(rollup.coarser(rollup.buckets(evs, rollup.FINE_S), rollup.COARSE_S))
    counted = rollup.bucket_fields(evs, rollup.COARSE_S)
    assert merged.keys() == counted.keys()
    for start, (ints, floats) in counted.items():
        assert merged[start][0] == ints
        assert merged[start][1] == pytest.approx(floats, rel=1e-12)


@given(st.integers(0, 10**6), st.integers(1, 10**5))
def test_a_span_is_tiled_by_whole_buckets_once(since: int, length: int) -> None:
    tiles = rollup.span_starts(since, since + length)
    covered = [(start, start + width) for width, start in tiles]
    assert all(start % width == 0 for width, start in tiles)
    assert covered[0][0] == since - since % rollup.FINE_S
    assert covered[-1][1] >= since + length > covered[-1][1] - rollup.FINE_S
    assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))
    # Coarse hashes wherever they fit: at most 29 fine ones at each end.
    assert sum(1 for width, _ in tiles if width == rollup.FINE_S) <= 2 * 29 + 1
    # Before the fine buckets still kept, whole coarse ones only: the old end rounds out.
    kept = since + length // 2
    older = rollup.span_starts(since, since + length, kept)
    assert all(width == rollup.COARSE_S for width, start in older if start < kept)
    assert older[0][1] <= since < older[-1][1] + older[-1][0]
    assert older[-1][1] + older[-1][0] >= since + length
    assert all(a[1] + a[0] == b[1] for a, b in itertools.pairwise(older))


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
    assert list(parsed.tallies) == [("forced", "stable")]
    assert parsed.tallies[("forced", "stable")].counts == {"requests": 2}
