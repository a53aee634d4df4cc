"""The experiment file: typed, validated whole when loaded, compiled once.

A bad experiment file must never reach a running sidecar half-understood, so loading reports every
problem at once, each with its path in the file (``variants.canary.weight: must be 0..100``), and
the sidecar keeps its last good configuration when a reload fails.

Structure is checked by pydantic; rules that span fields (weights adding up to 100, the stable
variant existing, lanes for several candidates) are checked separately on the raw data so that they
are reported together with the structural errors instead of after them are fixed.

Modules, by what they do (everything the rest of the package uses is importable from here):

* :mod:`~extproc.config.spec`: the schema, :class:`ExperimentSpec` and its sections, and
  :class:`Experiment`, a validated file.
* :mod:`~extproc.config.structural`: pydantic's errors as ``path: message`` lines.
* :mod:`~extproc.config.semantic`: the rules that span fields, checked on the raw document.
* this module: loading (:func:`load_experiment`, :func:`parse_experiment`), which fills in the
  defaults that depend on other fields and collects every problem into one :class:`ConfigError`,
  and :func:`validate_weights` for routing changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from extproc.config.semantic import (
    ab_problems,
    hook_problems,
    inflight_problems,
    lane_problems,
    lifecycle_problems,
    native_problems,
    phase_problems,
    semantic_problems,
    signal_source_problems,
    weight_problems,
)
from extproc.config.spec import (
    AB_METRICS,
    DEFAULT_GUARDRAILS,
    DEFAULT_REFUSALS,
    HEADER_RE,
    HOOK_EVENTS,
    JUDGE_GUARDRAIL,
    NAME_RE,
    AbMetric,
    AbTest,
    Action,
    Capture,
    Drain,
    EnvoySettings,
    Experiment,
    ExperimentSpec,
    ForcedRouting,
    Gate,
    Guardrail,
    Hooks,
    Inflight,
    Judge,
    Lifecycle,
    Phase,
    Price,
    Quality,
    Rollout,
    Shadow,
    Stage,
    StageSchedule,
    Strategy,
    Telemetry,
    VariantSpec,
    Warmup,
    Watchdog,
)
from extproc.config.structural import structural_problems

__all__ = [
    "AB_METRICS",
    "DEFAULT_GUARDRAILS",
    "DEFAULT_REFUSALS",
    "EXAMPLE_EXPERIMENT",
    "HEADER_RE",
    "HOOK_EVENTS",
    "JUDGE_GUARDRAIL",
    "NAME_RE",
    "AbMetric",
    "AbTest",
    "Action",
    "Capture",
    "ConfigError",
    "Drain",
    "EnvoySettings",
    "Experiment",
    "ExperimentSpec",
    "ForcedRouting",
    "Gate",
    "Guardrail",
    "Hooks",
    "Inflight",
    "Judge",
    "Lifecycle",
    "Phase",
    "Price",
    "Quality",
    "Rollout",
    "Shadow",
    "Stage",
    "StageSchedule",
    "Strategy",
    "Telemetry",
    "VariantSpec",
    "Warmup",
    "Watchdog",
    "lane_problems",
    "load_experiment",
    "parse_experiment",
    "structural_problems",
    "validate_weights",
]

EXAMPLE_EXPERIMENT = Path(__file__).parent.parent / "data" / "experiment.yaml"
"""The commented example experiment that the local stack, `check` and `envoy-config` default to."""


class ConfigError(Exception):
    """An experiment file (or a routing change) that cannot be used; lists every problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


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
    problems += inflight_problems(raw)  # on what the file says, before the notice's default
    raw = _default_notice(raw)
    semantic = semantic_problems(raw)
    phased = phase_problems(raw, semantic)  # on what the file says, before the strategy's
    raw = _first_phase_strategy(raw)
    try:
        spec = ExperimentSpec.model_validate(raw)
    except ValidationError as err:
        problems += structural_problems(err, raw)
    problems += semantic + phased
    if isinstance(raw.get("variants"), Mapping):
        problems += signal_source_problems(raw, raw["variants"])
    problems += hook_problems(raw.get("hooks"))
    problems += ab_problems(raw)
    problems += lifecycle_problems(raw)
    if raw.get("dataplane") == "native":
        problems += native_problems(raw)
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
        problems += weight_problems(full, "weights")
        problems += lane_problems(experiment.stable, full, "weights")
    if problems:
        raise ConfigError("routing change", problems)
    return full
