"""The watchdog: a fixed set of reference prompts sent to every variant at an interval.

Live traffic changes all the time; a reference set does not, so a variant that starts failing
prompts it used to pass (a lost instruction, broken JSON, a new refusal) shows as a drop in its
pass rate whatever the users happen to ask. Each probe goes through Envoy like any request, forced
to one variant with the forced-routing header, so it exercises the real path; forced requests
are left out of the evaluator's stage comparison, so probes do not bias it.

The prompt set is a YAML file (``watchdog.file`` in the experiment, relative to it)::

    prompts:
      - id: capital
        prompt: "What is the capital of France? One word."
        checks: {contains: [paris], max_chars: 100}
      - id: json-order
        prompt: "Return the order as JSON with fields id and total."
        json_mode: true                  # sends response_format json_object
        checks: {json_valid: true, regex: '"total"'}

Checks: ``contains`` / ``not_contains`` (case-insensitive substrings), ``json_valid`` (the answer
parses as JSON), ``max_chars``, ``regex`` (searched). ``status`` (HTTP 200 with an answer) is always
checked; a probe passes when every check does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from redis.exceptions import RedisError

from extproc.config import ConfigError, Experiment, structural_problems
from extproc.contract import signals
from extproc.supervise import raise_if_cancelled

__all__ = [
    "Checks",
    "Probe",
    "ProbeSet",
    "WatchdogLoop",
    "load_probes",
    "probe_file",
    "request_body",
    "score",
]

log = logging.getLogger(__name__)

_CONCURRENT_PROBES = 4


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class Checks(_Strict):
    contains: list[str] = Field(default_factory=list)
    not_contains: list[str] = Field(default_factory=list)
    json_valid: bool = False
    max_chars: int | None = Field(default=None, ge=1)
    regex: str | None = None

    _one_or_many = field_validator("contains", "not_contains", mode="before")(_as_list)

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"not a valid regex ({err})") from None
        return value


class Probe(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    prompt: str = Field(min_length=1)
    system: str | None = None
    json_mode: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    checks: Checks = Field(default_factory=Checks)


class ProbeSet(_Strict):
    prompts: list[Probe] = Field(min_length=1)


def load_probes(path: Path) -> ProbeSet:
    """Read and validate a prompt set; ConfigError lists every problem with its path."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(str(path), [f"cannot read: {err.strerror}"]) from err
    except yaml.YAMLError as err:
        raise ConfigError(str(path), [f"not valid YAML ({err})"]) from err
    try:
        probes = ProbeSet.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(str(path), structural_problems(err)) from err
    seen: dict[str, int] = {}
    problems = []
    for i, p in enumerate(probes.prompts):
        if p.id in seen:
            problems.append(f"prompts.{i}.id: {p.id!r} is also prompt {seen[p.id]}")
        seen.setdefault(p.id, i)
    if problems:
        raise ConfigError(str(path), problems)
    return probes


def probe_file(experiment: Experiment) -> Path | None:
    """The experiment's prompt set, resolved against the experiment file's folder."""
    if experiment.spec.watchdog is None:
        return None
    path = Path(experiment.spec.watchdog.file)
    return path if path.is_absolute() else Path(experiment.source).parent / path


def request_body(probe: Probe, model: str) -> dict[str, Any]:
    """The chat request a probe sends (the warm-up sends the same, without checks)."""
    messages = [{"role": "user", "content": probe.prompt}]
    if probe.system is not None:
        messages.insert(0, {"role": "system", "content": probe.system})
    body: dict[str, Any] = {"model": model, "messages": messages}
    if probe.json_mode:
        body["response_format"] = {"type": "json_object"}
    if probe.max_tokens is not None:
        body["max_tokens"] = probe.max_tokens
    return body


def score(checks: Checks, status: int, answer: str | None) -> dict[str, bool]:
    """Every check by name; an answer that did not arrive fails all of them."""
    text = answer if status == 200 and answer is not None else None
    folded = (text or "").casefold()
    out = {"status": text is not None}
    if checks.contains:
        out["contains"] = text is not None and all(s.casefold() in folded for s in checks.contains)
    if checks.not_contains:
        out["not_contains"] = text is not None and not any(
            s.casefold() in folded for s in checks.not_contains
        )
    if checks.json_valid:
        try:
            json.loads(text or "")
            out["json_valid"] = text is not None
        except ValueError:
            out["json_valid"] = False
    if checks.max_chars is not None:
        out["max_chars"] = text is not None and len(text) <= checks.max_chars
    if checks.regex is not None:
        out["regex"] = text is not None and re.search(checks.regex, text) is not None
    return out


class WatchdogLoop:
    """Sends every probe to every watched variant each ``interval_s`` (start to start)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        experiment: Experiment,
        probes: ProbeSet,
        listener: str,
        session: aiohttp.ClientSession,
        forcing_secret: str | None = None,
    ) -> None:
        spec = experiment.spec
        if spec.watchdog is None:
            raise ValueError(f"experiment {experiment.name!r} has no watchdog section")
        self.redis = redis
        self.experiment = experiment
        self.settings = spec.watchdog
        self.probes = probes
        self.url = listener.rstrip("/") + "/v1/chat/completions"
        forced = spec.forced_routing
        self.header = forced.header
        self.secret = {forced.secret_header: forcing_secret} if forcing_secret else {}
        self.variants = spec.watchdog.variants or experiment.variant_names
        self.session = session
        self.rounds = 0

    async def probe(self, variant: str, probe: Probe) -> signals.WatchdogSignal:
        body = request_body(probe, self.experiment.spec.variants[variant].model or variant)
        started_ms = int(time.time() * 1000)
        t0 = time.monotonic()
        status, answer = 0, None
        try:
            async with self.session.post(
                self.url,
                json=body,
                headers={**self.secret, self.header: variant},
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
            ) as resp:
                status = resp.status
                doc = await resp.json(content_type=None) if status == 200 else None
            content = doc["choices"][0]["message"]["content"] if doc else None
            answer = content if isinstance(content, str) else None
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError, TypeError):
            log.info("watchdog probe %s on %s got no answer", probe.id, variant, exc_info=True)
        checks = score(probe.checks, status, answer)
        return signals.WatchdogSignal(
            time_ms=started_ms,
            variant=variant,
            prompt_id=probe.id,
            passed=all(checks.values()),
            checks=checks,
            latency_ms=round((time.monotonic() - t0) * 1000, 2),
        )

    async def round(self) -> list[signals.WatchdogSignal]:
        """Every probe on every watched variant once; each signal appended as it completes."""
        limit = asyncio.Semaphore(_CONCURRENT_PROBES)

        async def one(variant: str, probe: Probe) -> signals.WatchdogSignal:
            async with limit:
                sig = await self.probe(variant, probe)
            try:
                await signals.append(self.redis, self.experiment.name, sig)
            except (OSError, RedisError):
                log.warning("watchdog signal of %s on %s lost", probe.id, variant, exc_info=True)
            return sig

        got = await asyncio.gather(*(one(v, p) for v in self.variants for p in self.probes.prompts))
        self.rounds += 1
        return list(got)

    async def run(self) -> None:
        """Until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            raise_if_cancelled()
            start = loop.time()
            await self.round()
            await asyncio.sleep(max(0.0, start + self.settings.interval_s - loop.time()))
