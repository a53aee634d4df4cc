"""Mergeable running moments (count, mean, sum of squared deviations).

Why: the evaluator re-checks guardrails every few seconds over data that keep arriving, from many
sidecar replicas. It should fold each new batch into a small summary instead of re-reading every
sample, and it should be able to combine summaries kept per replica or per time window. The
summary of (count, mean, M2) is what Welford's update and Chan et al.'s pairwise merge keep; it is
numerically stable where naive sums of squares lose digits. When the only store at hand is atomic
counters (Redis ``HINCRBYFLOAT``), :meth:`RunningMoments.from_sums` turns (count, sum, sum of
squares) into the same summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike


@dataclass(frozen=True, slots=True)
class RunningMoments:
    """Count, mean and sum of squared deviations from the mean (``m2``) of a sample."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @classmethod
    def of(cls, values: ArrayLike) -> RunningMoments:
        """The moments of a batch (two-pass in numpy, so as stable as a one-pass Welford loop)."""
        x = np.asarray(values, dtype=np.float64).ravel()
        if x.size == 0:
            return cls()
        mean = float(x.mean())
        return cls(int(x.size), mean, float(np.square(x - mean).sum()))

    @classmethod
    def from_sums(cls, count: int, total: float, total_squares: float) -> RunningMoments:
        """From raw power sums; exact enough for latencies (cancellation costs ~1-2 digits)."""
        if count <= 0:
            return cls()
        mean = total / count
        return cls(count, mean, max(total_squares - total * mean, 0.0))

    def merge(self, other: RunningMoments) -> RunningMoments:
        """The moments of both samples together (Chan, Golub and LeVeque's pairwise update)."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / n
        m2 = self.m2 + other.m2 + delta * delta * self.count * other.count / n
        return RunningMoments(n, mean, m2)

    def update(self, values: ArrayLike) -> RunningMoments:
        """These moments with a new batch folded in."""
        return self.merge(RunningMoments.of(values))

    @property
    def variance(self) -> float:
        """Sample variance (ddof=1); NaN below two observations."""
        return self.m2 / (self.count - 1) if self.count >= 2 else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof=1); NaN below two observations."""
        return math.sqrt(self.variance) if self.count >= 2 else math.nan


def as_moments(data: ArrayLike | RunningMoments) -> RunningMoments:
    """Accept either raw samples or an already-kept summary wherever only moments are needed."""
    return data if isinstance(data, RunningMoments) else RunningMoments.of(data)
