"""The warm-up before stage 1 (``lifecycle.warmup``): make a cold candidate warm before users
reach it, so that it is not rolled back for its first answers.

A model server that just loaded its weights answers its first requests slowly (kernels compile,
caches fill, autoscalers add replicas); judged on them, a healthy candidate looks like a latency
or timeout regression and is rolled back. So before the first stage gets any user traffic the
evaluator (optionally) waits until every Envoy reports the candidate's hosts healthy, then sends
each candidate forced requests through Envoy, like any client, until ``requests`` of them were
answered with a 2xx. The requests are forced (``forced_routing``), and forced traffic never
enters the comparison of variants (the stage window counts it apart); they also carry
``x-llm-warmup`` for the model server's own logs. Everything here takes its clock and sleep
injected, so the timing is tested without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from extproc.config import ConfigError, Experiment
from extproc.contract import headers
from extproc.evaluator import envoy_admin
from extproc.quality.watchdog import Probe, load_probes, request_body

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

RETRY_S = 0.25
"""Pause after a request that was not answered (Envoy not up yet, no healthy host): the warm-up
keeps trying until its timeout, without spinning."""
HEALTH_POLL_S = 0.5

DEFAULT_PROMPTS: tuple[Probe, ...] = (
    Probe(id="hello", prompt="Say hello in one short sentence."),
    Probe(id="explain", prompt="Explain in three sentences why the sky is blue."),
    Probe(id="code", prompt="Write a Python function that reverses a string, with a docstring."),
    Probe(id="list", prompt="List five uses of a hash map, one line each."),
    Probe(
        id="json",
        prompt='Describe a fictional person as JSON with "name" and "age".',
        json_mode=True,
    ),
    Probe(id="translate", prompt="Translate 'good morning, how are you?' into French and German."),
)
"""Short, varied prompts (prose, code, a list, JSON): the shapes of request a chat model's first
users send, without anyone's data."""


def prompt_file(experiment: Experiment) -> Path | None:
    """The warm-up's prompt set, resolved against the experiment file's folder (None: the
    built-in set, or no warm-up)."""
    warm = experiment.spec.lifecycle.warmup
    if warm is None or warm.prompts is None:
        return None
    path = Path(warm.prompts)
    return path if path.is_absolute() else Path(experiment.source).parent / path


@dataclass(frozen=True)
class Reach:
    """What the evaluator's lifecycle needs from outside the experiment: where Envoy is (the
    command line's addresses, else the file's), the warm-up's prompts, the forcing secret."""

    listener: str | None = None
    admins: tuple[str, ...] = ()
    prompts: tuple[Probe, ...] = DEFAULT_PROMPTS
    forcing_secret: str | None = None


def prepare(
    experiment: Experiment, listener: str | None = None, admins: Sequence[str] = ()
) -> Reach:
    """Check and load, before the rollout starts, what a warm-up will need; ConfigError lists
    every problem (a warm-up that could not run would otherwise roll a healthy candidate back)."""
    life = experiment.spec.lifecycle
    reach = Reach(listener or life.listener, tuple(admins or life.envoy_admin))
    warm = life.warmup
    if warm is None:
        return reach
    problems = []
    if warm.requests and not reach.listener:
        problems.append(
            "lifecycle.listener: warm-up requests need Envoy's listener (or --listener)"
        )
    if warm.wait_healthy and not reach.admins:
        problems.append(
            "lifecycle.envoy_admin: wait_healthy needs Envoy's admin address (or --envoy-admin)"
        )
    secret_env = experiment.spec.forced_routing.secret_env
    secret = os.environ.get(secret_env) if secret_env else None
    if warm.requests and secret_env and not secret:
        problems.append(f"forced_routing.secret_env: ${secret_env} is not set (warm-up forces)")
    prompts = DEFAULT_PROMPTS
    path = prompt_file(experiment)
    if path is not None:
        try:
            prompts = tuple(load_probes(path).prompts)
        except ConfigError as err:
            problems += [f"lifecycle.warmup.prompts ({path}): {p}" for p in err.problems]
    if problems:
        raise ConfigError(experiment.source, problems)
    return replace(reach, prompts=prompts, forcing_secret=secret)


@dataclass
class WarmupReport:
    """How a warm-up went: per candidate the requests ``sent`` and ``answered`` (2xx), the
    seconds until every Envoy reported the candidates healthy (None: not waited), and on failure
    what was missing when the time was up."""

    ok: bool = False
    seconds: float = 0.0
    sent: dict[str, int] = field(default_factory=dict)
    answered: dict[str, int] = field(default_factory=dict)
    healthy_after: float | None = None
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "sent": self.sent,
            "answered": self.answered,
            "healthy_after": None if self.healthy_after is None else round(self.healthy_after, 3),
            "error": self.error,
        }

    def reason(self) -> str:
        """The audit log's line: ``warm-up finished: 20 requests to canary answered (23 sent)
        in 4.2 s`` or ``warm-up failed after 60.0 s: ...``."""
        counts = ", ".join(
            f"{self.answered.get(v, 0)} requests to {v} answered ({n} sent)"
            for v, n in self.sent.items()
        )
        healthy = "" if self.healthy_after is None else f"healthy after {self.healthy_after:.1f} s"
        done = "; ".join(x for x in (healthy, counts) if x)
        if self.ok:
            return f"warm-up finished in {self.seconds:.1f} s: {done}"
        return f"warm-up failed after {self.seconds:.1f} s: {self.error}" + (
            f" ({done})" if done else ""
        )


class WarmupRunner:
    """One warm-up of ``candidates``; :meth:`run` returns its report and never raises for what
    Envoy or the model servers do."""

    def __init__(
        self,
        experiment: Experiment,
        candidates: Sequence[str],
        reach: Reach,
        session: aiohttp.ClientSession,
        *,
        attempt: int = 1,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        warm = experiment.spec.lifecycle.warmup
        assert warm is not None, "only an experiment with lifecycle.warmup warms up"
        self.settings = warm
        self.spec = experiment.spec
        self.candidates = list(candidates)
        self.url = (reach.listener or "").rstrip("/") + "/v1/chat/completions"
        self.admins = list(reach.admins)
        self.prompts = list(reach.prompts)
        self.session = session
        forced = self.spec.forced_routing
        self.headers = {headers.WARMUP: str(attempt)}
        if reach.forcing_secret:
            self.headers[forced.secret_header] = reach.forcing_secret
        self.forced_header = forced.header
        self.clock, self.sleep = clock, sleep
        self.report = WarmupReport(
            sent=dict.fromkeys(self.candidates, 0), answered=dict.fromkeys(self.candidates, 0)
        )
        self._started = 0.0

    def _left(self) -> float:
        return self.settings.timeout_s - (self.clock() - self._started)

    async def run(self) -> WarmupReport:
        self._started = self.clock()
        r = self.report
        if self.settings.wait_healthy:
            if not await self._wait_healthy():
                return self._end("the candidates' hosts were not healthy on every Envoy")
            r.healthy_after = self.clock() - self._started
        if self.settings.requests:
            claimed = dict.fromkeys(self.candidates, 0)
            workers = [
                self._work(v, claimed)
                for v in self.candidates
                for _ in range(self.settings.concurrency)
            ]
            await asyncio.gather(*workers)
            short = [v for v in self.candidates if r.answered[v] < self.settings.requests]
            if short:
                return self._end(f"fewer than {self.settings.requests} answers from {short}")
        r.ok = True
        return self._end("")

    def _end(self, error: str) -> WarmupReport:
        self.report.seconds = self.clock() - self._started
        self.report.error = error
        return self.report

    async def _wait_healthy(self) -> bool:
        clusters = [self.spec.variants[v].cluster for v in self.candidates]
        while self._left() > 0:
            with contextlib.suppress(envoy_admin.AdminError):
                every = [await envoy_admin.healthy(self.session, a, clusters) for a in self.admins]
                if all(every):
                    return True
            await self.sleep(min(HEALTH_POLL_S, max(self._left(), 0)))
        return False

    async def _work(self, variant: str, claimed: dict[str, int]) -> None:
        """Send until the variant has its answers (counting those still open) or time is up."""
        model = self.spec.variants[variant].model or variant
        want = self.settings.requests
        while claimed[variant] < want and self._left() > 0:
            claimed[variant] += 1
            probe = self.prompts[self.report.sent[variant] % len(self.prompts)]
            self.report.sent[variant] += 1
            if await self._send(variant, request_body(probe, model)):
                self.report.answered[variant] += 1
            else:
                claimed[variant] -= 1
                await self.sleep(min(RETRY_S, max(self._left(), 0)))

    async def _send(self, variant: str, body: dict[str, Any]) -> bool:
        timeout = min(self.spec.envoy.request_timeout_s + 5, max(self._left(), 0.001))
        try:
            async with self.session.post(
                self.url,
                json=body,
                headers={**self.headers, self.forced_header: variant},
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                await resp.read()
                return resp.status < 300
        except (aiohttp.ClientError, TimeoutError):
            return False
