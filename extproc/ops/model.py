"""The status read model: what `extproc status --json`, `top`, the text status and the dashboard's
figures are made of, as pydantic models.

Why models rather than dicts: the JSON is a contract with scripts and alerting, and a renamed or
retyped field used to change it silently. Validation is strict about names (an unknown field is an
error, so the read side cannot drift from this file) and `extproc status --schema` prints the
JSON schema. Nested documents that belong to the evaluator (an audit record's snapshot and checks,
the latest evaluation) stay JSON objects here; docs/EVALUATOR.md describes them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

_STRICT_NAMES = ConfigDict(extra="forbid")


class _Model(BaseModel):
    model_config = _STRICT_NAMES


class _Written(BaseModel):
    """A record another process wrote to Redis, possibly another release of it: fields it lacks
    take their defaults and fields this release does not know are left out, so a rolling upgrade
    never breaks `status`."""

    model_config = ConfigDict(extra="ignore")


class Median(_Model):
    """Milliseconds at the median; None without samples."""

    p50: float | None


class Percentiles(Median):
    """Milliseconds at each percentile; None without samples."""

    p95: float | None
    p99: float | None


class VariantFigures(_Model):
    """One variant's figures over the window, classified as the guardrails classify requests.
    Rates are fractions (None: nothing to divide by)."""

    window_requests: int
    errors: int
    error_rate: float | None
    client_errors: int
    client_error_rate: float | None
    timeout_rate: float | None
    latency_ms: Percentiles
    ttft_ms: Median
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: float | None
    output_tokens_per_s: float | None
    cost_per_request: float | None
    refusal_rate: float | None
    answer_chars_mean: float | None
    tool_call_rate: float | None
    empty_answer_rate: float | None
    json_invalid_rate: float | None
    open_requests: int = Field(
        description="requests noticed open (in-flight notices) and not yet ended, now"
    )
    forced_requests: int | None = Field(
        default=None, description="assigned traffic only: the same variant's forced requests"
    )


class AssignedVariant(VariantFigures):
    requests: int = Field(description="every assigned request since the experiment began")
    weight: float | None = Field(description="the live routing weight, percent")


class Routing(_Model):
    version: int
    weights: dict[str, float]
    reason: str
    actor: str
    updated_at: float


class ExperimentStatus(_Model):
    """One experiment's figures: assigned traffic per variant, forced and shadow apart."""

    experiment: str
    stable: str | None
    strategy: str | None
    routing: Routing | None
    window_s: int = Field(
        description="the figures cover the requests that started in these last seconds"
    )
    window_events: int = Field(description="requests in the window, of every kind")
    window_refused: int = Field(description="refused requests (400/403) in the window")
    variants: dict[str, AssignedVariant]
    forced: dict[str, VariantFigures]
    shadow: dict[str, VariantFigures]


class Rollout(_Model):
    status: str
    stage: int = Field(description="0-based")
    stage_started: float
    strategy: str
    commands_seen: str
    last_action: str
    last_reasons: list[str]
    updated: float
    evidence: dict[str, float]
    attempt: int = Field(default=1, description="1, then one more per `experiment restart`")
    attempt_started: float = Field(default=0.0, description="0 for the first attempt")
    warmup: dict[str, Any] = Field(
        default_factory=dict,
        description="the warm-up's report: ok, seconds, sent, answered, healthy_after, error",
    )
    drain: dict[str, Any] = Field(
        default_factory=dict,
        description="the last rollback's or completion's drain: status (draining, drained, "
        "timeout, unknown), variants, clusters, seconds, first, active",
    )
    phase: int = Field(default=0, description="0-based index into the experiment's phases")


class AuditRecord(_Written):
    id: str
    time: float
    action: str
    actor: str = ""
    reasons: list[str] = []
    attempt: int = 1
    archived: dict[str, Any] | None = Field(
        default=None, description="a restart's record: the rollout state of the attempt it ended"
    )
    stage: int = 0
    status: str = ""
    weights: dict[str, float] | None = None
    snapshot: dict[str, dict[str, Any]] = {}
    checks: list[dict[str, Any]] = []


class Sidecar(_Written):
    """A sidecar replica's heartbeat."""

    instance: str
    experiment: str = ""
    routing_version: int = 0
    versions: str = ""
    """A fleet sidecar's (``experiment`` ``*``) routing version per experiment, as JSON."""
    unmatched: int = 0
    """Requests a fleet sidecar passed through because no experiment took them."""
    routing_error: str = ""
    tasks_down: str = ""
    submitted: int = 0
    written: int = 0
    dropped: int = 0
    captures_dropped: int = 0
    buffered: int = 0
    pid: int = 0
    started: float = 0.0


class Evaluator(_Written):
    """An evaluator's heartbeat; ``active`` holds the experiment's lease."""

    instance: str
    experiment: str = ""
    active: bool = False
    ticks: int = 0
    time: float = 0.0
    pid: int = 0


class Telemetry(_Model):
    dropped: int = Field(description="events the sidecars dropped (Redis away, buffer full)")


class StackPart(_Model):
    pid: int
    running: bool
    log: str


class StackReport(_Model):
    """The local stack's processes (`extproc up`): which run, which are down."""

    state_dir: str
    components: dict[str, StackPart]
    down: list[str]


class StatusDoc(ExperimentStatus):
    """`extproc status --json`: one experiment, its rollout and the fleet around it."""

    sidecars: list[Sidecar]
    telemetry: Telemetry
    experiments: list[str] = Field(description="every experiment in Redis")
    rollout: Rollout | None
    audit: list[AuditRecord] = Field(description="the newest decisions, oldest first")
    evaluation: dict[str, Any] | None = Field(description="the evaluator's latest look")
    ladder: dict[str, Any] | None = Field(
        default=None,
        description="the stages with their schedules and the current one's progress "
        "(extproc.ops.figures.ladder); None without stages or rollout state",
    )
    evaluators: list[Evaluator]
    endpoints: dict[str, Any] = Field(
        default_factory=dict, description="the local stack's addresses"
    )
    dashboard_url: str | None = None
    feedback_token: str | None = None
    stack: StackReport | None = None
