"""Pure decisions: from a stage's samples and the rollout state to pass / fail / wait per guardrail,
and from those to one action. No I/O here, so every rule is table-tested.

Error control: the experiment's ``alpha`` is split evenly (Bonferroni) over the guardrails whose
action is ``rollback`` or ``hold``, and each uses an anytime-valid test (docs/STATISTICS.md), so
checking every few seconds does not inflate false rollbacks. Tests with an e-value (event
rates, means, the judge's win rate) carry their evidence across ramp stages as a mixture of
products of the stages' e-values (``carry_evidence``), a test martingale for the whole rollout,
so they spend the guardrail's share once. Quantile tests have no e-value; they are judged per
stage and their share is split again over the stages. Either way the
chance of any false rollback over the whole rollout stays at or below ``alpha``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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
    win_rate_harm_test,
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
    """One guardrail's look. ``log_e`` is this stage's log e-value (tests that have one);
    ``evidence`` the log e-value over the rollout so far (earlier stages' carried plus this)."""

    variant: str
    metric: str
    action: str
    status: CheckStatus
    estimate: float | None
    bound: float | None
    margin: float
    detail: str
    log_e: float | None = None
    evidence: float | None = None

    @property
    def key(self) -> str:
        return evidence_key(self.variant, self.metric)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("estimate", "bound", "log_e", "evidence"):
            v = d[k]
            d[k] = None if v is None or not math.isfinite(v) else round(v, 4)
        return d


@dataclass(frozen=True)
class Verdict:
    action: ActionName
    reasons: list[str]
    checks: list[Check] = field(default_factory=list)
    srm_p: float | None = None


@dataclass(frozen=True)
class Budget:
    """A gating guardrail's share of ``alpha``: ``rollout`` for a test whose evidence carries
    across stages (spent once), ``stage`` for a test judged on one stage's data alone."""

    rollout: float
    stage: float


def budget(spec: ExperimentSpec) -> Budget:
    gated = sum(1 for g in spec.guardrails if g.action in ("rollback", "hold")) or 1
    stages = len(spec.rollout.stages) if spec.strategy == "canary" else 1
    return Budget(spec.rollout.alpha / gated, spec.rollout.alpha / (gated * stages))


def evidence_key(variant: str, metric: str) -> str:
    return f"{variant}/{metric}"


def stage_weight(spec: ExperimentSpec) -> float:
    """log w: each stage may start a fresh product of e-values, with prior weight 1/K."""
    stages = len(spec.rollout.stages) if spec.strategy == "canary" else 1
    return -math.log(stages)


def initial_evidence(spec: ExperimentSpec, stage: int) -> float:
    """The carried log evidence of a check with no record (every earlier stage counted e = 1)."""
    return stage_weight(spec) + math.log(stage + 1)


def carry_evidence(
    spec: ExperimentSpec, carried: dict[str, float], stage: int, verdict: Verdict | None
) -> dict[str, float]:
    """The evidence the next stage starts from, once stage ``stage`` ends.

    The evidence of a check is ``log sum_k w_k prod_{j>=k} e_j``: a mixture, over the stage k at
    which a regression might have begun, of the products of the stages' e-values from k on. Each
    product is a test martingale (a stage's e-value has expectation at most 1 under the null given
    the past) and so is their mixture, so the check stays anytime-valid over the whole rollout;
    and unlike a single product, evidence that a healthy early stage pushed below 1 cannot bury a
    regression that starts later. Called with the verdict of the stage's last look (the stopping
    time), whatever ended the stage, so no stage's evidence is dropped selectively.
    """
    out = dict(carried)
    w = stage_weight(spec)
    for c in verdict.checks if verdict else []:
        if c.log_e is not None:
            before = carried.get(c.key, initial_evidence(spec, stage))
            out[c.key] = float(np.logaddexp(before + c.log_e, w))
    return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


_RATES = {
    "error_rate": "error rate",
    "refusal_rate": "refusal rate",
    "feedback_negative_rate": "negative feedback rate",
    "watchdog_fail_rate": "watchdog failure rate",
}


def _rate_counts(
    metric: str, stable: VariantWindow, cand: VariantWindow
) -> tuple[int, int, int, int]:
    """(candidate events, candidate trials, stable events, stable trials) of a rate metric."""

    def of(w: VariantWindow) -> tuple[int, int]:
        if metric == "error_rate":
            return w.errors, w.requests
        if metric == "refusal_rate":
            return w.refusals, w.answered
        if metric == "feedback_negative_rate":  # requests with a complaint, at most one each
            return min(w.negative_feedback, w.requests), w.requests
        return w.probe_failures, w.probes

    return (*of(cand), *of(stable))


def _log(e: float) -> float:
    return math.log(e) if e > 0 else -math.inf


def _evidence_note(combined: float, alpha: float) -> str:
    e = math.exp(min(combined, 700.0))
    return f"; evidence e={e:.3g} over the rollout (fails at {1 / alpha:.3g})"


def check_guardrail(
    g: Guardrail,
    stable: VariantWindow,
    cand: VariantWindow,
    variant: str,
    alpha: Budget,
    carried: float,
) -> Check:
    """Run one guardrail for one candidate against stable; ``carried`` is the log evidence the
    earlier stages left for this check (``carry_evidence``; ``initial_evidence`` at the start)."""

    def result(
        status: CheckStatus, est: float, bound: float, detail: str, log_e: float | None = None
    ) -> Check:
        return Check(
            variant,
            g.metric,
            g.action,
            status,
            _finite(est),
            _finite(bound),
            g.margin,
            detail,
            log_e,
            None if log_e is None else carried + log_e,
        )

    decisive = cand.judge_wins + cand.judge_losses
    unit, have = {
        "judge_win_rate": ("decisive judge verdicts", decisive),
        "watchdog_fail_rate": ("watchdog probes", cand.probes),
    }.get(g.metric, ("candidate requests", cand.requests))
    if have < g.min_samples:
        return result(
            "waiting",
            math.nan,
            math.nan,
            f"{have}/{g.min_samples} {unit}",
            0.0 if g.metric not in _QUANTILE else None,
        )
    if g.metric == "judge_win_rate":
        wt = win_rate_harm_test(
            cand.judge_wins, decisive, floor=0.5, margin=g.margin, alpha=alpha.rollout
        )
        log_e = _log(wt.e_value)
        combined = carried + log_e
        text = (
            f"judge win rate {cand.judge_wins}/{decisive} decisive verdicts "
            f"(limit {0.5 - g.margin:.0%})" + _evidence_note(combined, alpha.rollout)
        )
        fail = combined >= -math.log(alpha.rollout)
        return result("fail" if fail else "pass", -wt.estimate, math.nan, text, log_e)
    if g.metric in _RATES:
        label = _RATES[g.metric]
        events, n, s_events, s_n = _rate_counts(g.metric, stable, cand)
        a = alpha.rollout / 2 if g.max_absolute else alpha.rollout
        t = proportion_harm_test(s_events, s_n, events, n, margin=g.margin, alpha=a)
        log_e = _log(t.e_value)
        combined = carried + log_e
        text = (
            f"{label} {events}/{n} vs stable {s_events}/{s_n} "
            f"(bound {t.bound:+.0%}, limit +{g.margin:.0%})" + _evidence_note(combined, a)
        )
        if combined >= -math.log(a):
            return result("fail", t.estimate, t.bound, f"{text}: worse beyond the margin", log_e)
        if g.max_absolute is not None and n:
            errs = np.zeros(n)
            errs[:events] = 1.0
            low = quantile_confidence_sequence(
                errs, 1 - g.max_absolute, alpha=alpha.stage / 2, side="lower"
            ).low
            if low >= 1.0:
                return result(
                    "fail",
                    events / n,
                    g.max_absolute,
                    f"{label} {events}/{n} is above {g.max_absolute:.1%} absolute",
                    log_e,
                )
        return result("pass", t.estimate, t.bound, text, log_e)
    if g.metric in _QUANTILE:
        source, q = _QUANTILE[g.metric]
        qt = quantile_harm_test(
            stable.samples(source),
            cand.samples(source),
            q=q,
            margin=g.margin,
            alpha=alpha.stage,
        )
        if not qt.ready:
            return result("waiting", qt.estimate, qt.bound, "not enough samples for the quantile")
        status: CheckStatus = "fail" if qt.harm else "pass"
        return result(
            status,
            qt.estimate,
            qt.bound,
            f"{g.metric} {qt.estimate:+.0%} vs stable (lower bound {qt.bound:+.0%}, "
            f"limit +{g.margin:.0%})",
        )
    source = _MEAN[g.metric]
    mt = mean_harm_test(
        RunningMoments.of(stable.samples(source)),
        RunningMoments.of(cand.samples(source)),
        margin=g.margin,
        relative=True,
        alpha=alpha.rollout,
        min_samples=min(100, g.min_samples),
    )
    if not mt.ready:
        return result("waiting", mt.estimate, mt.bound, "not enough samples", 0.0)
    log_e = _log(mt.e_value)
    combined = carried + log_e
    status = "fail" if combined >= -math.log(alpha.rollout) else "pass"
    return result(
        status,
        mt.estimate,
        mt.bound,
        f"{g.metric} mean {mt.estimate:+.0%} vs stable (lower bound {mt.bound:+.0%}, "
        f"limit +{g.margin:.0%})" + _evidence_note(combined, alpha.rollout),
        log_e,
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
    evidence: Mapping[str, float] | None = None,
) -> Verdict:
    """What to do now, for a running rollout at ``stage`` whose split is ``weights``;
    ``evidence`` is what earlier stages carried (``RolloutState.evidence``)."""
    alpha = budget(spec)
    stable = window.of(spec.stable)
    mirrored = spec.strategy in ("shadow", "blue-green")
    if mirrored:  # the candidate answers mirrored copies only
        cands = [spec.shadow.variant] if spec.shadow.variant else []
    else:
        cands = [v for v in spec.variants if v != spec.stable and weights.get(v, 0) > 0]
    carried = evidence or {}
    start = initial_evidence(spec, stage)
    checks = [
        check_guardrail(
            g,
            stable,
            window.of(v),
            v,
            alpha,
            carried.get(evidence_key(v, g.metric), start),
        )
        for v in cands
        for g in spec.guardrails
    ]
    failed = [c for c in checks if c.status == "fail"]
    for action in ("rollback", "hold"):
        hits = [c for c in failed if c.action == action]
        if hits:
            return Verdict(action, [f"{c.variant}: {c.detail}" for c in hits], checks)
    warnings = [f"warning: {c.variant}: {c.detail}" for c in failed]
    srm = None if mirrored else srm_p_value(window, weights)
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
    # At 100% stable serves only the holdback (rollout.holdback; nothing when it is 0): the
    # checks compare the candidate with it, but those still waiting for its few samples do not
    # hold the completion, which could otherwise wait for hours.
    stable_live = weights.get(spec.stable, 0) > spec.rollout.holdback or spec.strategy != "canary"
    waiting = [
        c for c in checks if c.status == "waiting" and c.action == "rollback" and stable_live
    ]
    if spec.strategy == "blue-green":
        if ready and not waiting and r.auto_advance:
            return Verdict("complete", [*warnings, "mirrored checks passed: flip"], checks)
        if ready and not waiting:
            return Verdict("none", [*warnings, "mirrored checks passed: promote to flip"], checks)
        return Verdict("none", warnings, checks)
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
