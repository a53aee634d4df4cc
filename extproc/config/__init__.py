"""The experiment file: typed, validated whole when loaded, compiled once.

A bad experiment file must never reach a running sidecar half-understood, so loading reports every
problem at once, each with its path in the file (``variants.canary.weight: must be 0..100``), and
the sidecar keeps its last good configuration when a reload fails.

Structure is checked by pydantic; rules that span fields (weights adding up to 100, the stable
variant existing, lanes for several candidates) are checked separately on the raw data so that they
are reported together with the structural errors instead of after them are fixed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from extproc.contract.assignment import BUCKETS
from extproc.contract.guardrail_metrics import METRICS, Direction, MetricInfo, sides
from extproc.contract.selection import Override, Selector, Selectors

EXAMPLE_EXPERIMENT = Path(__file__).parent.parent / "data" / "experiment.yaml"
"""The commented example experiment that the local stack, `check` and `envoy-config` default to."""
NAME_RE = r"^[a-z0-9][a-z0-9_-]{0,31}$"
HEADER_RE = r"^[a-z0-9!#$%&'*+.^_`|~-]+$"
_WEIGHT_STEP = 100 / BUCKETS


class ConfigError(Exception):
    """An experiment file (or a routing change) that cannot be used; lists every problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Price(_Strict):
    """Token prices of a variant, per million tokens (any currency, the same for all variants)."""

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok
        ) / 1e6


class VariantSpec(_Strict):
    cluster: str = Field(min_length=1, description="Envoy cluster that serves this variant")
    address: str | None = Field(
        default=None, description="host:port of the model server, for generated Envoy configs"
    )
    weight: float = Field(ge=0, le=100, description="share of live traffic, in percent")
    model: str | None = Field(default=None, description="model name, for reports")
    price: Price | None = Field(default=None, description="for cost per request in reports")


class ForcedRouting(_Strict):
    """Who may pin a request to a variant with a header (testers, the watchdog set).

    ``secret_env`` names an environment variable of the sidecar that holds a shared secret; when
    set, forcing also needs ``secret_header`` with that value, so nobody outside can push their
    traffic onto an unreleased model. The file (and Redis) hold only the variable's name.
    """

    enabled: bool = True
    header: str = Field(default="x-experiment", pattern=HEADER_RE)
    allow: list[str] = Field(default_factory=list, description="variants that may be forced")
    secret_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    secret_header: str = Field(default="x-experiment-key", pattern=HEADER_RE)

    @property
    def strip(self) -> list[str]:
        """Headers that steer routing and must never reach a model server."""
        return [self.header, self.secret_header] if self.secret_env else [self.header]


class EnvoySettings(_Strict):
    request_timeout_s: float = Field(default=300, gt=0)
    message_timeout_ms: int = Field(default=200, ge=1, le=10_000)


Action = Literal["rollback", "hold", "warn"]


class Guardrail(_Strict):
    """A one-sided check for harm (or two, ``direction: both``): the candidate worse than stable
    by more than a margin, and optionally above an absolute ceiling. What each metric is, which
    test it takes and which side is harm: ``extproc.contract.guardrail_metrics.METRICS``."""

    metric: str = Field(description="a name in extproc.contract.guardrail_metrics.METRICS")
    max_increase: float | None = Field(
        default=None, ge=0, description="relative margin, 0.2 = +20%; 0 = any increase"
    )
    max_decrease: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description=(
            "relative margin when less is harm, 0.3 = -30%; for judge_win_rate points below "
            "a 50% win rate, 0.05 = under 45%"
        ),
    )
    direction: Direction | None = Field(
        default=None, description="increase, decrease or both (where the metric allows)"
    )
    max_absolute: float | None = Field(
        default=None,
        gt=0,
        description="a ceiling in the metric's unit: ms for latency quantiles, fraction for rates",
    )
    shared_incident: Literal["hold", "rollback"] = Field(
        default="hold",
        description=(
            "when the candidate is above max_absolute but not provably worse than stable: "
            "hold (an incident both share) or roll back all the same"
        ),
    )
    action: Action = "rollback"
    min_samples: int = Field(default=100, ge=1, description="candidate samples before judging")
    min_conversations: int = Field(
        default=20,
        ge=1,
        description="distinct candidate conversations before judging (clustered traffic)",
    )

    @property
    def info(self) -> MetricInfo:
        return METRICS[self.metric]

    @property
    def harm_sides(self) -> tuple[Literal["increase", "decrease"], ...]:
        """The one-sided tests this guardrail runs: ``direction``, else the metric's harm."""
        return sides(self.direction or self.info.harm)

    def margin_of(self, side: Literal["increase", "decrease"]) -> float:
        """The tolerated harm on one side; with ``direction: both`` a side without its own margin
        takes the other's."""
        first, other = (
            (self.max_increase, self.max_decrease)
            if side == "increase"
            else (self.max_decrease, self.max_increase)
        )
        value = first if first is not None else other
        assert value is not None, "checked when the experiment is loaded"
        return value

    @property
    def margin(self) -> float:
        """The tolerated harm of the first side tested."""
        return self.margin_of(self.harm_sides[0])


DEFAULT_GUARDRAILS = [
    Guardrail(metric="latency_p99", max_increase=0.0, action="rollback"),
    Guardrail(metric="error_rate", max_increase=0.50, max_absolute=0.02, action="rollback"),
    Guardrail(metric="ttft_p95", max_increase=0.20, action="rollback"),
    Guardrail(metric="refusal_rate", max_increase=0.50, action="rollback"),
    Guardrail(metric="completion_tokens", max_increase=0.50, action="warn"),
    Guardrail(metric="response_bytes", max_increase=0.30, action="warn"),
]


JUDGE_GUARDRAIL = {"metric": "judge_win_rate", "max_decrease": 0.05, "action": "rollback"}


Gate = Literal["auto", "manual"]


class Stage(_Strict):
    """One canary stage with a schedule of its own: operators ramp early stages quickly and on
    their own, later ones slowly and behind a person (``gate: manual`` waits for
    `extproc experiment promote`). A field left out takes the rollout's default
    (``min_stage_seconds``, ``min_stage_samples``, ``auto_advance``)."""

    share: float = Field(description="percent of conversations per candidate (checked 0..100)")
    min_seconds: float | None = Field(default=None, ge=0)
    min_samples: int | None = Field(default=None, ge=0, description="candidate requests")
    gate: Gate | None = None


@dataclass(frozen=True)
class StageSchedule:
    """A stage's resolved schedule: its own values, else the rollout's defaults."""

    share: float
    min_seconds: float
    min_samples: int
    gate: Gate


class Rollout(_Strict):
    """How the evaluator walks the stages; every number here is per stage.

    ``stages`` mixes plain shares and :class:`Stage` objects; the ``min_stage_*`` fields and
    ``auto_advance`` are the schedule of every stage that does not set its own.
    """

    stages: list[float | Stage] = Field(default=[2, 5, 10, 25, 50, 100], min_length=1)
    min_stage_seconds: float = Field(default=300, ge=0)
    min_stage_samples: int = Field(default=200, ge=0, description="candidate requests")
    auto_advance: bool = True
    cadence_s: float = Field(default=5, gt=0, le=300)
    alpha: float = Field(
        default=0.05, gt=0, lt=0.5, description="per experiment, split over stages"
    )
    webhook: str | None = Field(default=None, description="JSON POST on every decision")
    holdback: float = Field(
        default=1,
        ge=0,
        le=50,
        description=(
            "percent of conversations kept on stable at a stage that would leave it less, "
            "until the rollout completes: the last stage's comparison"
        ),
    )

    @property
    def shares(self) -> list[float]:
        """Each stage's share, whether the file wrote it plain or as an object."""
        return [s.share if isinstance(s, Stage) else s for s in self.stages]

    def schedule(self, stage: int) -> StageSchedule:
        """What stage ``stage`` (0-based) must show before it ends, and who ends it."""
        s = self.stages[stage]
        own = s if isinstance(s, Stage) else Stage(share=s)
        return StageSchedule(
            share=own.share,
            min_seconds=self.min_stage_seconds if own.min_seconds is None else own.min_seconds,
            min_samples=self.min_stage_samples if own.min_samples is None else own.min_samples,
            gate=own.gate or ("auto" if self.auto_advance else "manual"),
        )


class Inflight(_Strict):
    """Requests still open count before they end: a hang is caught while it hangs.

    The data plane sends one notice per request still open ``notice_ms`` after it started; the
    evaluator counts a request as hung (a server error and a timeout of its variant, in the stage
    it started in) once it is older than max(notice_ms, hang_multiple x stable's p99 latency).
    Keep notice_ms well under the upstream timeout (``envoy.request_timeout_s``) or hangs are seen
    only when they time out; left out, it is 5 s or half that timeout, whichever is shorter.
    """

    notice_ms: int = Field(
        default=5000,
        ge=100,
        le=3_600_000,
        description="data plane: notice a request open this long",
    )
    hang_multiple: float = Field(
        default=4, ge=1, le=1000, description="hung beyond this multiple of stable's p99 latency"
    )


class Telemetry(_Strict):
    """What the telemetry writer keeps in Redis for this experiment's readers."""

    rollup_retention_days: int = Field(
        default=30,
        ge=1,
        le=3650,
        description="keep the per-bucket rollups (status, top, the dashboard's charts) this long "
        "after their last request; longer than the rollout runs",
    )


# Models write the apostrophe straight or curly (U+2019): both match.
DEFAULT_REFUSALS = [
    r"^\s*(I['\u2019]?m|I am) (sorry|afraid)",
    r"\bI (can(?:no|['\u2019])t|cannot|won['\u2019]?t|am unable to|['\u2019]m unable to) "
    r"(help|assist|comply|provide)",
    r"\bAs an AI( language model)?\b",
    r"\bI['\u2019]?m not able to (help|assist)",
]


class Shadow(_Strict):
    """Mirror a share of live requests to a variant whose answers the user never sees."""

    variant: str | None = None
    share: float = Field(default=0, ge=0, le=100, description="percent of requests mirrored")


class Capture(_Strict):
    """Keep prompt and answer texts of a sample of requests, paired by request id."""

    sample: float = Field(default=0, ge=0, le=100, description="percent of requests captured")
    max_bytes: int = Field(default=16_384, ge=256, le=1_048_576)
    ttl_s: int = Field(default=86_400, ge=60)
    max_pairs: int = Field(default=10_000, ge=1)
    redact: list[str] = Field(default_factory=list, description="regexes replaced by [REDACTED]")


class Quality(_Strict):
    refusal_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_REFUSALS))


class Judge(_Strict):
    """A judge model compares the primary and the shadow answer of captured pairs.

    Run by ``extproc quality``; each pair costs two calls (both presentation orders).
    """

    endpoint: str = Field(description="base URL of an OpenAI-compatible API, as in .../v1")
    model: str = Field(min_length=1)
    api_key_env: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="env var with the key"
    )
    calls_per_minute: float = Field(default=30, gt=0, le=100_000)
    sample: float = Field(default=100, ge=0, le=100, description="percent of pairs judged")
    timeout_s: float = Field(default=60, gt=0, le=600)
    max_retries: int = Field(default=2, ge=0, le=10, description="per call, on invalid output")


class Watchdog(_Strict):
    """Reference prompts sent to each variant (forced) at an interval, with checks."""

    file: str = Field(min_length=1, description="YAML prompt set, relative to this file")
    interval_s: float = Field(default=300, gt=0)
    variants: list[str] = Field(default_factory=list, description="probed variants; [] = all")
    timeout_s: float = Field(default=60, gt=0, le=600)


HOOK_EVENTS = ("on_start", "on_advance", "on_rollback", "on_complete", "on_drained")


class Hooks(_Strict):
    """Lifecycle webhooks: a JSON POST to a serving layer (KServe, Triton, vLLM, a script) when
    an attempt starts (warm the candidate), a stage advances (scale it), the rollout rolls back
    (unload it) or completes (retire stable). Delivered after the decision took effect, retried
    with backoff, and never awaited by it: a failing hook is recorded in the audit log and
    never delays a rollback."""

    on_start: str | None = Field(default=None, description="an attempt starts (or restarts)")
    on_advance: str | None = Field(default=None, description="a stage advances (or is promoted)")
    on_rollback: str | None = None
    on_complete: str | None = None
    on_drained: str | None = Field(
        default=None, description="a variant taken out of routing has no request open any more"
    )
    timeout_s: float = Field(default=5, gt=0, le=60, description="per try")
    retries: int = Field(default=3, ge=0, le=10, description="tries after the first")
    backoff_s: float = Field(default=1, ge=0, le=60, description="doubled after every try")


class Warmup(_Strict):
    """Before stage 1 takes user traffic: wait until Envoy reports the candidate's hosts
    healthy, then send it forced requests until ``requests`` of them were answered (2xx), so a
    cold model (loading weights, compiling kernels, filling caches) is not judged on its first
    answers. Forced requests never enter the comparison. Not done in ``timeout_s``: rolled back.
    """

    requests: int = Field(
        default=20, ge=0, le=100_000, description="answered requests per candidate; 0 = none"
    )
    prompts: str | None = Field(
        default=None,
        min_length=1,
        description="a prompt set in the watchdog's format, relative to this file; "
        "left out: a built-in set",
    )
    wait_healthy: bool = Field(
        default=False, description="first wait until every Envoy reports the cluster healthy"
    )
    timeout_s: float = Field(default=300, gt=0, le=86_400, description="the whole warm-up")
    concurrency: int = Field(default=4, ge=1, le=64, description="requests open at once")


class Drain(_Strict):
    """After a rollback or a completion: how the evaluator follows the requests still open on
    the variant it took out of routing (``upstream_rq_active`` of its cluster, on every Envoy)."""

    poll_s: float = Field(default=1, gt=0, le=60)
    timeout_s: float = Field(default=600, gt=0, le=86_400, description="then reported undrained")


class Lifecycle(_Strict):
    """A candidate's life around its canary: load (``hooks.on_start``), warm up, canary, drain,
    unload (``hooks.on_drained``). The addresses are where this evaluator reaches Envoy; the
    command line (`extproc evaluate --listener/--envoy-admin`) overrides them."""

    listener: str | None = Field(default=None, description="Envoy's listener, for warm-up")
    envoy_admin: list[str] = Field(
        default_factory=list, description="every Envoy's admin URL: health and drain read them"
    )
    warmup: Warmup | None = None
    drain: Drain = Field(default_factory=Drain)


Strategy = Literal["canary", "ab", "shadow", "blue-green"]


class Phase(_Strict):
    """One link of a chain of strategies (``phases:``), e.g. a shadow comparison that must pass
    before a canary begins. A phase names its strategy and may bring its own rollout schedule
    and guardrails; what it leaves out is the experiment's. Variants, routing, mirroring
    (``shadow:``) and the data plane are the experiment's in every phase: the data plane never
    changes between phases, only what the evaluator judges and how it moves the weights."""

    name: str = Field(pattern=NAME_RE)
    strategy: Strategy
    rollout: Rollout | None = None
    guardrails: list[Guardrail] | None = None


AbMetric = Literal[
    "latency",
    "completion_tokens",
    "error_rate",
    "refusal_rate",
    "judge_win_rate",
    "rubric",
    "negative_feedback_rate",
    "cost",
]
AB_METRICS: tuple[AbMetric, ...] = get_args(AbMetric)
"""What an A/B decision compares (``extproc.evaluator.decision``), in report order."""


class AbTest(_Strict):
    """How an ``ab`` run ends in a decision: ship the candidate, keep stable, or inconclusive.

    ``primary`` is the one metric that says "better", tested at ``alpha``; the others in
    ``metrics`` are secondary: a significant harm on any of them (Holm-adjusted, at ``alpha``)
    keeps stable. ``min_samples: auto`` ends the run once each arm holds the sample the primary
    metric needs to detect ``mde`` with ``power`` (relative to stable's value, except
    ``judge_win_rate``: points above a 50% win rate); a number is that sample, counted in the
    primary metric's unit (requests, verdicts or scores). Method: docs/STATISTICS.md.
    """

    primary: AbMetric | None = Field(
        default=None,
        description="the deciding metric; left out: judge_win_rate with a judge, else latency",
    )
    metrics: list[AbMetric] = Field(
        default_factory=lambda: list(AB_METRICS), min_length=1, description="reported and tested"
    )
    latency: Literal["mean", "p50"] = "mean"
    alpha: float = Field(default=0.05, gt=0, lt=0.5, description="two-sided, per decision")
    min_samples: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        default=None, description="per arm, in the primary metric's unit; auto: from mde, power"
    )
    mde: float | None = Field(default=None, gt=0, description="the smallest effect worth finding")
    power: float = Field(default=0.8, gt=0, lt=1)

    def primary_metric(self, judged: bool) -> str:
        """The deciding metric: the configured one, else the judge's win rate when a judge
        runs (``judged``), else latency."""
        return self.primary or ("judge_win_rate" if judged else "latency")


class ExperimentSpec(_Strict):
    name: str = Field(pattern=NAME_RE)
    salt: str = Field(min_length=1, max_length=256)
    strategy: Strategy = "canary"
    dataplane: Literal["ext_proc", "native"] = Field(
        default="ext_proc",
        description=(
            "ext_proc: the sidecar decides each request and observes its body; native: Envoy "
            "routes by itself with weights from the sidecar, telemetry from its access log"
        ),
    )
    stable: str
    variants: dict[str, VariantSpec] = Field(min_length=2)
    sticky_keys: list[str] = Field(default=["x-conversation-id", "x-user-id"], min_length=1)
    forced_routing: ForcedRouting = Field(default_factory=ForcedRouting)
    envoy: EnvoySettings = Field(default_factory=EnvoySettings)
    rollout: Rollout = Field(default_factory=Rollout)
    inflight: Inflight = Field(default_factory=Inflight)
    telemetry: Telemetry = Field(default_factory=Telemetry)
    guardrails: list[Guardrail] = Field(default_factory=lambda: list(DEFAULT_GUARDRAILS))
    shadow: Shadow = Field(default_factory=Shadow)
    capture: Capture = Field(default_factory=Capture)
    quality: Quality = Field(default_factory=Quality)
    judge: Judge | None = None
    watchdog: Watchdog | None = None
    hooks: Hooks = Field(default_factory=Hooks)
    lifecycle: Lifecycle = Field(default_factory=Lifecycle)
    phases: list[Phase] = Field(
        default_factory=list,
        description="strategies run one after the other, each only once the one before passed",
    )
    ab: AbTest | None = Field(default=None, description="how an ab run decides (AbTest)")
    match: Selectors | None = Field(
        default=None,
        description="the requests this experiment takes on a fleet sidecar (default: all others)",
    )
    overrides: list[Override] = Field(
        default_factory=list,
        description="classes of requests pinned to a variant before the hash",
    )

    def phase(self, index: int) -> ExperimentSpec:
        """The experiment as phase ``index`` runs it: the phase's strategy, and its rollout and
        guardrails where it sets them. Without phases, the experiment itself."""
        if not self.phases:
            return self
        p = self.phases[index]
        return self.model_copy(
            update={
                "strategy": p.strategy,
                "rollout": p.rollout or self.rollout,
                "guardrails": self.guardrails if p.guardrails is None else p.guardrails,
            }
        )


@dataclass(frozen=True)
class Experiment:
    """A validated experiment, with the variant order fixed once for bucket lanes."""

    spec: ExperimentSpec
    source: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def stable(self) -> str:
        return self.spec.stable

    @property
    def variant_names(self) -> list[str]:
        return list(self.spec.variants)

    @property
    def candidates(self) -> list[str]:
        """Non-stable variants in file order: the order of their bucket lanes."""
        return [v for v in self.spec.variants if v != self.spec.stable]

    def file_weights(self) -> dict[str, float]:
        return {name: v.weight for name, v in self.spec.variants.items()}

    def to_json_dict(self) -> dict[str, Any]:
        return self.spec.model_dump(mode="json")


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


_STAGE_FORMS = ("float", "Stage")
"""Pydantic's names for the two forms of a ``rollout.stages`` entry, in an error's location."""


def _stage_error_kept(loc: tuple[int | str, ...], raw: Mapping[str, Any]) -> bool:
    """Whether an error of one form of a ``rollout.stages`` entry applies to what was written.

    Pydantic reports a bad entry against both forms (a share and an object); only the form the
    file used is the user's problem, and a plain value that is no share is reported once, by
    the semantic check. The form's name is dropped from the path by the caller.
    """
    rollout = raw.get("rollout")
    stages = rollout.get("stages") if isinstance(rollout, Mapping) else None
    index = loc[2]
    if not isinstance(stages, list) or not isinstance(index, int) or index >= len(stages):
        return True
    return loc[3] == "Stage" and isinstance(stages[index], Mapping)


def _structural_problems(err: ValidationError, raw: Mapping[str, Any] | None = None) -> list[str]:
    """Pydantic's errors as ``path: message``; ``raw``, the experiment document, tells which
    form of a ``rollout.stages`` entry the file used (other documents have no stages)."""
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        stage_form = len(loc) > 3 and loc[:2] == ("rollout", "stages") and loc[3] in _STAGE_FORMS
        if raw is not None and stage_form:
            if not _stage_error_kept(loc, raw):
                continue
            e["loc"] = loc[:3] + loc[4:]
        msg = e["msg"]
        if e["type"] in ("greater_than_equal", "less_than_equal") and e["loc"][-1] == "weight":
            msg = "must be 0..100"
        elif e["type"] == "string_pattern_mismatch":
            msg = f"{e['input']!r} is not a valid name (pattern {e['ctx']['pattern']})"
        out.append(f"{_loc(e['loc'])}: {msg}")
    return out


def _weight_problems(weights: Mapping[str, Any], where: str) -> list[str]:
    problems = []
    numeric = {k: w for k, w in weights.items() if isinstance(w, int | float)}
    for name, w in numeric.items():
        # a weight outside 0..100 (as large as 1e306, or infinite) is reported as such
        if 0 <= w <= 100 and abs(round(w / _WEIGHT_STEP) * _WEIGHT_STEP - w) > 1e-9:
            problems.append(f"{where}.{name}: weight {w} is finer than {_WEIGHT_STEP}%")
    if len(numeric) == len(weights) and abs(sum(numeric.values()) - 100) > 1e-6:
        problems.append(f"{where}: weights add up to {sum(numeric.values()):g}, must be 100")
    return problems


def lane_problems(stable: str, weights: Mapping[str, float], where: str) -> list[str]:
    """Each candidate ramps inside its own lane of buckets, so it can hold at most 100/k percent.

    Lanes are what make assignment monotone for every candidate at once: growing one candidate
    never moves another candidate's conversations (see ``extproc.contract.assignment``).
    """
    cands = [v for v in weights if v != stable]
    if not cands:
        return []
    lane = 100 / len(cands)
    return [
        f"{where}.{name}: {weights[name]:g}% exceeds this candidate's lane of {lane:g}% "
        f"({len(cands)} candidates share the non-stable buckets)"
        for name in cands
        if weights[name] > lane + 1e-9
    ]


def _semantic_problems(raw: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    variants = raw.get("variants")
    if not isinstance(variants, Mapping):
        return problems
    stable = raw.get("stable")
    if isinstance(stable, str) and stable not in variants:
        problems.append(f"stable: {stable!r} is not one of the variants {sorted(variants)}")
    weights = {
        n: v.get("weight") for n, v in variants.items() if isinstance(v, Mapping) and "weight" in v
    }
    if len(weights) == len(variants):
        problems += _weight_problems(weights, "variants")
        nums = {k: float(w) for k, w in weights.items() if isinstance(w, int | float)}
        if isinstance(stable, str) and stable in variants and len(nums) == len(weights):
            problems += lane_problems(stable, nums, "variants")
    clusters: dict[str, str] = {}
    for name, v in variants.items():
        if not isinstance(v, Mapping):
            continue
        if not re.match(NAME_RE, str(name)):
            problems.append(f"variants.{name}: not a valid variant name (pattern {NAME_RE})")
        c = v.get("cluster")
        if isinstance(c, str):
            if c in clusters:
                problems.append(f"variants.{name}.cluster: {c!r} is also used by {clusters[c]!r}")
            clusters[c] = str(name)
        addr = v.get("address")
        if isinstance(addr, str) and not re.match(r"^[A-Za-z0-9_.-]+:\d{1,5}$", addr):
            problems.append(f"variants.{name}.address: {addr!r} is not host:port")
    keys = raw.get("sticky_keys")
    if isinstance(keys, list):
        for i, k in enumerate(keys):
            if not isinstance(k, str) or not re.match(HEADER_RE, k):
                problems.append(f"sticky_keys.{i}: {k!r} is not a lower-case header name")
    rollout = raw.get("rollout")
    if isinstance(rollout, Mapping) and isinstance(rollout.get("stages"), list):
        problems += _stage_schedule_problems(rollout, raw.get("strategy", "canary"))
        stages = [s.get("share") if isinstance(s, Mapping) else s for s in rollout["stages"]]
        shares = [s for s in stages if isinstance(s, int | float) and not isinstance(s, bool)]
        for i, s in enumerate(stages):
            if isinstance(rollout["stages"][i], Mapping):
                if s in shares and not 0 <= s <= 100:
                    problems.append(f"rollout.stages.{i}.share: must be a percentage 0..100")
            elif s not in shares or not 0 <= s <= 100:
                problems.append(
                    f"rollout.stages.{i}: must be a percentage 0..100 or a stage "
                    "{share, min_seconds, min_samples, gate}"
                )
        if len(shares) == len(stages) and shares != sorted(shares):
            problems.append("rollout.stages: must increase (a ramp, e.g. [2, 5, 10, 25, 50, 100])")
        cands = [v for v in variants if v != raw.get("stable")]
        if cands and any(s > 100 / len(cands) + 1e-9 for s in shares):
            problems.append(
                f"rollout.stages: with {len(cands)} candidates each stage is at most "
                f"{100 / len(cands):g}% (the candidates' lanes)"
            )
    guards = raw.get("guardrails")
    if isinstance(guards, list):
        for i, g in enumerate(guards):
            if isinstance(g, Mapping):
                problems += _guardrail_problems(g, f"guardrails.{i}")
    shadow = raw.get("shadow")
    # A variant that is not a string is reported by the structural check; it may not be hashable.
    if isinstance(shadow, Mapping) and isinstance(shadow.get("variant"), str):
        if shadow["variant"] not in variants:
            problems.append(f"shadow.variant: {shadow['variant']!r} is not one of the variants")
        elif shadow["variant"] == raw.get("stable"):
            problems.append("shadow.variant: the stable variant cannot be its own shadow")
    if raw.get("strategy") in ("shadow", "blue-green"):
        # Both judge the new variant on mirrored copies of live requests before it serves any.
        mirror: Mapping[str, Any] = shadow if isinstance(shadow, Mapping) else {}
        if mirror.get("variant") is None:
            problems.append(f"shadow.variant: required by strategy {raw['strategy']}")
        if not mirror.get("share"):
            problems.append(f"shadow.share: must be > 0 for strategy {raw['strategy']}")
        green_name = mirror.get("variant")
        if raw.get("strategy") == "blue-green" and isinstance(green_name, str):
            green = variants.get(green_name)
            if isinstance(green, Mapping) and green.get("weight", 0) != 0:
                problems.append(
                    f"variants.{mirror['variant']}.weight: must be 0 under blue-green "
                    "(it serves nothing until the flip)"
                )
    for section, field_name in (("capture", "redact"), ("quality", "refusal_patterns")):
        block = raw.get(section)
        if isinstance(block, Mapping) and isinstance(block.get(field_name), list):
            for i, pattern in enumerate(block[field_name]):
                try:
                    re.compile(str(pattern))
                except re.error as err:
                    problems.append(f"{section}.{field_name}.{i}: not a valid regex ({err})")
    problems += _selection_problems(raw, variants)
    forced = raw.get("forced_routing")
    if isinstance(forced, Mapping) and isinstance(forced.get("allow"), list):
        for i, a in enumerate(forced["allow"]):
            if a not in variants:
                problems.append(f"forced_routing.allow.{i}: {a!r} is not one of the variants")
    return problems


def _selection_problems(raw: Mapping[str, Any], variants: Mapping[str, Any]) -> list[str]:
    """A ``match`` or an override that names nothing, an override to an unknown variant, and
    two overrides claiming the same trait (which one wins would depend on the file's order)."""
    problems: list[str] = []
    kinds = ("models", "routes", "headers")
    match = raw.get("match")
    if isinstance(match, Mapping) and not any(match.get(k) for k in kinds):
        problems.append(
            "match: names no model, route or header (leave it out to take every request)"
        )
    overrides = raw.get("overrides")
    if not isinstance(overrides, list):
        return problems
    parsed: dict[str, Selectors] = {}
    for i, o in enumerate(overrides):
        if not isinstance(o, Mapping):
            continue
        if not any(o.get(k) for k in kinds):
            problems.append(f"overrides.{i}: names no model, route or header to match")
        v = o.get("variant")
        if isinstance(v, str) and v not in variants:
            problems.append(f"overrides.{i}.variant: {v!r} is not one of the variants")
        try:
            parsed[f"overrides.{i}"] = Selectors.model_validate({k: o[k] for k in kinds if k in o})
        except ValidationError:
            continue  # reported by the structural check
    _, clashes = Selector.build(parsed)
    return problems + clashes


def _stage_schedule_problems(rollout: Mapping[str, Any], strategy: Any) -> list[str]:
    """Stage objects schedule the stages of a ramp; other strategies have one stage, scheduled
    by ``min_stage_seconds``, ``min_stage_samples`` and ``auto_advance``."""
    if strategy == "canary":
        return []
    return [
        f"rollout.stages.{i}: a stage with its own schedule needs strategy canary; "
        f"strategy {strategy} uses min_stage_seconds, min_stage_samples and auto_advance"
        for i, s in enumerate(rollout["stages"])
        if isinstance(s, Mapping)
    ]


def _guardrail_problems(g: Mapping[str, Any], where: str) -> list[str]:
    """What the metric allows: its directions, which margins each side needs, its ceiling."""
    metric = g.get("metric")
    if not isinstance(metric, str):
        return []  # reported by the structural check
    info = METRICS.get(metric)
    if info is None:
        return [f"{where}.metric: {metric!r} is not a guardrail metric (one of {sorted(METRICS)})"]
    problems: list[str] = []
    direction = g.get("direction") or info.harm
    if direction not in info.directions:
        allowed = ", ".join(info.directions)
        problems.append(f"{where}.direction: metric {metric} allows {allowed}")
        direction = info.harm
    wanted = {"increase": "max_increase", "decrease": "max_decrease"}
    needed = [wanted[s] for s in sides(direction)]
    if not any(g.get(f) is not None for f in needed):
        problems.append(f"{where}.{' or '.join(needed)}: required for metric {metric}")
    for field_name in set(wanted.values()) - set(needed):
        if g.get(field_name) is not None:
            problems.append(f"{where}.{field_name}: not used by metric {metric} ({direction})")
    dec = g.get("max_decrease")
    if metric == "judge_win_rate" and isinstance(dec, int | float) and dec >= 0.5:
        problems.append(f"{where}.max_decrease: points below a 50% win rate, must be < 0.5")
    problems += _ceiling_problems(g, where, info, direction)
    return problems


def _ceiling_problems(
    g: Mapping[str, Any], where: str, info: MetricInfo, direction: str
) -> list[str]:
    ceiling = g.get("max_absolute")
    if ceiling is None:
        return []
    if info.kind == "win_rate" or direction == "decrease":
        return [f"{where}.max_absolute: a ceiling; less {info.name} is the harm"]
    if info.kind == "rate" and isinstance(ceiling, int | float) and ceiling >= 1:
        return [f"{where}.max_absolute: a rate's ceiling is a fraction below 1, got {ceiling}"]
    return []


_HTTP_URL = r"^https?://[^\s/]+"


def _hook_problems(hooks: Any) -> list[str]:
    """A hook is called by the evaluator with a JSON POST: only http(s) URLs are callable."""
    if not isinstance(hooks, Mapping):
        return []
    return [
        f"hooks.{event}: {url!r} is not an http(s) URL"
        for event in HOOK_EVENTS
        if isinstance(url := hooks.get(event), str) and not re.match(_HTTP_URL, url)
    ]


def _ab_problems(raw: Mapping[str, Any]) -> list[str]:
    """What the A/B decision's settings need: the ab strategy, the primary among the metrics
    (each listed once), the primary's source (a judge, prices), an mde to size an automatic
    sample."""
    ab = raw.get("ab")
    if not isinstance(ab, Mapping):
        return []
    problems: list[str] = []
    if raw.get("strategy", "canary") != "ab":
        problems.append(f"ab: used by strategy ab only, not {raw.get('strategy', 'canary')}")
    metrics = ab.get("metrics")
    listed = metrics if isinstance(metrics, list) else list(AB_METRICS)
    problems += [
        f"ab.metrics.{i}: {m} is listed twice"
        for i, m in enumerate(listed)
        if isinstance(m, str) and m in listed[:i]
    ]
    primary = ab.get("primary")
    judged = raw.get("judge") is not None
    implied = primary if primary is not None else ("judge_win_rate" if judged else "latency")
    if isinstance(implied, str) and implied in AB_METRICS and implied not in listed:
        which = "" if primary is not None else " (the default primary metric)"
        problems.append(f"ab.primary: {implied}{which} is not in ab.metrics")
    # A secondary metric without its source is reported as "no data"; a primary one could
    # never decide anything.
    if primary in ("judge_win_rate", "rubric") and not judged:
        problems.append(f"ab.primary: {primary} needs a judge: section")
    variants = raw.get("variants")
    priced = isinstance(variants, Mapping) and all(
        isinstance(v, Mapping) and v.get("price") is not None for v in variants.values()
    )
    if primary == "cost" and not priced:
        problems.append("ab.primary: cost needs a price on every variant")
    mde = ab.get("mde")
    if ab.get("min_samples") == "auto" and mde is None:
        problems.append("ab.mde: required when ab.min_samples is auto")
    win_rate = primary == "judge_win_rate" or (primary is None and judged)
    if win_rate and isinstance(mde, int | float) and mde >= 0.5:
        problems.append(f"ab.mde: points above a 50% win rate, must be < 0.5, got {mde}")

    return problems


def _lifecycle_problems(raw: Mapping[str, Any]) -> list[str]:
    """Addresses must be callable, a warm-up must have something to do, and its requests are
    forced, so forcing must be on and allowed for every candidate."""
    life = raw.get("lifecycle")
    if not isinstance(life, Mapping):
        return []
    problems: list[str] = []
    urls = [("lifecycle.listener", life.get("listener"))]
    admins = life.get("envoy_admin")
    if isinstance(admins, list):
        urls += [(f"lifecycle.envoy_admin.{i}", a) for i, a in enumerate(admins)]
    problems += [
        f"{where}: {url!r} is not an http(s) URL"
        for where, url in urls
        if isinstance(url, str) and not re.match(_HTTP_URL, url)
    ]
    warm = life.get("warmup")
    if not isinstance(warm, Mapping):
        return problems
    requests = warm.get("requests", Warmup().requests)
    if requests == 0 and not warm.get("wait_healthy"):
        problems.append("lifecycle.warmup: nothing to do: set requests above 0 or wait_healthy")
    forced = raw.get("forced_routing")
    forced = forced if isinstance(forced, Mapping) else {}
    if isinstance(requests, int) and requests > 0:
        if forced.get("enabled") is False:
            problems.append(
                "lifecycle.warmup.requests: warm-up requests are forced: needs "
                "forced_routing.enabled"
            )
        allow, variants = forced.get("allow"), raw.get("variants")
        if isinstance(allow, list) and allow and isinstance(variants, Mapping):
            refused = [v for v in variants if v != raw.get("stable") and v not in allow]
            if refused:
                problems.append(
                    f"lifecycle.warmup.requests: forced_routing.allow refuses candidate(s) "
                    f"{refused}, which warm-up forces"
                )
    return problems


def _signal_source_problems(raw: Mapping[str, Any], variants: Mapping[str, Any]) -> list[str]:
    """The judge needs captured pairs; the watchdog needs to force each variant it probes."""
    problems: list[str] = []
    judge = raw.get("judge")
    if isinstance(judge, Mapping):
        endpoint = judge.get("endpoint")
        if isinstance(endpoint, str) and not re.match(r"^https?://[^/\s]+", endpoint):
            problems.append(f"judge.endpoint: {endpoint!r} is not an http(s) URL")
        shadow, capture = raw.get("shadow"), raw.get("capture")
        if not (isinstance(shadow, Mapping) and shadow.get("variant")) or not (
            isinstance(capture, Mapping) and capture.get("sample")
        ):
            problems.append("judge: needs pairs to judge: set shadow.variant and capture.sample")
    watchdog = raw.get("watchdog")
    if isinstance(watchdog, Mapping):
        probed = watchdog.get("variants")
        forced = raw.get("forced_routing")
        forced = forced if isinstance(forced, Mapping) else {}
        if forced.get("enabled") is False:
            problems.append("watchdog: needs forced_routing.enabled (probes force each variant)")
        allow = forced.get("allow") or []
        if not probed and allow and set(variants) - set(allow):
            problems.append(
                "watchdog.variants: empty means every variant, but forced_routing.allow "
                f"permits only {sorted(allow)}"
            )
        for i, v in enumerate(probed if isinstance(probed, list) else []):
            if v not in variants:
                problems.append(f"watchdog.variants.{i}: {v!r} is not one of the variants")
            elif allow and v not in allow:
                problems.append(f"watchdog.variants.{i}: {v!r} may not be forced (allow list)")
    return problems


def _native_problems(raw: Mapping[str, Any]) -> list[str]:
    """What only the sidecar's ext_proc path can do: read request bodies, hold a secret."""
    problems: list[str] = []
    capture = raw.get("capture")
    if isinstance(capture, Mapping) and capture.get("sample"):
        problems.append(
            "capture.sample: dataplane native never sees request bodies; "
            "use dataplane ext_proc to capture texts"
        )
    forced = raw.get("forced_routing")
    if isinstance(forced, Mapping) and forced.get("secret_env"):
        problems.append(
            "forced_routing.secret_env: dataplane native matches headers in Envoy's config, "
            "which would have to hold the secret; use dataplane ext_proc or an allow list"
        )
    return problems


def _phase_problems(raw: Mapping[str, Any], reported: list[str]) -> list[str]:
    """Each phase checked as the experiment it makes (:meth:`ExperimentSpec.phase`): a problem
    of the phase's own rollout or guardrails gets the phase's path, one that only its strategy
    brings out (a shadow phase without ``shadow.variant``) says which phase; problems of the
    experiment itself (``reported``) are not repeated."""
    phases = raw.get("phases")
    if not isinstance(phases, list) or not phases:
        return []
    problems: list[str] = []
    if "strategy" in raw:
        problems.append("strategy: leave it out with phases (each phase names its own)")
    seen: set[str] = set()
    for i, phase in enumerate(phases):
        if not isinstance(phase, Mapping):
            continue  # the structural check says what it should be
        where = f"phases.{i}"
        name, strategy = phase.get("name"), phase.get("strategy")
        if isinstance(name, str):
            if name in seen:
                problems.append(f"{where}.name: {name!r} names an earlier phase too")
            seen.add(name)
        if strategy == "blue-green" and i < len(phases) - 1:
            problems.append(
                f"{where}.strategy: blue-green flips every request and ends the rollout; "
                "only the last phase can be blue-green"
            )
        own = {k: phase[k] for k in ("rollout", "guardrails") if phase.get(k) is not None}
        as_run = {k: v for k, v in raw.items() if k != "phases"} | own
        as_run["strategy"] = strategy if isinstance(strategy, str) else "canary"
        for problem in _semantic_problems(as_run):
            if problem in reported:
                continue
            top = problem.split(":", 1)[0].split(".", 1)[0]
            problems.append(
                f"{where}.{problem}" if top in own else f"{where} ({as_run['strategy']}): {problem}"
            )
    return list(dict.fromkeys(problems))


def _first_phase_strategy(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """With phases and no ``strategy``, the experiment's strategy is its first phase's (what
    surfaces that know no phases show)."""
    phases = raw.get("phases")
    if "strategy" in raw or not isinstance(phases, list) or not phases:
        return raw
    first = phases[0]
    strategy = first.get("strategy") if isinstance(first, Mapping) else None
    return {**raw, "strategy": strategy} if isinstance(strategy, str) else raw


def _default_notice(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """Without an explicit ``inflight.notice_ms``, notice at 5 s or half the upstream timeout,
    whichever comes first: a short timeout alone must not make the file invalid."""
    inflight, envoy = raw.get("inflight"), raw.get("envoy")
    timeout = envoy.get("request_timeout_s") if isinstance(envoy, Mapping) else None
    if inflight is not None and not isinstance(inflight, Mapping):
        return raw
    if (inflight or {}).get("notice_ms") is not None:
        return raw
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        return raw
    default = Inflight().notice_ms
    notice = max(100, min(default, int(timeout * 500)))
    if notice == default:
        return raw
    return {**raw, "inflight": {**(inflight or {}), "notice_ms": notice}}


def _inflight_problems(raw: Mapping[str, Any]) -> list[str]:
    """A notice sent after the upstream timeout would never come: hangs would be seen late."""
    inflight, envoy = raw.get("inflight"), raw.get("envoy")
    notice = inflight.get("notice_ms") if isinstance(inflight, Mapping) else None
    timeout = envoy.get("request_timeout_s") if isinstance(envoy, Mapping) else None
    if notice is None:  # the default adapts to the timeout (_default_notice)
        return []
    timeout = EnvoySettings().request_timeout_s if timeout is None else timeout
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (notice, timeout))
    if numbers and notice >= timeout * 1000:
        return [
            f"inflight.notice_ms: {notice} is not below envoy.request_timeout_s ({timeout:g} s): "
            "requests would time out before their notice"
        ]
    return []


def parse_experiment(raw: Any, source: str = "<experiment>") -> Experiment:
    """Validate a decoded experiment document; raise ConfigError listing every problem."""
    if not isinstance(raw, Mapping):
        raise ConfigError(source, ["(top level): must be a mapping of experiment settings"])
    problems: list[str] = []
    spec: ExperimentSpec | None = None
    if raw.get("judge") is not None and "guardrails" not in raw:
        # A judge is configured to be listened to: the field's default quality guardrail.
        raw = {
            **raw,
            "guardrails": [g.model_dump() for g in DEFAULT_GUARDRAILS] + [JUDGE_GUARDRAIL],
        }
    problems += _inflight_problems(raw)  # on what the file says, before the notice's default
    raw = _default_notice(raw)
    semantic = _semantic_problems(raw)
    phased = _phase_problems(raw, semantic)  # on what the file says, before the strategy's
    raw = _first_phase_strategy(raw)
    try:
        spec = ExperimentSpec.model_validate(raw)
    except ValidationError as err:
        problems += _structural_problems(err, raw)
    problems += semantic + phased
    if isinstance(raw.get("variants"), Mapping):
        problems += _signal_source_problems(raw, raw["variants"])
    problems += _hook_problems(raw.get("hooks"))
    problems += _ab_problems(raw)
    problems += _lifecycle_problems(raw)
    if raw.get("dataplane") == "native":
        problems += _native_problems(raw)
    if problems or spec is None:
        raise ConfigError(source, problems)
    return Experiment(spec=spec, source=source)


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment file (YAML or JSON)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(str(p), [f"cannot read: {err.strerror}"]) from err
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(
            str(p), [f"{where}not valid YAML ({getattr(err, 'problem', err)})"]
        ) from err
    return parse_experiment(raw, str(p))


def validate_weights(experiment: Experiment, weights: Mapping[str, Any]) -> dict[str, float]:
    """Check a routing change against the experiment; return the complete weight map."""
    problems = []
    unknown = sorted(set(weights) - set(experiment.variant_names))
    if unknown:
        problems.append(f"weights: unknown variant(s) {unknown}; valid: {experiment.variant_names}")
    full: dict[str, float] = {}
    for name in experiment.variant_names:
        w = weights.get(name, 0)
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w <= 100:
            problems.append(f"weights.{name}: must be 0..100")
        else:
            full[name] = float(w)
    if not problems:
        problems += _weight_problems(full, "weights")
        problems += lane_problems(experiment.stable, full, "weights")
    if problems:
        raise ConfigError("routing change", problems)
    return full
