"""RunningMoments: merging summaries must equal summarising the concatenated data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.stats import RunningMoments

pytestmark = pytest.mark.timeout(60)

samples = st.lists(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False), max_size=50
)


@settings(max_examples=200, deadline=None)
@given(samples, samples, samples)
def test_merge_equals_batch(a: list[float], b: list[float], c: list[float]) -> None:
    merged = RunningMoments.of(a).merge(RunningMoments.of(b)).update(c)
    whole = np.asarray(a + b + c)
    assert merged.count == whole.size
    if whole.size:
        scale = max(1.0, float(np.abs(whole).max()))
        assert merged.mean == pytest.approx(whole.mean(), abs=1e-9 * scale)
        assert merged.m2 == pytest.approx(
            float(np.square(whole - whole.mean()).sum()), rel=1e-7, abs=1e-6 * scale**2
        )
    # Merging is associative (up to rounding): per-replica summaries combine in any order.
    other = RunningMoments.of(a).merge(RunningMoments.of(b).merge(RunningMoments.of(c)))
    assert other.count == merged.count
    assert other.mean == pytest.approx(merged.mean, rel=1e-9, abs=1e-6)


def test_variance_and_sums() -> None:
    x = np.array([780.0, 812.5, 1900.0, 640.25, 5020.0])
    m = RunningMoments.of(x)
    assert m.variance == pytest.approx(x.var(ddof=1))
    assert m.std == pytest.approx(x.std(ddof=1))
    s = RunningMoments.from_sums(x.size, float(x.sum()), float(np.square(x).sum()))
    assert s.mean == pytest.approx(m.mean)
    assert s.variance == pytest.approx(m.variance)


@pytest.mark.parametrize("values", [[], [3.0]])
def test_too_few_for_a_variance(values: list[float]) -> None:
    m = RunningMoments.of(values)
    assert math.isnan(m.variance)
    assert math.isnan(m.std)
    assert RunningMoments.from_sums(0, 0.0, 0.0) == RunningMoments()


def test_constant_data_has_zero_variance_not_negative() -> None:
    x = np.full(1000, 1e6 + 0.1)
    s = RunningMoments.from_sums(x.size, float(x.sum()), float(np.square(x).sum()))
    assert s.variance >= 0.0
    assert RunningMoments.of(x).variance == pytest.approx(0.0, abs=1e-12)
