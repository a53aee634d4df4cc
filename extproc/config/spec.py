"""The experiment file's schema: every section a typed, frozen model with its defaults.

One place says what a file may hold and what each field defaults to, so the data plane, the
evaluator and the operator tools read the same settings. Pydantic checks each field on its own;
rules that span fields are :mod:`extproc.config.semantic`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from extproc.contract.guardrail_metrics import METRICS, Direction, MetricInfo, sides
from extproc.contract.selection import Override, Selectors

NAME_RE = r"^[a-z0-9][a-z0-9_-]{0,31}$"
HEADER_RE = r"^[a-z0-9!#$%&'*+.^_`|~-]+$"


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
