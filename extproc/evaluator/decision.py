"""The end of an A/B run: is the candidate *better*, and so: ship it, keep stable, or not yet?

The guardrails ask "is it safe?" at every look; this asks "is it better?" once, when the run's
sample is complete (``judge`` in ``guardrails.py`` calls it as the ``ab`` strategy completes),
so it uses fixed-horizon tests. Each metric of ``ab.metrics`` gets each arm's estimate, the
difference with a confidence interval, a two-sided p-value and the direction that counts as
better. One metric, ``ab.primary``, decides "better" at ``ab.alpha``; the others are secondary,
Holm-adjusted as one family at ``ab.alpha``, and only a significant harm on them counts:

* **ship**: the primary metric is better, and no secondary metric is worse;
* **keep stable**: the primary metric is worse, or any secondary metric is worse;
* **inconclusive**: neither; with the sample per arm the primary metric needs to detect the
  configured ``ab.mde`` (else the observed effect) with ``ab.power``.

So with equal arms a wrong "ship" has a chance of at most ``alpha / 2`` (the primary's better
tail), a wrong "keep" at most ``alpha`` (its worse tail plus the secondaries' family);
docs/STATISTICS.md states the tests, their assumptions and the simulated rates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from extproc.config import AbTest, ExperimentSpec
from extproc.evaluator.window import VariantWindow
from extproc.stats import (
    mann_whitney_u,
    quantile_difference,
    sample_size_means,
    sample_size_proportions,
    two_proportion_z_test,
    welch_t_test,
)
from extproc.stats.abtest import binomial_win_rate, cohens_d_interval, holm, median_test
from extproc.stats.power import sample_size_win_rate
from extproc.stats.results import Interval, SampleSize

Better = Literal["lower", "higher"]
Finding = Literal["better", "worse", "no difference", "no data"]
Outcome = Literal["ship", "keep", "inconclusive"]

OUTCOME_TEXT = {
    "ship": "ship the candidate",
    "keep": "keep stable",
    "inconclusive": "inconclusive",
}
MIN_BASELINE_SAMPLES = 30
"""Stable samples before ``min_samples: auto`` trusts stable's rate or spread to size the run."""


@dataclass(frozen=True)
class MetricResult:
    """One metric's comparison. ``difference`` and ``ci`` are on ``scale`` (candidate minus
    stable, unless the scale says otherwise); ``adjusted_p`` is Holm's for a secondary metric,
    the p-value itself for the primary; ``finding`` reads ``adjusted_p`` at the decision's alpha
    in the direction ``better``."""

    metric: str
    label: str
    unit: str
    test: str
    better: Better
    stable: float | None
    candidate: float | None
    difference: float | None
    scale: str
    ci: tuple[float, float] | None
    p_value: float | None
    n_stable: int
    n_candidate: int
    note: str = ""
    adjusted_p: float | None = None
    finding: Finding = "no data"

    @property
    def has_data(self) -> bool:
        return self.p_value is not None


@dataclass(frozen=True)
class AbDecision:
    """A candidate's decision against stable. ``needed`` is the sample per arm (stable,
    candidate) the primary metric needs, ``sized_for`` the effect it was sized for; both are
    set when the decision is inconclusive and the size could be computed."""

    variant: str
    outcome: Outcome
    primary: str
    alpha: float
    why: str
    metrics: tuple[MetricResult, ...]
    needed: tuple[int, int] | None = None
    sized_for: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["decision"] = OUTCOME_TEXT[self.outcome]
        d["metrics"] = [_rounded(asdict(m)) for m in self.metrics]
        prim = self.primary_result
        if self.needed is not None and prim is not None:
            d["more_needed"] = [
                max(0, self.needed[0] - prim.n_stable),
                max(0, self.needed[1] - prim.n_candidate),
            ]
        return d

    @property
    def primary_result(self) -> MetricResult | None:
        return next((m for m in self.metrics if m.metric == self.primary), None)


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, float):
            v = None if not math.isfinite(v) else float(f"{v:.6g}")
        elif isinstance(v, tuple | list):
            v = [None if not math.isfinite(x) else float(f"{x:.6g}") for x in v]
        out[k] = v
    return out


# --- one function per metric --------------------------------------------------------------------


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _ci(i: Interval) -> tuple[float, float] | None:
    return (i.low, i.high) if math.isfinite(i.low) and math.isfinite(i.high) else None


def _mean(x: NDArray[np.float64]) -> float | None:
    return float(np.mean(x)) if x.size else None


@dataclass(frozen=True)
class _About:
    """What a metric is, apart from its figures: names, unit, test, direction, scale."""

    metric: str
    label: str
    unit: str
    test: str
    better: Better = "lower"
    scale: str = "candidate - stable"

    def result(
        self,
        n: tuple[int, int],
        arms: tuple[float | None, float | None] = (None, None),
        difference: float | None = None,
        ci: tuple[float, float] | None = None,
        p: float = math.nan,
        note: str = "",
    ) -> MetricResult:
        """The comparison: ``n`` and ``arms`` are (stable, candidate); no ``p``: no data."""
        return MetricResult(
            metric=self.metric,
            label=self.label,
            unit=self.unit,
            test=self.test,
            better=self.better,
            stable=arms[0],
            candidate=arms[1],
            difference=difference,
            scale=self.scale,
            ci=ci,
            p_value=_finite(p),
            n_stable=n[0],
            n_candidate=n[1],
            note=note,
        )


def _welch(
    about: _About, c: NDArray[np.float64], t: NDArray[np.float64], alpha: float
) -> MetricResult:
    """A mean per request, Welch's t (no equal-variance assumption; CLT for the difference)."""
    w = welch_t_test(c, t, alpha=alpha)
    return about.result(
        (c.size, t.size), (_mean(c), _mean(t)), _finite(w.estimate), _ci(w.ci), w.p_value
    )


def _rates(about: _About, cs: int, cn: int, ts: int, tn: int, alpha: float) -> MetricResult:
    """A share of trials, the pooled two-proportion z-test with Newcombe's interval."""
    z = two_proportion_z_test(cs, cn, ts, tn, alpha=alpha)
    arms = (cs / cn if cn else None, ts / tn if tn else None)
    return about.result((cn, tn), arms, _finite(z.estimate), _ci(z.ci), z.p_value)


LATENCY_MEAN = _About("latency", "latency mean", "ms", "Welch t")
LATENCY_P50 = _About("latency", "latency p50", "ms", "Mood's median test, order-statistic CI")
TOKENS = _About("completion_tokens", "tokens per answer", "tokens", "Welch t")
COST = _About("cost", "cost per request", "", "Welch t")
ERRORS = _About("error_rate", "error rate", "fraction", "two-proportion z")
REFUSALS = _About("refusal_rate", "refusal rate", "fraction", "two-proportion z")
FEEDBACK = _About("negative_feedback_rate", "negative feedback", "fraction", "two-proportion z")
WIN_RATE = _About(
    "judge_win_rate",
    "judge win rate",
    "fraction",
    "exact binomial, Wilson CI",
    better="higher",
    scale="candidate win rate - 50%",
)
RUBRIC = _About(
    "rubric", "rubric score", "points", "Mann-Whitney U, Cohen's d CI", "higher", "Cohen's d"
)


def latency(s: VariantWindow, c: VariantWindow, ab: AbTest) -> MetricResult:
    x, y = s.samples("latency"), c.samples("latency")
    if ab.latency == "mean":
        return _welch(LATENCY_MEAN, x, y, ab.alpha)
    if not (x.size and y.size):
        return LATENCY_P50.result((x.size, y.size))
    q = quantile_difference(x, y, q=0.5, alpha=ab.alpha)
    arms = (q.control_quantile, q.treatment_quantile)
    return LATENCY_P50.result((x.size, y.size), arms, q.estimate, _ci(q.ci), median_test(x, y))


def completion_tokens(s: VariantWindow, c: VariantWindow, ab: AbTest) -> MetricResult:
    x, y = s.samples("completion_tokens"), c.samples("completion_tokens")
    return _welch(TOKENS, x, y, ab.alpha)


def cost(s: VariantWindow, c: VariantWindow, ab: AbTest) -> MetricResult:
    return _welch(COST, s.samples("cost"), c.samples("cost"), ab.alpha)


def error_rate(s: VariantWindow, c: VariantWindow, ab: AbTest) -> MetricResult:
    return _rates(ERRORS, s.errors, s.requests, c.errors, c.requests, ab.alpha)


def refusal_rate(s: VariantWindow, c: VariantWindow, ab: AbTest) -> MetricResult:
    return _rates(REFUSALS, s.refusals, s.answered, c.refusals, c.answered, ab.alpha)


def negative_feedback_rate(s: VariantWindow, c: VariantWindow, ab: AbTest) -> MetricResult:
    """Requests that drew negative feedback (down, retry, escalation); no data until any
    feedback came: an arm without feedback has no zero rate, it has no measurement."""
    if not (s.feedback or c.feedback):
        return FEEDBACK.result((s.requests, c.requests))
    bad_s, bad_c = min(s.negative_feedback, s.requests), min(c.negative_feedback, c.requests)
    return _rates(FEEDBACK, bad_s, s.requests, bad_c, c.requests, ab.alpha)


def judge_win_rate(s: VariantWindow, c: VariantWindow, ab: AbTest) -> MetricResult:
    """The candidate's share of decisive verdicts, exact binomial test against 50%; ties are
    counted in the note, not in the test."""
    rate, ci, p = binomial_win_rate(c.judge_wins, c.judge_losses, alpha=ab.alpha)
    n = c.judge_wins + c.judge_losses
    note = f"{c.judge_wins} wins, {c.judge_losses} losses, {c.judge_ties} ties"
    if n == 0:
        return WIN_RATE.result((0, 0), note=note)
    arms = (1.0 - rate, rate)
    return WIN_RATE.result((n, n), arms, rate - 0.5, (ci.low - 0.5, ci.high - 0.5), p, note)


def rubric(s: VariantWindow, c: VariantWindow, ab: AbTest) -> MetricResult:
    """Judge rubric scores (1-10, the mean of accuracy, clarity and completeness per answer):
    Mann-Whitney U for the p-value, Cohen's d with its interval as the difference."""
    x, y = s.samples("judge_scores"), c.samples("judge_scores")
    if not (x.size and y.size):
        return RUBRIC.result((x.size, y.size), (_mean(x), _mean(y)))
    p = mann_whitney_u(x, y, alpha=ab.alpha).p_value
    d, ci = cohens_d_interval(x, y, alpha=ab.alpha)
    return RUBRIC.result((x.size, y.size), (_mean(x), _mean(y)), _finite(d), _ci(ci), p)


COMPARE: dict[str, Callable[[VariantWindow, VariantWindow, AbTest], MetricResult]] = {
    "latency": latency,
    "completion_tokens": completion_tokens,
    "error_rate": error_rate,
    "refusal_rate": refusal_rate,
    "judge_win_rate": judge_win_rate,
    "rubric": rubric,
    "negative_feedback_rate": negative_feedback_rate,
    "cost": cost,
}


# --- the decision -------------------------------------------------------------------------------


def settings(spec: ExperimentSpec) -> AbTest:
    """The file's ``ab`` section, else its defaults."""
    return spec.ab or AbTest()


def primary_metric(spec: ExperimentSpec) -> str:
    return settings(spec).primary_metric(spec.judge is not None)


def _finding(m: MetricResult, p: float | None, alpha: float) -> MetricResult:
    if p is None or m.difference is None:
        return m
    finding: Finding = "no difference"
    if p < alpha and m.difference != 0:
        up = m.difference > 0
        finding = "better" if up == (m.better == "higher") else "worse"
    return replace(m, adjusted_p=p, finding=finding)


def decide(spec: ExperimentSpec, variant: str, s: VariantWindow, c: VariantWindow) -> AbDecision:
    """Compare ``variant`` (window ``c``) with stable (``s``) on every metric of ``ab.metrics``
    and state the decision (module docstring)."""
    ab = settings(spec)
    primary = primary_metric(spec)
    raw = [COMPARE[m](s, c, ab) for m in ab.metrics]
    secondary = [m for m in raw if m.metric != primary]
    adjusted = holm([m.p_value if m.p_value is not None else math.nan for m in secondary])
    adj = {
        m.metric: (None if math.isnan(p) else p) for m, p in zip(secondary, adjusted, strict=True)
    }
    results = tuple(
        _finding(m, m.p_value if m.metric == primary else adj[m.metric], ab.alpha) for m in raw
    )
    prim = next(m for m in results if m.metric == primary)
    worse = [m.label for m in results if m.metric != primary and m.finding == "worse"]
    if prim.finding == "worse" or worse:
        what = [f"{prim.label} worse"] if prim.finding == "worse" else []
        if worse:
            what.append(f"secondary worse (Holm): {', '.join(worse)}")
        return AbDecision(variant, "keep", primary, ab.alpha, "; ".join(what), results)
    if prim.finding == "better":
        why = f"{prim.label} better (p={prim.p_value:.3g}), no secondary metric worse"
        return AbDecision(variant, "ship", primary, ab.alpha, why, results)
    why = (
        f"{prim.label}: no data"
        if not prim.has_data
        else f"{prim.label}: no significant difference"
    )
    needed, sized_for = _still_needed(spec, primary, s, c, prim)
    return AbDecision(variant, "inconclusive", primary, ab.alpha, why, results, needed, sized_for)


def _still_needed(
    spec: ExperimentSpec, primary: str, s: VariantWindow, c: VariantWindow, prim: MetricResult
) -> tuple[tuple[int, int] | None, str]:
    """The sample per arm to detect the configured mde, else the observed effect."""
    ab = settings(spec)
    if ab.mde is not None:
        size, text = sample_size(primary, ab, s, c, ab.mde), f"mde {ab.mde:g}"
    else:
        observed = _observed_effect(primary, prim)
        if observed is None:
            return None, ""
        sign = math.copysign(1.0, observed)
        size = sample_size(primary, ab, s, c, abs(observed), sign)
        text = f"the observed effect {observed:+.3g}"
    return (None, "") if size is None else ((size.n_control, size.n_treatment), text)


def _observed_effect(primary: str, prim: MetricResult) -> float | None:
    """The primary's effect on the scale of ``ab.mde``: relative to stable, or a win rate's
    points above 50%; None when there is none to size for."""
    if prim.stable is None or prim.candidate is None or prim.candidate == prim.stable:
        return None
    if primary == "judge_win_rate":
        observed = prim.candidate - 0.5
    else:
        observed = prim.candidate / prim.stable - 1.0 if prim.stable else math.nan
    return observed if math.isfinite(observed) and observed != 0 else None


COLUMNS = {
    "latency": "latency",
    "completion_tokens": "completion_tokens",
    "cost": "cost",
    "rubric": "judge_scores",
}
"""The window column of each metric that is a mean of samples (p50 latency is sized as one)."""


def _counts(primary: str, s: VariantWindow, c: VariantWindow) -> tuple[int, int]:
    """Each arm's sample of the primary metric, in its unit."""
    if primary in COLUMNS:
        return len(s.samples(COLUMNS[primary])), len(c.samples(COLUMNS[primary]))
    if primary == "judge_win_rate":
        n = c.judge_wins + c.judge_losses
        return n, n
    if primary == "refusal_rate":
        return s.answered, c.answered
    return s.requests, c.requests


def sample_size(
    primary: str, ab: AbTest, s: VariantWindow, c: VariantWindow, mde: float, sign: float = 1.0
) -> SampleSize | None:
    """The two-sided fixed-horizon sample per arm for the primary metric to move by ``mde``
    (relative to stable's value; a win rate's points above 50%) with ``ab.power``, at the arms'
    current ratio. Stable's rate or spread comes from the run itself; None while it cannot be
    measured (too few samples, a rate of 0, no spread)."""
    n_s, n_c = _counts(primary, s, c)
    if primary == "judge_win_rate":
        target = 0.5 + sign * mde
        return (
            sample_size_win_rate(target, alpha=ab.alpha, power=ab.power) if 0 < target < 1 else None
        )
    if n_s < MIN_BASELINE_SAMPLES or n_c == 0:
        return None
    ratio = n_c / n_s
    try:
        if primary in ("error_rate", "refusal_rate", "negative_feedback_rate"):
            m = COMPARE[primary](s, c, ab)
            base = m.stable or 0.0
            return sample_size_proportions(
                base, sign * mde, relative=True, alpha=ab.alpha, power=ab.power, ratio=ratio
            )
        x = s.samples(COLUMNS[primary])
        sd, mean = float(np.std(x, ddof=1)), float(np.mean(x))
        return sample_size_means(
            sd, sign * mde, baseline_mean=mean, alpha=ab.alpha, power=ab.power, ratio=ratio
        )
    except ValueError:
        return None


def ready(spec: ExperimentSpec, s: VariantWindow, c: VariantWindow) -> tuple[bool, str]:
    """Whether both arms hold the sample ``ab.min_samples`` asks (a number, or ``auto``: the
    size for ``ab.mde``); the reason when not."""
    ab, primary = settings(spec), primary_metric(spec)
    if ab.min_samples is None:
        return True, ""
    have = _counts(primary, s, c)
    if ab.min_samples == "auto":
        assert ab.mde is not None, "checked when the experiment is loaded"
        size = sample_size(primary, ab, s, c, ab.mde)
        if size is None:
            return False, f"A/B: measuring stable's {primary} to size the run (ab.min_samples auto)"
        need = (size.n_control, size.n_treatment)
        how = f"for mde {ab.mde:g} at power {ab.power:g}"
    else:
        need, how = (ab.min_samples, ab.min_samples), "ab.min_samples"
    if have[0] >= need[0] and have[1] >= need[1]:
        return True, ""
    return False, (
        f"A/B: {primary} samples stable {have[0]}/{need[0]}, candidate {have[1]}/{need[1]} ({how})"
    )


# --- reading it ---------------------------------------------------------------------------------


def _num(x: float | None, unit: str) -> str:
    if x is None:
        return "n/a"
    if unit == "fraction":
        return f"{x:.2%}"
    return f"{x:.4g}{' ' + unit if unit else ''}"


def _diff(x: float | None, unit: str, scale: str) -> str:
    if x is None:
        return "n/a"
    if unit == "fraction":
        return f"{x * 100:+.2f} pts"
    if scale == "Cohen's d":
        return f"d {x:+.3f}"
    return f"{x:+.4g}{' ' + unit if unit else ''}"


def render(doc: Mapping[str, Any]) -> list[str]:
    """The decision as text lines, from its JSON (the evaluation in Redis, the replay's result):
    the one rendering `extproc status`, `extproc analyze` and the audit log's reasons share."""
    lines = [f"A/B decision for {doc['variant']}: {doc['decision'].upper()}: {doc['why']}"]
    if doc.get("needed"):
        more = doc.get("more_needed") or doc["needed"]
        lines.append(
            f"  per arm needed for {doc['sized_for']}: stable {doc['needed'][0]}, candidate "
            f"{doc['needed'][1]} ({more[0]} and {more[1]} more)"
        )
    for m in doc["metrics"]:
        role = "primary" if m["metric"] == doc["primary"] else "secondary"
        if m["p_value"] is None:
            lines.append(f"  {m['label']} ({role}): no data")
            continue
        unit, ci = m["unit"], m["ci"]
        ci_text = (
            f" [{_diff(ci[0], unit, m['scale'])}, {_diff(ci[1], unit, m['scale'])}]" if ci else ""
        )
        adj = f", Holm {m['adjusted_p']:.3g}" if role == "secondary" else ""
        note = f"; {m['note']}" if m["note"] else ""
        lines.append(
            f"  {m['label']} ({role}, {m['better']} is better): stable {_num(m['stable'], unit)}, "
            f"candidate {_num(m['candidate'], unit)}, {_diff(m['difference'], unit, m['scale'])}"
            f"{ci_text} p={m['p_value']:.3g}{adj} ({m['test']}{note}): {m['finding']}"
        )
    return lines
