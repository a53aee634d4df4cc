"""Result types shared by every test in :mod:`extproc.stats`.

Why frozen dataclasses: the evaluator stores, logs and compares results across looks, and a value
that cannot change after it is computed is safe to put in an audit log or a cache. Every difference
is **treatment minus control** (candidate minus stable), every relative difference is
``treatment / control - 1``, and ``alternative`` follows SciPy's names: ``"greater"`` means the
alternative hypothesis is *treatment > control*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Alternative = Literal["two-sided", "greater", "less"]
"""The alternative hypothesis, about ``treatment - control`` (SciPy's naming)."""


@dataclass(frozen=True, slots=True)
class Interval:
    """A confidence interval; a one-sided bound has an infinite other end."""

    low: float
    high: float

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in the closed interval (NaN ends contain nothing)."""
        return self.low <= value <= self.high

    @property
    def width(self) -> float:
        """``high - low``: infinite for a one-sided bound."""
        return self.high - self.low


UNBOUNDED = Interval(-math.inf, math.inf)
"""The interval that says nothing: returned when the data cannot bound the quantity."""

UNDEFINED = Interval(math.nan, math.nan)
"""The interval of a quantity that the data do not define (for example a mean of no samples)."""


@dataclass(frozen=True, slots=True)
class Comparison:
    """A fixed-horizon two-sample comparison: one look at the data, not for repeated peeking.

    ``estimate`` and ``ci`` are on the method's own scale (a mean difference, a difference of
    proportions, a probability of superiority). ``relative_estimate`` and ``relative_ci`` are
    ``treatment / control - 1`` where the method defines them, else ``None``.
    """

    method: str
    alternative: Alternative
    alpha: float
    estimate: float
    ci: Interval
    p_value: float
    statistic: float
    effect_size: float
    effect_size_name: str
    n_control: int
    n_treatment: int
    relative_estimate: float | None = None
    relative_ci: Interval | None = None


@dataclass(frozen=True, slots=True)
class QuantileComparison:
    """A confidence interval for the difference of one quantile between two samples.

    ``estimate`` is ``treatment_quantile - control_quantile``; ``relative_*`` is the ratio minus
    one, defined when the control quantile's bounds are positive (latencies always are).
    """

    method: str
    q: float
    alternative: Alternative
    alpha: float
    control_quantile: float
    treatment_quantile: float
    estimate: float
    ci: Interval
    relative_estimate: float | None
    relative_ci: Interval | None
    n_control: int
    n_treatment: int


@dataclass(frozen=True, slots=True)
class WinRate:
    """Share of pairwise judgements won by the candidate, ties counted as half a win.

    ``p_value`` is the two-sided score test of a 50% win rate, the test whose inversion is the
    Wilson interval, so ``p_value < alpha`` exactly when 0.5 lies outside ``ci``.
    """

    estimate: float
    ci: Interval
    p_value: float
    alpha: float
    wins: int
    losses: int
    ties: int

    @property
    def n(self) -> int:
        """All judgements, ties included."""
        return self.wins + self.losses + self.ties


@dataclass(frozen=True, slots=True)
class SampleSize:
    """Observations needed per arm to detect an effect with the asked power.

    ``effect_size`` is standardised: Cohen's h for proportions, Cohen's d for means.
    """

    method: str
    n_control: int
    n_treatment: int
    effect_size: float
    alpha: float
    power: float
    alternative: Alternative

    @property
    def total(self) -> int:
        """Both arms together: divide by total traffic to get a duration."""
        return self.n_control + self.n_treatment


@dataclass(frozen=True, slots=True)
class SrmResult:
    """A sample-ratio-mismatch check: do observed arm counts fit the configured weights?

    ``mismatch`` is ``p_value < threshold``; the evaluator holds the experiment when it is True,
    because every other comparison is suspect when assignment or logging is broken.
    """

    method: str
    statistic: float
    p_value: float
    threshold: float
    observed: tuple[int, ...]
    expected: tuple[float, ...]

    @property
    def mismatch(self) -> bool:
        """Whether the counts are implausible under the weights at the chosen threshold."""
        return self.p_value < self.threshold


@dataclass(frozen=True, slots=True)
class HarmTest:
    """One look of a sequential one-sided test: is the candidate worse by more than ``margin``?

    The test stays valid under continuous monitoring: over any number of looks, the probability
    that ``harm`` is ever True when the candidate is not worse by more than ``margin`` is at most
    ``alpha`` (exactly or asymptotically, see each test). Treat ``harm`` as absorbing: once True,
    roll back; later looks do not revoke it.

    * ``estimate``: the observed harm on the margin's scale, positive when the candidate looks
      worse (an absolute difference, or a relative one such as ``+0.12`` for 12% worse).
    * ``bound``: a time-uniform lower confidence bound on that harm; ``harm`` is
      ``bound > margin``. NaN when the test does not compute one.
    * ``e_value``: the test martingale's value; ``p_value = min(1, 1 / e_value)`` is an always-valid
      p-value (the running minimum over looks is valid too). NaN when the test has none.
    * ``ready``: False while the test lacks the data it needs (burn-in, or no finite bound yet);
      ``harm`` is then False.
    """

    method: str
    harm: bool
    ready: bool
    estimate: float
    bound: float
    e_value: float
    p_value: float
    margin: float
    relative: bool
    alpha: float
    n_control: int
    n_treatment: int
