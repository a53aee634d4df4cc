"""``extproc quality``: the judge, the watchdog and the feedback endpoint, in one process.

The three produce the signals of ``extproc.contract.signals`` and share what they need (a Redis
client, an HTTP session) but nothing on the request path, so they live apart from the sidecar: a
slow judge model or a burst of feedback posts can never delay a user's request. Each part runs only
when configured: the judge with a ``judge`` section, the watchdog with a ``watchdog`` section (and
the Envoy listener to probe through), the endpoint with ``--feedback-listen``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from extproc import store
from extproc.config import ConfigError, Experiment
from extproc.quality import feedback
from extproc.quality.llm_judge import JudgeClient, JudgeWorker
from extproc.quality.watchdog import ProbeSet, WatchdogLoop, load_probes, probe_file

__all__ = ["Prepared", "QualitySettings", "prepare", "serve"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QualitySettings:
    redis_url: str = store.DEFAULT_REDIS_URL
    listener: str | None = None
    """Envoy's listener URL: watchdog probes go through it, like any request."""
    feedback_listen: str | None = None
    """host:port of the feedback endpoint; None = not served."""
    feedback_token: str = ""
    feedback_insecure: bool = False
    """Serve feedback without a token even though a feedback guardrail acts on it."""


@dataclass(frozen=True)
class Prepared:
    """What start-up checked and loaded, so a bad setting fails before anything runs."""

    probes: ProbeSet | None
    api_key: str | None
    forcing_secret: str | None


def prepare(experiment: Experiment, settings: QualitySettings) -> Prepared:
    """Validate what the experiment file cannot check alone; ConfigError lists every problem."""
    problems: list[str] = []
    spec = experiment.spec
    api_key = None
    if spec.judge is not None and spec.judge.api_key_env:
        api_key = os.environ.get(spec.judge.api_key_env)
        if not api_key:
            problems.append(f"judge.api_key_env: ${spec.judge.api_key_env} is not set")
    probes, secret = None, None
    path = probe_file(experiment)
    if path is not None:
        if not settings.listener:
            problems.append("watchdog: needs the Envoy listener to probe through (--listener)")
        secret_env = spec.forced_routing.secret_env
        if secret_env:
            secret = os.environ.get(secret_env)
            if not secret:
                problems.append(f"forced_routing.secret_env: ${secret_env} is not set")
        try:
            probes = load_probes(path)
        except ConfigError as err:
            problems += [f"watchdog.file ({path}): {p}" for p in err.problems]
    problems += _feedback_problems(experiment, settings)
    if problems:
        raise ConfigError(experiment.source, problems)
    return Prepared(probes=probes, api_key=api_key, forcing_secret=secret)


def _feedback_problems(experiment: Experiment, settings: QualitySettings) -> list[str]:
    """An endpoint without a token takes anyone's feedback; when a feedback guardrail can roll
    back or hold the rollout, that is anyone's lever on the rollout, so it needs a token (or the
    operator's explicit --feedback-insecure)."""
    if not settings.feedback_listen or settings.feedback_token or settings.feedback_insecure:
        return []
    acting = sorted(
        {
            g.action
            for g in experiment.spec.guardrails
            if g.metric == "feedback_negative_rate" and g.action != "warn"
        }
    )
    if not acting:
        return []
    return [
        f"guardrails: feedback_negative_rate can {' and '.join(acting)} the rollout, so the "
        f"feedback endpoint needs a token: set ${feedback.TOKEN_ENV} (or pass "
        "--feedback-insecure to let anyone who reaches it post feedback)"
    ]


async def serve(
    experiment: Experiment,
    settings: QualitySettings,
    prepared: Prepared,
) -> None:
    """Run until SIGTERM/SIGINT or cancellation."""
    redis = store.connect(settings.redis_url, timeout_s=5)
    session = aiohttp.ClientSession()
    tasks: list[asyncio.Task[None]] = []
    runner: web.AppRunner | None = None
    judge: JudgeClient | None = None
    spec = experiment.spec
    try:
        if spec.judge is not None:
            judge = JudgeClient(spec.judge, prepared.api_key)
            worker = JudgeWorker(redis, experiment.name, judge)
            tasks.append(asyncio.create_task(worker.run(), name="judge"))
        if prepared.probes is not None and settings.listener:
            loop = WatchdogLoop(
                redis,
                experiment,
                prepared.probes,
                settings.listener,
                session,
                prepared.forcing_secret,
            )
            tasks.append(asyncio.create_task(loop.run(), name="watchdog"))
        if settings.feedback_listen:
            host, _, port = settings.feedback_listen.rpartition(":")
            app = feedback.make_app(redis, settings.feedback_token)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            await web.TCPSite(runner, host, int(port)).start()
        stop = asyncio.Event()
        running = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            running.add_signal_handler(sig, stop.set)
        parts = [t.get_name() for t in tasks]
        if settings.feedback_listen:
            parts.append(f"feedback on {settings.feedback_listen}")
        log.info("quality worker for %s: %s", experiment.name, ", ".join(parts) or "idle")
        stopping = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        for t in done:
            if t is not stopping:
                t.result()  # a part that ended by itself crashed: let the process fail loudly
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if runner is not None:
            await runner.cleanup()
        if judge is not None:
            await judge.close()
        await session.close()
        await redis.aclose()
