"""Pure decisions: from a stage's samples and the rollout state to pass / fail / wait per guardrail,
and from those to one action. No I/O here, so every rule is table-tested.

Error control: the experiment's ``alpha`` is split evenly (Bonferroni) over the stages and over
the guardrails whose action is ``rollback`` or ``hold``; each guardrail uses an anytime-valid test
(docs/STATISTICS.md), so checking every few seconds does not inflate false rollbacks, and the
chance of any false rollback over the whole rollout stays at or below ``alpha``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from extproc.config import ExperimentSpec, Guardrail
from extproc.evaluator.window import StageWindow, VariantWindow
from extproc.stats import (
    RunningMoments,
    mann_whitney_u,
    mean_harm_test,
    proportion_harm_test,
    quantile_confidence_sequence,
    quantile_harm_test,
    sequential_sample_ratio_mismatch,
    two_proportion_z_test,
    welch_t_test,
)

CheckStatus = Literal["pass", "fail", "waiting"]
ActionName = Literal["none", "advance", "complete", "rollback", "hold"]

_QUANTILE = {
    "latency_p99": ("latency", 0.99),
    "latency_p95": ("latency", 0.95),
    "latency_p50": ("latency", 0.50),
    "ttft_p95": ("ttft", 0.95),
    "ttft_p50": ("ttft", 0.50),
}
_MEAN = {
    "completion_tokens": "completion_tokens",
    "response_bytes": "response_bytes",
    "answer_chars": "answer_chars",
}
SRM_THRESHOLD = 0.001


@dataclass(frozen=True)
class Check:
    variant: str
    metric: str
    action: str
    status: CheckStatus
    estimate: float | None
    bound: float | None
    margin: float
    detail: str

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("estimate", "bound"):
            v = d[k]
            d[k] = None if v is None or not math.isfinite(v) else round(v, 4)
        return d


@dataclass(frozen=True)
class Verdict:
    action: ActionName
    reasons: list[str]
    checks: list[Check] = field(default_factory=list)
    srm_p: float | None = None


def per_check_alpha(spec: ExperimentSpec) -> float:
    gated = sum(1 for g in spec.guardrails if g.action in ("rollback", "hold")) or 1
    stages = len(spec.rollout.stages) if spec.strategy == "canary" else 1
    return spec.rollout.alpha / (gated * stages)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def check_guardrail(
    g: Guardrail, stable: VariantWindow, cand: VariantWindow, variant: str, alpha: float
) -> Check:
    """Run one guardrail for one candidate against stable."""

    def result(status: CheckStatus, est: float, bound: float, detail: str) -> Check:
        return Check(
            variant,
            g.metric,
            g.action,
            status,
            _finite(est),
            _finite(bound),
            g.max_increase,
            detail,
        )

    if cand.requests < g.min_samples:
        return result(
            "waiting", math.nan, math.nan, f"{cand.requests}/{g.min_samples} candidate requests"
        )
    if g.metric == "error_rate":
        t = proportion_harm_test(
            stable.errors,
            stable.requests,
            cand.errors,
            cand.requests,
            margin=g.max_increase,
            alpha=alpha / 2 if g.max_absolute else alpha,
        )
        if t.harm:
            return result(
                "fail",
                t.estimate,
                t.bound,
                f"error rate {cand.errors}/{cand.requests} vs stable "
                f"{stable.errors}/{stable.requests}: more than "
                f"+{g.max_increase:.0%} relative (bound {t.bound:+.0%})",
            )
        if g.max_absolute is not None:
            errs = np.zeros(cand.requests)
            errs[: cand.errors] = 1.0
            low = quantile_confidence_sequence(
                errs, 1 - g.max_absolute, alpha=alpha / 2, side="lower"
            ).low
            if low >= 1.0:
                return result(
                    "fail",
                    cand.errors / cand.requests,
                    g.max_absolute,
                    f"error rate {cand.errors}/{cand.requests} is above "
                    f"{g.max_absolute:.1%} absolute",
                )
        return result("pass", t.estimate, t.bound, "no evidence of harm")
    if g.metric == "refusal_rate":
        rt = proportion_harm_test(
            stable.refusals,
            stable.answered,
            cand.refusals,
            cand.answered,
            margin=g.max_increase,
            alpha=alpha,
        )
        status_: CheckStatus = "fail" if rt.harm else "pass"
        return result(
            status_,
            rt.estimate,
            rt.bound,
            f"refusal rate {cand.refusals}/{cand.answered} vs stable "
            f"{stable.refusals}/{stable.answered} (bound {rt.bound:+.0%}, "
            f"limit +{g.max_increase:.0%})",
        )
    if g.metric in _QUANTILE:
        source, q = _QUANTILE[g.metric]
        qt = quantile_harm_test(
            stable.samples(source), cand.samples(source), q=q, margin=g.max_increase, alpha=alpha
        )
        if not qt.ready:
            return result("waiting", qt.estimate, qt.bound, "not enough samples for the quantile")
        status: CheckStatus = "fail" if qt.harm else "pass"
        return result(
            status,
            qt.estimate,
            qt.bound,
            f"{g.metric} {qt.estimate:+.0%} vs stable (lower bound {qt.bound:+.0%}, "
            f"limit +{g.max_increase:.0%})",
        )
    source = _MEAN[g.metric]
    mt = mean_harm_test(
        RunningMoments.of(stable.samples(source)),
        RunningMoments.of(cand.samples(source)),
        margin=g.max_increase,
        relative=True,
        alpha=alpha,
        min_samples=min(100, g.min_samples),
    )
    if not mt.ready:
        return result("waiting", mt.estimate, mt.bound, "not enough samples")
    status = "fail" if mt.harm else "pass"
    return result(
        status,
        mt.estimate,
        mt.bound,
        f"{g.metric} mean {mt.estimate:+.0%} vs stable (lower bound {mt.bound:+.0%}, "
        f"limit +{g.max_increase:.0%})",
    )


def srm_p_value(window: StageWindow, weights: dict[str, float]) -> float | None:
    """Always-valid sample-ratio check on assignment units (conversations), not requests."""
    live = [v for v, w in weights.items() if w > 0]
    if len(live) < 2:
        return None
    counts = [window.of(v).assignment_units for v in live]
    if sum(counts) < 50:
        return None
    res = sequential_sample_ratio_mismatch(
        counts, [weights[v] for v in live], threshold=SRM_THRESHOLD
    )
    return float(res.p_value)


def judge(
    spec: ExperimentSpec,
    window: StageWindow,
    weights: dict[str, float],
    stage: int,
    stage_age_s: float,
) -> Verdict:
    """What to do now, for a running rollout at ``stage`` whose split is ``weights``."""
    alpha = per_check_alpha(spec)
    stable = window.of(spec.stable)
    if spec.strategy == "shadow":  # the candidate answers mirrored copies only
        cands = [spec.shadow.variant] if spec.shadow.variant else []
    else:
        cands = [v for v in spec.variants if v != spec.stable and weights.get(v, 0) > 0]
    checks = [
        check_guardrail(g, stable, window.of(v), v, alpha) for v in cands for g in spec.guardrails
    ]
    failed = [c for c in checks if c.status == "fail"]
    for action in ("rollback", "hold"):
        hits = [c for c in failed if c.action == action]
        if hits:
            return Verdict(action, [f"{c.variant}: {c.detail}" for c in hits], checks)
    warnings = [f"warning: {c.variant}: {c.detail}" for c in failed]
    srm = None if spec.strategy == "shadow" else srm_p_value(window, weights)
    if srm is not None and srm < SRM_THRESHOLD:
        return Verdict(
            "hold",
            [
                f"sample ratio mismatch (p={srm:.2g}): assignment is not "
                "following the weights; check routing before trusting metrics"
            ],
            checks,
            srm,
        )
    least = min((window.of(v).requests for v in cands), default=0)
    r = spec.rollout
    ready = stage_age_s >= r.min_stage_seconds and least >= r.min_stage_samples
    # At 100% stable serves nothing: comparisons that wait for stable data can never finish.
    stable_live = weights.get(spec.stable, 0) > 0 or spec.strategy != "canary"
    waiting = [
        c for c in checks if c.status == "waiting" and c.action == "rollback" and stable_live
    ]
    if spec.strategy in ("ab", "shadow"):
        if ready and not waiting:
            report = [f"{v}: {line}" for v in cands for line in ab_report(stable, window.of(v))]
            return Verdict("complete", [*warnings, "target sample reached", *report], checks, srm)
        return Verdict("none", warnings, checks, srm)
    if not ready or not r.auto_advance:
        return Verdict("none", warnings, checks, srm)
    if waiting:
        return Verdict("none", [*warnings, "guardrails still gathering data"], checks, srm)
    last = stage >= len(r.stages) - 1
    why = f"stage {stage + 1}/{len(r.stages)} healthy for {stage_age_s:.0f}s, {least} requests"
    return Verdict("complete" if last else "advance", [*warnings, why], checks, srm)


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:+.1%}"


def ab_report(stable: VariantWindow, cand: VariantWindow, alpha: float = 0.05) -> list[str]:
    """The fixed-horizon A/B summary, read once at the end: lift, CI, p-value, effect size.

    These are one-look tests (Welch, two-proportion z, Mann-Whitney); they are valid here because
    the report is computed once, when the target sample is reached, not on every tick.
    """
    lines = []
    for source, label in (("latency", "latency mean"), ("completion_tokens", "tokens/answer")):
        c, t = stable.samples(source), cand.samples(source)
        if c.size >= 2 and t.size >= 2:
            w = welch_t_test(c, t, alpha=alpha)
            ci = w.relative_ci
            lines.append(
                f"{label} {_pct(w.relative_estimate)} "
                f"[{_pct(ci.low if ci else None)}, {_pct(ci.high if ci else None)}] "
                f"p={w.p_value:.3g} (Welch; Hedges g {w.effect_size:+.2f})"
            )
    c, t = stable.samples("latency"), cand.samples("latency")
    if c.size and t.size:
        m = mann_whitney_u(c, t, alpha=alpha)
        lines.append(
            f"P(candidate slower) {m.estimate:.2f} [{m.ci.low:.2f}, {m.ci.high:.2f}] "
            f"p={m.p_value:.3g} (Mann-Whitney)"
        )
    for label, cs, cn, ts, tn in (
        ("error rate", stable.errors, stable.requests, cand.errors, cand.requests),
        ("refusal rate", stable.refusals, stable.answered, cand.refusals, cand.answered),
    ):
        if cn and tn:
            z = two_proportion_z_test(cs, cn, ts, tn, alpha=alpha)
            lines.append(
                f"{label} {ts / tn:.2%} vs {cs / cn:.2%}: difference "
                f"{z.estimate:+.2%} [{z.ci.low:+.2%}, {z.ci.high:+.2%}] p={z.p_value:.3g}"
            )
    return lines
