"""Rules that span fields of the experiment file, checked on the raw document.

Weights adding up to 100, the stable variant existing, lanes for several candidates, a judge
with pairs to judge: none is one field's business, so pydantic cannot check them, and checked
on the validated model they could only be reported once every structural error is fixed. Checked
on the decoded document instead, they are reported together with the structural errors, every
problem at once, each with its path in the file. Each function returns its problems; none raises.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from extproc.config.spec import AB_METRICS, HEADER_RE, HOOK_EVENTS, NAME_RE, EnvoySettings, Warmup
from extproc.contract.assignment import BUCKETS
from extproc.contract.guardrail_metrics import METRICS, MetricInfo, sides
from extproc.contract.selection import Selector, Selectors

_WEIGHT_STEP = 100 / BUCKETS


def weight_problems(weights: Mapping[str, Any], where: str) -> list[str]:
    """Weights must fall on the buckets' grid and add up to 100: assignment hashes into
    ``BUCKETS`` buckets, so a finer weight could not be served as written. Checked on the file's
    variants and on every routing change alike."""
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


def semantic_problems(raw: Mapping[str, Any]) -> list[str]:
    """Rules across variants, rollout, guardrails, mirroring, patterns and selection: what a
    phase may change (strategy, rollout, guardrails) is checked here, so :func:`phase_problems`
    runs this again on each phase as it runs."""
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
        problems += weight_problems(weights, "variants")
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
            # Not a string: the structural check reports it (it may not even be hashable).
            if isinstance(a, str) and a not in variants:
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


def hook_problems(hooks: Any) -> list[str]:
    """A hook is called by the evaluator with a JSON POST: only http(s) URLs are callable."""
    if not isinstance(hooks, Mapping):
        return []
    return [
        f"hooks.{event}: {url!r} is not an http(s) URL"
        for event in HOOK_EVENTS
        if isinstance(url := hooks.get(event), str) and not re.match(_HTTP_URL, url)
    ]


def ab_problems(raw: Mapping[str, Any]) -> list[str]:
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


def lifecycle_problems(raw: Mapping[str, Any]) -> list[str]:
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


def signal_source_problems(raw: Mapping[str, Any], variants: Mapping[str, Any]) -> list[str]:
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
        listed = forced.get("allow")
        # Entries that are not strings are the structural check's to report.
        allow = [a for a in listed if isinstance(a, str)] if isinstance(listed, list) else []
        if not probed and allow and set(variants) - set(allow):
            problems.append(
                "watchdog.variants: empty means every variant, but forced_routing.allow "
                f"permits only {sorted(allow)}"
            )
        for i, v in enumerate(probed if isinstance(probed, list) else []):
            if not isinstance(v, str):
                continue
            if v not in variants:
                problems.append(f"watchdog.variants.{i}: {v!r} is not one of the variants")
            elif allow and v not in allow:
                problems.append(f"watchdog.variants.{i}: {v!r} may not be forced (allow list)")
    return problems


def native_problems(raw: Mapping[str, Any]) -> list[str]:
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


def phase_problems(raw: Mapping[str, Any], reported: list[str]) -> list[str]:
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
        for problem in semantic_problems(as_run):
            if problem in reported:
                continue
            top = problem.split(":", 1)[0].split(".", 1)[0]
            problems.append(
                f"{where}.{problem}" if top in own else f"{where} ({as_run['strategy']}): {problem}"
            )
    return list(dict.fromkeys(problems))


def inflight_problems(raw: Mapping[str, Any]) -> list[str]:
    """A notice sent after the upstream timeout would never come: hangs would be seen late."""
    inflight, envoy = raw.get("inflight"), raw.get("envoy")
    notice = inflight.get("notice_ms") if isinstance(inflight, Mapping) else None
    timeout = envoy.get("request_timeout_s") if isinstance(envoy, Mapping) else None
    if notice is None:  # the default adapts to the timeout (parse_experiment's _default_notice)
        return []
    timeout = EnvoySettings().request_timeout_s if timeout is None else timeout
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (notice, timeout))
    if numbers and notice >= timeout * 1000:
        return [
            f"inflight.notice_ms: {notice} is not below envoy.request_timeout_s ({timeout:g} s): "
            "requests would time out before their notice"
        ]
    return []
