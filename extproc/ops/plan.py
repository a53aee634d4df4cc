"""Risk-graded rollout plans (`extproc plan`): from what changed to how carefully to roll it out.

Why: the right canary depends on the change. A serving-config change on the same weights can
only break serving, and a quick rolling canary finds that; a model of another family can regress
anywhere, so it starts small and is watched for a day. Choosing by hand invites both mistakes
(a day-long canary nobody waits for, a 50% first step for a new model), so the plan derives the
strategy, first canary share, evaluation time and guardrail margins from model metadata and
writes a ready, validated experiment file that says why in its header.

Risk, from low to high (the target's relation to the current model):

============  ========================================  ==========================================
tier          evidence                                  plan
============  ========================================  ==========================================
config        same ``weights_hash``                     rolling: 25 → 50 → 100%, 15 min, automatic
fine-tune     same ``base_model`` (or a quantization)   canary from 10%, 1 h, 100% behind a gate
new-version   same ``family``                           canary from 5%, 4 h, 50% on behind a gate
new-family    anything else, or nothing to compare      canary from 2%, 24 h, 25% on behind a gate
============  ========================================  ==========================================

Each tier is a per-stage schedule (``rollout.stages`` objects): stage times and minimum
candidate requests grow with the share, because the later stages are where slow-onset trouble
(memory growth, the daily load cycle) shows and where a regression reaches most users; and from
the share where a miss would hurt many users on, a stage ends only when a person promotes it
(``gate: manual``) after the guardrails passed. A config change keeps equal, automatic stages:
it can only break serving, which the first stage shows.

Evidence is only what both files state: a field missing on either side proves nothing. A
declared ``kind`` is taken as given unless the metadata prove the change riskier (a "config"
change whose weights hashes differ is at least a fine-tune), and with neither a kind nor
evidence the change is treated as a new family: unknown risk is high risk.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from extproc.config import (
    DEFAULT_GUARDRAILS,
    NAME_RE,
    ConfigError,
    Experiment,
    Gate,
    load_experiment,
    parse_experiment,
)
from extproc.contract.guardrail_metrics import METRICS
from extproc.stats import sample_size_means, sample_size_proportions
from extproc.stats.power import sample_size_win_rate
from extproc.stats.results import Alternative, SampleSize

Kind = Literal["config", "fine-tune", "quantization", "new-version", "new-family"]
Tier = Literal["config", "fine-tune", "new-version", "new-family"]
TIERS: tuple[Tier, ...] = ("config", "fine-tune", "new-version", "new-family")
_KIND_TIER: dict[str, Tier] = {
    "config": "config",
    "fine-tune": "fine-tune",
    "quantization": "fine-tune",
    "new-version": "new-version",
    "new-family": "new-family",
}


class ModelMeta(BaseModel):
    """What the plan knows about a model; every field but ``name`` may be unknown."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="model name, as served")
    family: str | None = Field(default=None, description="model family, e.g. llama-3")
    base_model: str | None = Field(default=None, description="what it was fine-tuned from")
    weights_hash: str | None = Field(default=None, description="digest of the weights")
    version: str | None = None
    kind: Kind | None = Field(
        default=None, description="the change relative to the current model, if declared"
    )

    def describe(self) -> str:
        facts = [
            f"{k} {v}"
            for k, v in (
                ("family", self.family),
                ("base", self.base_model),
                ("version", self.version),
                ("weights", self.weights_hash),
            )
            if v
        ]
        return self.name + (f" ({', '.join(facts)})" if facts else "")


@dataclass(frozen=True)
class Step:
    """One planned stage: its share, minimum time and candidate requests, and who ends it."""

    share: float
    seconds: int
    samples: int
    gate: Gate = "auto"

    def describe(self) -> str:
        gate = ", manual gate" if self.gate == "manual" else ""
        return f"{self.share:g}% ({_duration(self.seconds)}, {self.samples} requests{gate})"


@dataclass(frozen=True)
class Grade:
    """The rollout parameters of a risk tier."""

    strategy: str
    label: str
    steps: tuple[Step, ...]
    latency_margin: float  # p99 latency and TTFT p95, relative
    error_margin: float  # error rate, relative
    error_ceiling: float  # error rate, absolute

    @property
    def stages(self) -> tuple[float, ...]:
        return tuple(s.share for s in self.steps)

    @property
    def total_s(self) -> int:
        return sum(s.seconds for s in self.steps)

    @property
    def min_stage_seconds(self) -> int:
        """The first stage's time: the file's default, which stages that differ override."""
        return self.steps[0].seconds

    @property
    def min_stage_samples(self) -> int:
        return self.steps[0].samples

    def stage_entries(self) -> list[float | dict[str, Any]]:
        """``rollout.stages`` as written: a plain share where a stage keeps the defaults (the
        first stage's time and requests, automatic), an object with what differs elsewhere."""
        out: list[float | dict[str, Any]] = []
        for s in self.steps:
            own: dict[str, Any] = {}
            if s.seconds != self.min_stage_seconds:
                own["min_seconds"] = s.seconds
            if s.samples != self.min_stage_samples:
                own["min_samples"] = s.samples
            if s.gate != "auto":
                own["gate"] = s.gate
            out.append({"share": s.share, **own} if own else s.share)
        return out

    def guardrails(self) -> list[dict[str, Any]]:
        """The graded guardrails; tokens and length only warn (a new model may answer longer)."""
        return [
            {"metric": "latency_p99", "max_increase": self.latency_margin, "action": "rollback"},
            {
                "metric": "error_rate",
                "max_increase": self.error_margin,
                "max_absolute": self.error_ceiling,
                "action": "rollback",
            },
            {"metric": "ttft_p95", "max_increase": self.latency_margin, "action": "rollback"},
            {"metric": "completion_tokens", "max_increase": 0.5, "action": "warn"},
            {"metric": "response_bytes", "max_increase": 0.3, "action": "warn"},
        ]


_M, _H = 60, 3600
GRADES: dict[Tier, Grade] = {
    # Same weights: only serving can break, and it breaks for everyone alike, so big steps and
    # tight margins (a config change should cost nothing; a 25% share detects small shifts).
    "config": Grade(
        "canary",
        "rolling (quick canary)",
        (Step(25, 5 * _M, 200), Step(50, 5 * _M, 200), Step(100, 5 * _M, 200)),
        0.10,
        0.25,
        0.01,
    ),
    "fine-tune": Grade(
        "canary",
        "canary",
        (
            Step(10, 10 * _M, 300),
            Step(25, 10 * _M, 300),
            Step(50, 20 * _M, 600),
            Step(100, 20 * _M, 600, "manual"),
        ),
        0.20,
        0.50,
        0.02,
    ),
    "new-version": Grade(
        "canary",
        "canary",
        (
            Step(5, 30 * _M, 500),
            Step(10, 30 * _M, 500),
            Step(25, _H, 1000),
            Step(50, _H, 1000, "manual"),
            Step(100, _H, 2000, "manual"),
        ),
        0.20,
        0.50,
        0.02,
    ),
    "new-family": Grade(
        "canary",
        "canary",
        (
            Step(2, 2 * _H, 1000),
            Step(5, 2 * _H, 1000),
            Step(10, 4 * _H, 2000),
            Step(25, 4 * _H, 2000, "manual"),
            Step(50, 6 * _H, 4000, "manual"),
            Step(100, 6 * _H, 4000, "manual"),
        ),
        0.20,
        0.50,
        0.02,
    ),
}


def classify(current: ModelMeta, target: ModelMeta) -> tuple[Tier, list[str]]:
    """The risk tier of going from ``current`` to ``target``, and the evidence for it."""
    why: list[str] = []
    proven_at_least: Tier = "config"
    proven_at_most: Tier | None = None

    def at_least(t: Tier) -> None:
        nonlocal proven_at_least
        proven_at_least = max(proven_at_least, t, key=TIERS.index)

    def at_most(t: Tier) -> None:
        nonlocal proven_at_most
        proven_at_most = t if proven_at_most is None else min(proven_at_most, t, key=TIERS.index)

    if current.weights_hash and target.weights_hash:
        if current.weights_hash == target.weights_hash:
            at_most("config")
            why.append(f"same weights_hash ({target.weights_hash}): the weights did not change")
        else:
            at_least("fine-tune")
            why.append("weights_hash differs: the weights changed")
    # A fine-tune of the current model, or a return to the model the current one was tuned from,
    # counts as the same base too.
    same_base = bool(target.base_model and target.base_model in (current.base_model, current.name))
    same_base |= bool(current.base_model and current.base_model == target.name)
    if same_base:
        at_most("fine-tune")
        why.append(f"same base model {target.base_model}")
    elif current.base_model and target.base_model:
        at_least("new-version")
        why.append(f"base model differs ({current.base_model} -> {target.base_model})")
    if current.family and target.family:
        if current.family == target.family:
            at_most("new-version")
            why.append(f"same family {target.family}")
        else:
            at_least("new-family")
            why.append(f"family differs ({current.family} -> {target.family})")
    if target.kind:
        tier = _KIND_TIER[target.kind]
        why.append(f"declared kind: {target.kind}")
    elif proven_at_most is not None:
        tier = proven_at_most
    else:
        tier = "new-family"
        why.append("no kind and nothing to compare (family, base_model, weights_hash): unknown")
    if TIERS.index(proven_at_least) > TIERS.index(tier):
        why.append(f"graded up from {tier} to {proven_at_least}: the metadata show more change")
        tier = proven_at_least
    return tier, why


@dataclass(frozen=True)
class Plan:
    tier: Tier
    reasons: list[str]
    grade: Grade
    experiment: Experiment
    text: str  # the experiment file, with the explanation in comments
    # with stable's error rate known: what detecting the tier's error margin takes
    error_samples: MetricSampleSize | None = None

    def summary(self) -> dict[str, Any]:
        g = self.grade
        return {
            "error_rate_samples": None
            if self.error_samples is None
            else self.error_samples.to_json(),
            "tier": self.tier,
            "reasons": self.reasons,
            "strategy": g.strategy,
            "label": g.label,
            "canary_share": g.stages[0],
            "stages": list(g.stages),
            "schedule": [
                {
                    "share": s.share,
                    "min_seconds": s.seconds,
                    "min_samples": s.samples,
                    "gate": s.gate,
                }
                for s in g.steps
            ],
            "min_stage_seconds": g.min_stage_seconds,
            "evaluation_s": g.total_s,
            "evaluation": _duration(g.total_s),
            "min_stage_samples": g.min_stage_samples,
            "experiment": self.experiment.name,
        }


def _slug(name: str) -> str:
    s = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-_")
    s = s[:32].rstrip("-_") or "rollout"
    return s if re.match(NAME_RE, s) else "rollout"


def _duration(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


def _document(
    current: ModelMeta, target: ModelMeta, grade: Grade, base: Experiment | None, base_raw: Any
) -> dict[str, Any]:
    first = grade.stages[0]
    graded = grade.guardrails()
    graded_metrics = {g["metric"] for g in graded}
    if base is not None:
        doc: dict[str, Any] = dict(base_raw)
        cands = base.candidates
        if len(cands) != 1:
            raise ConfigError(
                base.source,
                [f"variants: a plan ramps one candidate; this file has {len(cands)} ({cands})"],
            )
        cand = cands[0]
        kept = [g for g in base_raw.get("guardrails", []) if g.get("metric") not in graded_metrics]
        if "guardrails" not in base_raw:
            kept = _ungraded_defaults(graded_metrics)
        variants = {k: dict(v) for k, v in base_raw["variants"].items()}
        rollout = dict(base_raw.get("rollout") or {})
    else:
        name = _slug(target.name)
        digest = hashlib.sha256(f"{current.name}\n{target.name}".encode()).hexdigest()[:8]
        doc = {"name": name, "salt": f"{name}-{digest}", "strategy": "canary", "stable": "stable"}
        cand = "canary"
        kept = _ungraded_defaults(graded_metrics)
        variants = {"stable": {"cluster": "model_stable"}, "canary": {"cluster": "model_canary"}}
        rollout = {}
    stable = doc["stable"]
    variants[stable].update(model=current.name, weight=100 - first)
    variants[cand].update(model=target.name, weight=first)
    for name in variants:
        if name not in (stable, cand):
            variants[name]["weight"] = 0
    rollout.pop("auto_advance", None)  # the plan's gates decide who ends each stage
    rollout.update(
        stages=grade.stage_entries(),
        min_stage_seconds=grade.min_stage_seconds,
        min_stage_samples=grade.min_stage_samples,
    )
    doc.update(strategy=grade.strategy, variants=variants, rollout=rollout)
    doc["guardrails"] = graded + kept
    return doc


def _ungraded_defaults(graded: set[str]) -> list[dict[str, Any]]:
    """Default guardrails the plan does not grade (kept as the project ships them)."""
    return [
        g.model_dump(mode="json", exclude_defaults=True)
        | {"metric": g.metric, "max_increase": g.max_increase, "action": g.action}
        for g in DEFAULT_GUARDRAILS
        if g.metric not in graded
    ]


def _header(
    current: ModelMeta,
    target: ModelMeta,
    tier: Tier,
    reasons: list[str],
    grade: Grade,
    base: Experiment | None,
) -> str:
    ramp = " -> ".join(s.describe() for s in grade.steps)
    lines = [
        "Rollout plan written by `extproc plan`.",
        f"current: {current.describe()}",
        f"target:  {target.describe()}",
        f"risk: {tier}, because:",
        *[f"  - {r}" for r in reasons],
        f"plan: {grade.label}, {_duration(grade.total_s)} in all, each stage at least as long "
        "and with at least as many candidate requests as:",
        f"  {ramp};",
        "  a manual gate waits for `extproc experiment promote` once the guardrails passed;",
        f"  rollback on p99 latency or TTFT p95 +{grade.latency_margin:.0%}, error rate "
        f"+{grade.error_margin:.0%} relative or above {grade.error_ceiling:.0%};",
        "  tokens per response and response size only warn (a new model may answer longer).",
    ]
    if tier == "new-family":
        lines.append(
            "  A new family can regress in quality where no latency guardrail looks: consider "
            "a shadow run first (strategy: shadow)."
        )
    if base is not None:
        lines.append(f"Based on {base.source} (its comments are not carried over).")
    else:
        lines.append("Set each variant's cluster (and address) to your model servers.")
    lines.append(
        "Check with `extproc check FILE`; backtest with `extproc analyze EVENTS --config FILE`."
    )
    return "".join(f"# {line}\n" for line in lines)


def make_plan(
    current: ModelMeta,
    target: ModelMeta,
    base: Experiment | None = None,
    base_raw: Any = None,
    error_baseline: float | None = None,
) -> Plan:
    """The plan and its experiment file, validated whole before anything is written.

    With ``error_baseline`` (stable's error rate) the header also says how many candidate
    requests detecting the tier's error margin takes, against what the ramp's stages ask.
    """
    tier, reasons = classify(current, target)
    grade = GRADES[tier]
    doc = _document(current, target, grade, base, base_raw)
    experiment = parse_experiment(doc, "the planned experiment")
    body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=4096)
    header = _header(current, target, tier, reasons, grade, base)
    detect = None
    if error_baseline is not None:
        detect = _error_samples(experiment, grade, error_baseline)
        header += _sample_size_note(detect, grade)
    return Plan(tier, reasons, grade, experiment, header + "\n" + body, detect)


def _error_samples(experiment: Experiment, grade: Grade, baseline: float) -> MetricSampleSize:
    """The tier's relative error margin at the first stage's share, at the alpha one gating
    guardrail gets in the planned file (the evaluator splits the rollout's alpha over them)."""
    spec = experiment.spec
    gated = sum(1 for g in spec.guardrails if g.action in ("rollback", "hold")) or 1
    return metric_sample_size(
        "error_rate",
        grade.error_margin,
        baseline=baseline,
        relative=True,
        share=grade.stages[0],
        alpha=spec.rollout.alpha / gated,
    )


def _sample_size_note(detect: MetricSampleSize, grade: Grade) -> str:
    ramp = sum(s.samples for s in grade.steps)
    verdict = (
        "the stages' minimums cover it"
        if ramp >= detect.size.n_treatment
        else "more than the stages' minimums: the ramp may end before a regression of that size "
        "is detected (raise min_samples, or accept a larger detectable effect)"
    )
    lines = [
        f"sample size (extproc sample-size): an error rate of {detect.baseline:.2%} rising to "
        f"{detect.target:.2%} (+{grade.error_margin:.0%}) is detected with "
        f"{detect.size.power:.0%} power at alpha {detect.size.alpha:.3g} after about "
        f"{detect.size.n_treatment} candidate requests at {detect.share:g}% (fixed horizon; "
        "the evaluator's sequential tests need more);",
        f"  the stages ask for {ramp} candidate requests in all: {verdict}.",
    ]
    return "".join(f"# {line}\n" for line in lines)


def load_meta(path: str | Path) -> ModelMeta:
    """A model metadata file (YAML or JSON), every problem listed with its field."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(str(p), [f"cannot read: {err.strerror}"]) from err
    except yaml.YAMLError as err:
        raise ConfigError(str(p), [f"not valid YAML ({err})"]) from err
    if not isinstance(raw, dict):
        raise ConfigError(str(p), ["(top level): must be a mapping of model metadata"])
    for k, v in list(raw.items()):  # hashes and versions are often written as bare numbers
        if k in ("weights_hash", "version") and isinstance(v, int | float):
            raw[k] = str(v)
    try:
        return ModelMeta.model_validate(raw)
    except ValidationError as err:
        problems = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ConfigError(str(p), problems) from err


def load_base(path: str | Path) -> tuple[Experiment, Any]:
    """The base experiment, validated, and its raw mapping (to keep only what the user wrote)."""
    exp = load_experiment(path)
    return exp, yaml.safe_load(Path(path).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class MetricSampleSize:
    """Requests per arm to detect ``baseline`` becoming ``target`` on a guardrail metric."""

    metric: str
    kind: str
    baseline: float
    target: float
    share: float  # the candidate's percent of traffic (50: an even A/B split)
    size: SampleSize

    def to_json(self) -> dict[str, Any]:
        s = self.size
        return {
            "metric": self.metric,
            "kind": self.kind,
            "baseline": self.baseline,
            "target": self.target,
            "share": self.share,
            "candidate": s.n_treatment,
            "stable": s.n_control,
            "total": s.total,
            "method": s.method,
            "effect_size": round(s.effect_size, 4),
            "alpha": s.alpha,
            "power": s.power,
            "alternative": s.alternative,
        }


def metric_sample_size(
    metric: str,
    mde: float,
    *,
    baseline: float | None = None,
    sd: float | None = None,
    relative: bool = False,
    share: float = 50.0,
    alpha: float = 0.05,
    power: float = 0.8,
) -> MetricSampleSize:
    """The fixed-horizon sample size of a guardrail metric's question, tested one-sided in the
    metric's harm direction (a guardrail asks "is it worse?", not "is it different?"; a metric
    harmful both ways, two-sided).

    ``mde`` is the size of the harm to detect, positive, absolute in the metric's units or, with
    ``relative``, a fraction of ``baseline``. A rate needs ``baseline`` (stable's rate); a
    quantile is judged as the evaluator judges it, by the share of candidate requests beyond
    stable's quantile (baseline 1 - q: 0.01 for p99), so ``mde`` moves that share; a mean needs
    ``sd`` (and ``baseline`` for a relative ``mde``). ``share`` is the candidate's percent of
    traffic: at a 5% stage stable serves 19 requests for each of the candidate's.

    Raises ValueError with what is missing or meaningless.
    """
    info = METRICS.get(metric)
    if info is None:
        raise ValueError(f"{metric!r} is not a guardrail metric (one of {sorted(METRICS)})")
    if not mde > 0:
        raise ValueError(f"the effect to detect must be positive (a harm), got {mde}")
    if not 0 < share < 100:
        raise ValueError(f"the candidate's share must be a percentage in (0, 100), got {share}")
    # a metric harmful both ways runs one test per side at half the alpha: a two-sided test
    sign = -1.0 if info.harm == "decrease" else 1.0
    sides: dict[str, Alternative] = {"increase": "greater", "decrease": "less"}
    alternative = sides.get(info.harm, "two-sided")
    ratio = share / (100 - share)
    if info.kind in ("rate", "quantile"):
        if info.kind == "quantile":
            if baseline is not None:
                raise ValueError(f"{metric}: the baseline is the tail share {1 - info.q:g}")
            baseline = round(1 - info.q, 10)
        if baseline is None:
            raise ValueError(f"{metric}: stable's rate is needed (--baseline, e.g. 0.01)")
        effect = sign * (mde * baseline if relative else mde)
        size = sample_size_proportions(
            baseline, effect, alpha=alpha, power=power, ratio=ratio, alternative=alternative
        )
        target = round(baseline + effect, 10)
        return MetricSampleSize(metric, info.kind, baseline, target, share, size)
    if info.kind == "mean":
        if sd is None:
            raise ValueError(f"{metric}: the standard deviation of the metric is needed (--sd)")
        if relative and baseline is None:
            raise ValueError(f"{metric}: a relative effect needs stable's mean (--baseline)")
        effect = sign * (mde * baseline if relative and baseline is not None else mde)
        size = sample_size_means(
            sd, effect, alpha=alpha, power=power, ratio=ratio, alternative=alternative
        )
        base = baseline if baseline is not None else 0.0
        return MetricSampleSize(metric, info.kind, base, base + effect, share, size)
    # The judge's win rate: one sample of decisive verdicts, each pair judged once. Harm is a
    # rate below 50% by ``mde`` points, tested one-sided: the two-sided size at twice the alpha
    # has the same critical value.
    if baseline is not None:
        raise ValueError(f"{metric}: the baseline is a 50% win rate (answers as good)")
    if not mde < 0.5:
        raise ValueError(f"{metric}: the effect is in points below a 50% win rate, under 0.5")
    two_sided = sample_size_win_rate(0.5 - mde, alpha=2 * alpha, power=power)
    size = replace(two_sided, alpha=alpha, alternative="less")
    return MetricSampleSize(metric, info.kind, 0.5, round(0.5 - mde, 10), share, size)
