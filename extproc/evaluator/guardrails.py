"""Pure decisions: from a stage's samples and the rollout state to pass / fail / wait per guardrail,
and from those to one action. No I/O here, so every rule is table-tested.

Error control: the experiment's ``alpha`` is split evenly (Bonferroni) over the guardrails whose
action is ``rollback`` or ``hold``, and each uses anytime-valid tests (docs/STATISTICS.md), so
checking every few seconds does not inflate false rollbacks. Within a guardrail the share is
split again over its parts: the margin test (each side of a two-sided one), and a quarter for
the ceiling (``max_absolute``). Every part with an e-value (event rates, means, the quantiles'
tail test, ceilings, the judge's win rate) carries its evidence across ramp stages as a mixture
of products of the stages' e-values (``carry_evidence``), a test martingale for the whole
rollout, so it spends its share once. Only the order-statistic quantile test is judged on one
stage alone (a quantile guardrail runs one in every stage besides its carried tail test, to
catch gross regressions at once), with a fifth of the quantile's share split over the stages.
On a canary ramp most of the tail test's share goes to an exact test read once per stage, at the
look that would end it, on the tail events of every stage so far (``stage_end_checks``): what
the e-process pays for being readable at every look, this test keeps as power. Either way the
chance of any false rollback over the whole rollout stays at or below ``alpha``.

Which test a metric takes, its counts and its direction of harm come from
``extproc.contract.guardrail_metrics.METRICS``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from extproc.config import ExperimentSpec, Guardrail
from extproc.evaluator import decision
from extproc.evaluator.clusters import COUNTERS
from extproc.evaluator.decision import AbDecision
from extproc.evaluator.window import StageWindow, VariantWindow
from extproc.stats import (
    HarmTest,
    RunningMoments,
    mann_whitney_u,
    mean_harm_test,
    quantile_harm_test,
    sequential_sample_ratio_mismatch,
    two_proportion_z_test,
    welch_t_test,
    win_rate_harm_test,
)
from extproc.stats.exceedance import (
    beyond,
    deflated_share_test,
    mean_ceiling_test,
    quantile_exceedance_test,
    rate_ceiling_test,
)
from extproc.stats.stratified import Stratum, stratified_share_test

CheckStatus = Literal["pass", "fail", "waiting"]
ActionName = Literal["none", "advance", "complete", "rollback", "hold"]
Side = Literal["increase", "decrease"]

SRM_THRESHOLD = 0.001
# Share of a quantile guardrail's margin alpha for the order-statistic test of a stage that has
# no reference yet (the first): it catches gross regressions at once; the rest goes to the tail
# test, whose evidence carries from the second stage on.
NO_REFERENCE_SHARE = 0.2
# Share of a guardrail's alpha for its ceiling (``max_absolute``), when it has one: a ceiling is
# for gross breaches, which need little alpha, while the margin test needs power for the
# regressions close to its margin.
CEILING_SHARE = 0.25
# A stage's stable q-quantile becomes the next stage's reference once it rests on this many
# stable samples beyond it (20 for p99: 2,000 samples).
REFERENCE_TAIL_SAMPLES = 20
# Share of a quantile guardrail's tail alpha (on a canary ramp) for the exact stage-end test
# (``stage_end_checks``), split evenly over the stage ends; the rest stays with the carried
# e-process, which can fire at any look. On the simulated traffic of docs/EVALUATOR.md, with
# 0.75 a p99 +30% was caught before the 50% stage in 20 of 40 rollouts, 17 of the same 40
# without the stage-end test; gross regressions are left to the e-process and the
# order-statistic test, which fire within a stage.
STAGE_END_SHARE = 0.75


@dataclass(frozen=True)
class Check:
    """One guardrail's look. ``log_e`` is this stage's log e-value of its main test (tests that
    have one); ``evidence`` the log e-value over the rollout so far (earlier stages' carried plus
    this). ``parts`` holds every e-valued test of the look (name, log e), carried separately;
    ``reference`` is stable's quantile in this stage, the next stage's reference; ``stratum``
    this stage's tail events (events, the candidate's, its share), for the stage-end test at
    ``stage_end_alpha``. ``threshold`` is the e-value at which ``evidence`` fails the check (the
    inverse of the alpha it spends); a waiting check has ``have`` of the ``need`` samples it
    waits for, counted in ``counting`` (the operator surfaces show these, never parse
    ``detail``)."""

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
    parts: tuple[tuple[str, float], ...] = ()
    reference: float | None = None
    stratum: Stratum | None = None
    stage_end_alpha: float = 0.0
    threshold: float | None = None
    have: int | None = None
    need: int | None = None
    counting: str = ""

    @property
    def key(self) -> str:
        return evidence_key(self.variant, self.metric)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("estimate", "bound", "log_e", "evidence", "reference", "threshold"):
            v = d[k]
            d[k] = None if v is None or not math.isfinite(v) else round(v, 4)
        d["parts"] = {p: round(v, 4) if math.isfinite(v) else None for p, v in self.parts}
        if self.stratum is None:
            del d["stratum"], d["stage_end_alpha"]
        return d


@dataclass(frozen=True)
class Verdict:
    action: ActionName
    reasons: list[str]
    checks: list[Check] = field(default_factory=list)
    srm_p: float | None = None
    # a manual gate's stage has shown all it must (`extproc analyze --promote-when-ready`)
    awaiting_promote: bool = False
    # an A/B run's end: each candidate's decision against stable (``decision.decide``)
    decisions: tuple[AbDecision, ...] = ()


@dataclass(frozen=True)
class Budget:
    """A gating guardrail's share of ``alpha``: ``rollout`` for a test whose evidence carries
    across stages (spent once), ``stage`` for a test judged on one stage's data alone.
    ``stage_end`` is the share of a quantile's tail alpha for the stage-end tests (none without
    stage ends to read them at), ``stage_ends`` how many stage ends split it."""

    rollout: float
    stage: float
    stage_end: float = 0.0
    stage_ends: int = 1


def budget(spec: ExperimentSpec) -> Budget:
    gated = sum(1 for g in spec.guardrails if g.action in ("rollback", "hold")) or 1
    stages = _stages(spec)
    ramp = spec.strategy == "canary" and stages > 1
    return Budget(
        spec.rollout.alpha / gated,
        spec.rollout.alpha / (gated * stages),
        STAGE_END_SHARE if ramp else 0.0,
        stages,
    )


def _stages(spec: ExperimentSpec) -> int:
    return len(spec.rollout.shares) if spec.strategy == "canary" else 1


def evidence_key(variant: str, metric: str, part: str = "") -> str:
    return f"{variant}/{metric}" + (f"/{part}" if part else "")


def reference_key(variant: str, metric: str) -> str:
    """Where the carried state keeps a quantile guardrail's reference (not a log e-value)."""
    return f"{variant}/{metric}#reference"


def stratum_key(variant: str, metric: str, stage: int, field_: str) -> str:
    """Where the carried state keeps one field of a stage's tail events (not a log e-value)."""
    return f"{variant}/{metric}#stage{stage}.{field_}"


def carried_strata(
    carried: Mapping[str, float], variant: str, metric: str, before: int
) -> list[Stratum]:
    """The tail events the stages before ``before`` left (stages without a reference left none)."""
    out = []
    for k in range(before):
        events = carried.get(stratum_key(variant, metric, k, "events"))
        if events is not None:
            treatment = carried[stratum_key(variant, metric, k, "treatment")]
            share = carried[stratum_key(variant, metric, k, "share")]
            out.append(Stratum(round(events), round(treatment), share))
    return out


def stage_weight(spec: ExperimentSpec, stage: int) -> float:
    """log w_k: the prior weight of "a regression that begins at stage k".

    Halving from the first stage (1/2, 1/4, ..., the last two equal, summing to 1): a candidate
    is the same model at every share, so a regression is most likely there from the start, and
    a later one still keeps a weight.
    """
    stages = _stages(spec)
    return -math.log(2.0) * min(stage + 1, stages - 1) if stages > 1 else 0.0


def initial_evidence(spec: ExperimentSpec, stage: int) -> float:
    """The carried log evidence of a check with no record (every earlier stage counted e = 1):
    the prior weight of the stages up to this one."""
    return float(np.logaddexp.reduce([stage_weight(spec, j) for j in range(stage + 1)]))


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
    time), whatever ended the stage, so no stage's evidence is dropped selectively. Quantile
    guardrails also leave stable's quantile of this stage, the next stage's reference, and the
    stage's tail events, for the stage-end tests of the stages after it.
    """
    out = dict(carried)
    w = stage_weight(spec, stage + 1)
    for c in verdict.checks if verdict else []:
        for part, log_e in c.parts:
            key = evidence_key(c.variant, c.metric, part)
            before = carried.get(key, initial_evidence(spec, stage))
            out[key] = float(np.logaddexp(before + log_e, w))
        if c.reference is not None:
            out[reference_key(c.variant, c.metric)] = c.reference
        if c.stratum is not None:
            for name in ("events", "treatment", "share"):
                out[stratum_key(c.variant, c.metric, stage, name)] = float(getattr(c.stratum, name))
    return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _log(e: float) -> float:
    return math.log(e) if e > 0 else -math.inf


def _evidence_note(combined: float, alpha: float) -> str:
    e = math.exp(min(combined, 700.0))
    return f"; evidence e={e:.3g} over the rollout (fails at {1 / alpha:.3g})"


@dataclass(frozen=True)
class _Part:
    """One e-valued test of a look: its name in the carried evidence, its log e-value this
    stage, the evidence over the rollout and whether that reached ``1/alpha``."""

    name: str
    log_e: float
    evidence: float
    alpha: float

    @property
    def fails(self) -> bool:
        return self.evidence >= -math.log(self.alpha)

    def note(self) -> str:
        return _evidence_note(self.evidence, self.alpha)


def _deflate(m: RunningMoments, design_effect: float) -> RunningMoments:
    """The same mean and spread, as if from ``count / design_effect`` independent samples."""
    if design_effect <= 1.0 or m.count < 2:
        return m
    n = max(round(m.count / design_effect), 2)
    return RunningMoments(n, m.mean, m.variance * (n - 1))


def _fmt(x: float, unit: str) -> str:
    if unit == "fraction":
        return f"{x:.2%}"
    return f"{x:.4g} {unit}"


class _Look:
    """The data of one guardrail for one candidate, and the carried evidence of its parts."""

    def __init__(
        self,
        g: Guardrail,
        stable: VariantWindow,
        cand: VariantWindow,
        variant: str,
        carried: Mapping[str, float],
        start: float,
    ) -> None:
        self.g, self.info, self.stable, self.cand = g, g.info, stable, cand
        self.variant, self.carried, self.start = variant, carried, start

    def part(self, name: str, test: HarmTest, alpha: float) -> _Part:
        log_e = _log(test.e_value)
        before = self.carried.get(evidence_key(self.variant, self.g.metric, name), self.start)
        return _Part(name, log_e, before + log_e, alpha)

    def samples(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        return self.stable.samples(self.info.source), self.cand.samples(self.info.source)

    def indicator_deff(self, w: VariantWindow, hits: NDArray[np.bool_]) -> float:
        return w.clusters.sample_design_effect(self.info.source, hits.astype(np.float64))

    def quantile_deff(self, w: VariantWindow, x: NDArray[np.float64]) -> float:
        """Design effect of "beyond the arm's own q-quantile": how clustered its tail is."""
        if x.size == 0:
            return 1.0
        point = float(np.quantile(x, self.info.q, method="inverted_cdf"))
        return self.indicator_deff(w, x > point)

    def rate_deff(self) -> float:
        i = self.info
        return max(w.clusters.rate_design_effect(i.events, i.per) for w in (self.stable, self.cand))


def _side_name(g: Guardrail, side: Side) -> str:
    """The part's name in the carried evidence: none for a one-sided guardrail (the key it always
    had), the side for each side of a two-sided one."""
    return side if len(g.harm_sides) > 1 else ""


def check_guardrail(
    g: Guardrail,
    stable: VariantWindow,
    cand: VariantWindow,
    variant: str,
    alpha: Budget,
    start: float,
    carried: Mapping[str, float] | None = None,
) -> Check:
    """Run one guardrail for one candidate against stable. ``carried`` is the state the earlier
    stages left (``carry_evidence``: log evidence per part, quantile references); a part with no
    record starts from ``start`` (``initial_evidence`` of this stage)."""
    look = _Look(g, stable, cand, variant, carried or {}, start)
    info = g.info
    have = {
        "judge_win_rate": cand.judge_wins + cand.judge_losses,
        "watchdog_fail_rate": cand.probes,
    }.get(g.metric, cand.requests)
    # Conversations are known for what the request events carry (not feedback or probes).
    per_request = info.kind in ("quantile", "mean") or info.events in COUNTERS

    def waiting(detail: str, got: int, need: int, counting: str) -> Check:
        return Check(
            variant,
            g.metric,
            g.action,
            "waiting",
            None,
            None,
            g.margin,
            detail,
            have=got,
            need=need,
            counting=counting,
        )

    if have < g.min_samples:
        return waiting(f"{have}/{g.min_samples} {info.trials}", have, g.min_samples, info.trials)
    if per_request and cand.assignment_units < g.min_conversations:
        units, more = cand.assignment_units, g.min_conversations - cand.assignment_units
        return waiting(
            f"needs {more} more conversations ({units}/{g.min_conversations}): "
            "requests of one conversation are not independent",
            units,
            g.min_conversations,
            "conversations",
        )
    ceiling = g.max_absolute is not None and info.kind != "win_rate"
    share = alpha.rollout * (1.0 - CEILING_SHARE) if ceiling else alpha.rollout
    per_side = share / len(g.harm_sides)
    results = [_margin_test(look, side, per_side, alpha) for side in g.harm_sides]
    if ceiling:
        results.append(_ceiling_test(look, alpha.rollout * CEILING_SHARE))
    parts = tuple((p.name, p.log_e) for r in results for p in r.parts)
    main = results[0]
    main_e = main.parts[0] if main.parts else None
    reference = main.reference

    def check(status: CheckStatus, r: _Result, action: str) -> Check:
        return Check(
            variant,
            g.metric,
            action,
            status,
            _finite(r.estimate),
            _finite(r.bound),
            g.margin,
            r.detail,
            main_e.log_e if main_e else None,
            main_e.evidence if main_e else None,
            parts,
            reference,
            main.stratum,
            main.stage_end_alpha,
            1 / main_e.alpha if main_e else None,
        )

    for r in results:
        if r.status == "fail":
            hold = r.shared and g.action == "rollback"
            return check("fail", r, "hold" if hold else g.action)
    for r in results:
        if r.status == "waiting":
            return check("waiting", r, g.action)
    detail = "; ".join(r.detail for r in results)
    return check("pass", _Result("pass", main.estimate, main.bound, detail, main.parts), g.action)


@dataclass(frozen=True)
class _Result:
    status: CheckStatus
    estimate: float
    bound: float
    detail: str
    parts: tuple[_Part, ...] = ()
    reference: float | None = None
    shared: bool = False  # a ceiling breached by stable as much: hold, not roll back
    stratum: Stratum | None = None  # this stage's tail events (quantile tests with a reference)
    stage_end_alpha: float = 0.0


def _verdict(parts: tuple[_Part, ...], estimate: float, bound: float, text: str) -> _Result:
    failed = [p for p in parts if p.fails]
    note = "".join(p.note() for p in parts[:1])
    if failed:
        return _Result("fail", estimate, bound, f"{text}{note}: worse beyond the margin", parts)
    return _Result("pass", estimate, bound, text + note, parts)


def _margin_test(look: _Look, side: Side, alpha: float, budget_: Budget) -> _Result:
    """Is the candidate worse than stable by more than the margin, on one side?"""
    g, info = look.g, look.info
    margin = g.margin_of(side)
    worse = side == "increase"
    name = _side_name(g, side)
    sign = "+" if worse else "-"

    def change(harm: float) -> str:
        """A harm-oriented figure as a change of the metric (a shortfall shows as minus)."""
        return f"{harm if worse else -harm:+.0%}"

    if info.kind == "win_rate":
        c = look.cand
        decisive = c.judge_wins + c.judge_losses
        wt = win_rate_harm_test(c.judge_wins, decisive, floor=0.5, margin=margin, alpha=alpha)
        text = (
            f"judge win rate {c.judge_wins}/{decisive} decisive verdicts (limit {0.5 - margin:.0%})"
        )
        return _verdict((look.part(name, wt, alpha),), -wt.estimate, math.nan, text)
    if info.kind == "rate":
        events, n = info.counts(look.cand)
        s_events, s_n = info.counts(look.stable)
        if n == 0 or s_n == 0:  # e.g. no JSON-mode requests: nothing to judge, nothing to wait for
            return _Result("pass", math.nan, math.nan, f"{info.label}: no {info.trials} yet")
        deff = look.rate_deff()
        t = deflated_share_test(
            s_events, s_n, events, n, deff, alpha, 100, margin=margin, higher_is_worse=worse
        )
        text = (
            f"{info.label} {events}/{n} vs stable {s_events}/{s_n} "
            f"(bound {change(t.bound)}, limit {sign}{margin:.0%}{_deff_note(deff)})"
        )
        return _verdict((look.part(name, t, alpha),), t.estimate, t.bound, text)
    if info.kind == "quantile":
        return _quantile_test(look, margin, alpha, budget_)
    c_samples, t_samples = look.samples()
    c_m, t_m = RunningMoments.of(c_samples), RunningMoments.of(t_samples)
    d_c = look.stable.clusters.sample_design_effect(info.source, c_samples)
    d_t = look.cand.clusters.sample_design_effect(info.source, t_samples)
    mt = mean_harm_test(
        _deflate(c_m, d_c),
        _deflate(t_m, d_t),
        margin=margin,
        relative=True,
        higher_is_worse=worse,
        alpha=alpha,
        min_samples=max(2, min(100, g.min_samples)),
    )
    if not mt.ready:
        return _Result("waiting", mt.estimate, mt.bound, "not enough samples")
    text = (
        f"{g.metric} mean {change(mt.estimate)} vs stable (bound {change(mt.bound)}, "
        f"limit {sign}{margin:.0%}{_deff_note(max(d_c, d_t))})"
    )
    return _verdict((look.part(name, mt, alpha),), mt.estimate, mt.bound, text)


def _deff_note(deff: float) -> str:
    return f", conversations weigh x{deff:.2g}" if deff > 1.05 else ""


def _quantile_test(look: _Look, margin: float, alpha: float, budget_: Budget) -> _Result:
    """Two tests, either of which fails the guardrail: the order-statistic test of this stage
    alone, at a small share split over the stages (it catches gross regressions within any
    stage, the first included), and the tail test against the reference the previous stage left
    (its evidence carries, so it catches what no single stage can). This stage's stable quantile
    is measured to be the next stage's reference, and its pooled tail events are counted for
    the stage-end test (``stage_end_checks``)."""
    g, info = look.g, look.info
    c, t = look.samples()
    enough = c.size * (1.0 - info.q) >= REFERENCE_TAIL_SAMPLES
    reference_now = float(np.quantile(c, info.q, method="inverted_cdf")) if enough else None
    a_stage = alpha * NO_REFERENCE_SHARE * budget_.stage / budget_.rollout
    qt = quantile_harm_test(
        c,
        t,
        q=info.q,
        margin=margin,
        alpha=a_stage,
        control_design_effect=look.quantile_deff(look.stable, c),
        treatment_design_effect=look.quantile_deff(look.cand, t),
    )
    stage_text = (
        f"{g.metric} {qt.estimate:+.0%} vs stable (this stage: lower bound {qt.bound:+.0%}, "
        f"limit +{margin:.0%})"
    )
    share = alpha * (1.0 - NO_REFERENCE_SHARE)
    stratum = _pooled_stratum(look, c, t, margin)
    a_end = share * budget_.stage_end / budget_.stage_ends

    def ending(r: _Result) -> _Result:
        """What the stage leaves: stable's quantile, the tail events for the stage-end test."""
        return replace(r, reference=reference_now, stratum=stratum, stage_end_alpha=a_end)

    ref = look.carried.get(reference_key(look.variant, g.metric))
    if ref is None or ref <= 0.0 or t.size == 0:
        if not qt.ready:
            return _Result("waiting", qt.estimate, qt.bound, "not enough samples for the quantile")
        status: CheckStatus = "fail" if qt.harm else "pass"
        return ending(_Result(status, qt.estimate, qt.bound, stage_text))
    shifted = ref * (1.0 + margin)
    deff = max(
        look.indicator_deff(look.cand, t > shifted), look.indicator_deff(look.stable, c > ref)
    )
    a_tail = share * (1.0 - budget_.stage_end)
    et = quantile_exceedance_test(c, t, ref, margin=margin, alpha=a_tail, design_effect=deff)
    k_t, k_c = beyond(t, shifted), beyond(c, ref)
    text = (
        f"{g.metric}: {k_t}/{t.size} beyond {shifted:.0f} ms vs stable {k_c}/{c.size} beyond "
        f"{ref:.0f} ms, its q={info.q:g} quantile last stage (tail ratio {et.estimate + 1:.2f}"
        f"{_deff_note(deff)})"
    )
    r = _verdict((look.part("", et, a_tail),), et.estimate, et.bound, text)
    if qt.harm and r.status != "fail":
        r = _Result("fail", qt.estimate, qt.bound, stage_text, r.parts)
    return ending(r)


def _pooled_stratum(
    look: _Look, c: NDArray[np.float64], t: NDArray[np.float64], margin: float
) -> Stratum | None:
    """This stage's tail events for the stage-end test: the requests beyond the q-quantile of
    both arms pooled, the candidate's latencies divided by ``1 + margin`` first.

    Why pooled, not the previous stage's reference: the stage-end test is read once, so a
    threshold from this stage's own data is fine, and under the null (the candidate's latency
    over ``1 + margin`` distributed as stable's) the arms' labels are exchangeable: given the
    pooled tail, the candidate's count in it is hypergeometric, which the binomial of
    :func:`~extproc.stats.stratified.stratified_share_test` bounds from above. Every stage
    counts, the first included, and no reference's noise enters. Counts are deflated by the
    design effect, as the carried test's are.
    """
    if c.size == 0 or t.size == 0:
        return None
    scaled = t / (1.0 + margin)
    cut = float(np.quantile(np.concatenate([c, scaled]), look.info.q, method="inverted_cdf"))
    hit_t, hit_c = scaled > cut, c > cut
    deff = max(look.indicator_deff(look.cand, hit_t), look.indicator_deff(look.stable, hit_c))
    d_t = round(int(np.count_nonzero(hit_t)) / deff)
    d_c = round(int(np.count_nonzero(hit_c)) / deff)
    return Stratum(d_t + d_c, d_t, t.size / (t.size + c.size))


def stage_end_checks(checks: list[Check], carried: Mapping[str, float], stage: int) -> list[Check]:
    """The checks again, each quantile guardrail's failed when its exact stage-end test finds
    the candidate's tail heavier over every stage so far. Read once per stage: only at the look
    that would end it (an advance or the completion), whose verdict is final either way."""
    out = []
    for c in checks:
        if c.stratum is None or not c.stage_end_alpha or c.status == "fail":
            out.append(c)
            continue
        strata = [*carried_strata(carried, c.variant, c.metric, stage), c.stratum]
        # No margin here: the strata counted the candidate's latencies over 1 + margin already.
        st = stratified_share_test(strata, alpha=c.stage_end_alpha)
        if not st.harm:
            out.append(c)
            continue
        detail = (
            f"{c.metric}: over {st.strata} stages {st.observed} of the tail events were the "
            f"candidate's where {st.expected:.1f} were expected (exact stage-end test, "
            f"p={st.p_value:.2g} <= {c.stage_end_alpha:.2g}): worse beyond the margin"
        )
        out.append(replace(c, status="fail", detail=detail))
    return out


def _ceiling_test(look: _Look, alpha: float) -> _Result:
    """Is the candidate above ``max_absolute``? With ``shared_incident: hold`` a breach rolls
    back only when the candidate is also provably worse than stable (an intersection-union
    test: both at the full share); a breach stable shares holds the rollout instead."""
    g, info = look.g, look.info
    c_lim = g.max_absolute
    assert c_lim is not None
    if info.kind == "rate":
        events, n = info.counts(look.cand)
        s_events, s_n = info.counts(look.stable)
        deff = look.rate_deff()
        above = rate_ceiling_test(events / deff, n / deff, c_lim, alpha=alpha)
        excess = deflated_share_test(s_events, s_n, events, n, deff, alpha, 100)
        what = f"{info.label} {events}/{n}"
    elif info.kind == "quantile":
        c, t = look.samples()
        d_t = look.indicator_deff(look.cand, t > c_lim)
        deff = max(d_t, look.indicator_deff(look.stable, c > c_lim))
        k_t = beyond(t, c_lim)
        above = rate_ceiling_test(k_t / d_t, t.size / d_t, 1.0 - info.q, alpha=alpha)
        excess = deflated_share_test(beyond(c, c_lim), c.size, k_t, t.size, deff, alpha, 100)
        what = f"{g.metric}: {k_t}/{t.size} beyond {c_lim:g} ms (more than {1 - info.q:.0%})"
    else:
        c, t = look.samples()
        d_c = look.stable.clusters.sample_design_effect(info.source, c)
        d_t = look.cand.clusters.sample_design_effect(info.source, t)
        t_m = RunningMoments.of(t)
        above = mean_ceiling_test(t_m, c_lim, alpha=alpha, design_effect=d_t)
        excess = mean_harm_test(
            _deflate(RunningMoments.of(c), d_c), _deflate(t_m, d_t), alpha=alpha
        )
        what = f"{g.metric} mean {_fmt(t_m.mean, info.unit)}"
    if not above.ready:
        return _Result("waiting", math.nan, math.nan, "not enough samples for the ceiling")
    p_above = look.part("ceiling", above, alpha)
    limit = _fmt(c_lim, info.unit) if info.kind != "quantile" else f"{c_lim:g} ms"
    text = f"{what}, ceiling {limit}{p_above.note()}"
    if g.shared_incident == "rollback":
        parts: tuple[_Part, ...] = (p_above,)
        if p_above.fails:
            return _Result("fail", above.estimate, math.nan, f"{text}: above the ceiling", parts)
        return _Result("pass", above.estimate, math.nan, text, parts)
    p_excess = look.part("excess", excess, alpha) if excess.ready else None
    parts = (p_above,) + ((p_excess,) if p_excess else ())
    if not p_above.fails:
        return _Result("pass", above.estimate, math.nan, text, parts)
    if p_excess is not None and p_excess.fails:
        return _Result(
            "fail",
            above.estimate,
            math.nan,
            f"{text}: above the ceiling and worse than stable",
            parts,
        )
    return _Result(
        "fail",
        above.estimate,
        math.nan,
        f"{text}: above the ceiling, but not worse than stable: an incident both share? "
        "holding (shared_incident: hold)",
        parts,
        shared=True,
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


def _gate(checks: list[Check]) -> Verdict | None:
    """A rollback when a rollback guardrail failed, else a hold when a hold one did."""
    failed = [c for c in checks if c.status == "fail"]
    for action in ("rollback", "hold"):
        hits = [c for c in failed if c.action == action]
        if hits:
            return Verdict(action, [f"{c.variant}: {c.detail}" for c in hits], checks)
    return None


def _warnings(checks: list[Check]) -> list[str]:
    return [f"warning: {c.variant}: {c.detail}" for c in checks if c.status == "fail"]


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
        check_guardrail(g, stable, window.of(v), v, alpha, start, carried)
        for v in cands
        for g in spec.guardrails
    ]
    gated = _gate(checks)
    if gated is not None:
        return gated
    warnings = _warnings(checks)
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
    plan = r.schedule(stage)
    ready = stage_age_s >= plan.min_seconds and least >= plan.min_samples
    # At 100% stable serves only the holdback (rollout.holdback; nothing when it is 0): the
    # checks compare the candidate with it, but those still waiting for its few samples do not
    # hold the completion, which could otherwise wait for hours.
    stable_live = weights.get(spec.stable, 0) > spec.rollout.holdback or spec.strategy != "canary"
    waiting = [
        c for c in checks if c.status == "waiting" and c.action == "rollback" and stable_live
    ]
    if spec.strategy == "blue-green":
        if ready and not waiting and plan.gate == "auto":
            return Verdict("complete", [*warnings, "mirrored checks passed: flip"], checks)
        if ready and not waiting:
            return Verdict("none", [*warnings, "mirrored checks passed: promote to flip"], checks)
        return Verdict("none", warnings, checks)
    if spec.strategy == "ab":
        return _ab_end(spec, window, cands, ready and not waiting, warnings, checks, srm)
    if spec.strategy == "shadow":
        if ready and not waiting:
            report = [f"{v}: {line}" for v in cands for line in ab_report(stable, window.of(v))]
            return Verdict("complete", [*warnings, "target sample reached", *report], checks, srm)
        return Verdict("none", warnings, checks, srm)
    if not ready:
        return Verdict("none", warnings, checks, srm)
    if waiting:
        return Verdict("none", [*warnings, "guardrails still gathering data"], checks, srm)
    if plan.gate == "manual":
        # The stage-end test is read once, when the stage ends: on a manual gate that is the
        # promote, which carries the evidence as it stands (machine.command).
        ready_why = f"stage {stage + 1}/{len(r.shares)} ready: waiting for promote (manual gate)"
        return Verdict("none", [*warnings, ready_why], checks, srm, awaiting_promote=True)
    checks = stage_end_checks(checks, carried, stage)
    gated = _gate(checks)
    if gated is not None:
        return gated
    warnings = _warnings(checks)
    last = stage >= len(r.shares) - 1
    why = f"stage {stage + 1}/{len(r.shares)} healthy for {stage_age_s:.0f}s, {least} requests"
    return Verdict("complete" if last else "advance", [*warnings, why], checks, srm)


def _ab_end(
    spec: ExperimentSpec,
    window: StageWindow,
    cands: list[str],
    scheduled: bool,
    warnings: list[str],
    checks: list[Check],
    srm: float | None,
) -> Verdict:
    """An A/B run ends once its schedule is met, no gating guardrail waits and every candidate
    has the sample ``ab.min_samples`` asks for; it ends in one decision per candidate."""
    stable = window.of(spec.stable)
    if not scheduled:
        return Verdict("none", warnings, checks, srm)
    readiness = [decision.ready(spec, stable, window.of(v)) for v in cands]
    short = [why for ok, why in readiness if not ok]
    if short:
        return Verdict("none", [*warnings, *short], checks, srm)
    found = tuple(decision.decide(spec, v, stable, window.of(v)) for v in cands)
    report = [line for d in found for line in decision.render(d.to_json())]
    return Verdict(
        "complete", [*warnings, "target sample reached", *report], checks, srm, decisions=found
    )


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
