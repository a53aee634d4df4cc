"""`extproc demo`: a whole rollout on the local stack, with traffic, in a few minutes.

The stack runs two model stand-ins; multi-turn chat traffic flows through Envoy while the
evaluator walks the canary through its stages. In the default scenario the candidate carries a
latent regression (a slow tail and more refusals) that switches on once it reaches 25%, and the
evaluator rolls it back on its own; ``--scenario healthy`` shows it promoted to 100%. The stack
keeps running afterwards so you can explore it (`extproc status`, `extproc log`, `extproc down`).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from extproc.telemetry.inspect import ResponseInspector

DEMO_EXPERIMENT = Path(__file__).parent.parent / "data" / "demo-experiment.yaml"
"""The demo's schedule: short stages, so a whole rollout takes about a minute."""
ANSWER_BYTES = 200
"""How much of each answer the demo's conversations send back as the assistant's turn."""

DEMO_MODELS = {
    "stable": [
        "--latency-ms",
        "40",
        "--latency-jitter-ms",
        "15",
        "--tokens-per-s",
        "400",
        "--completion-tokens",
        "60",
    ],
    "canary": [
        "--latency-ms",
        "45",
        "--latency-jitter-ms",
        "15",
        "--tokens-per-s",
        "400",
        "--completion-tokens",
        "70",
    ],
}
"""The stand-ins' settings: the candidate a little slower and wordier than stable (the regression
scenario then degrades it at 25% through `/admin/behaviour`)."""


@dataclass
class TrafficReport:
    requests: int
    errors: int
    by_variant: Counter[str]
    moved_conversations: int


async def conversation(
    session: aiohttp.ClientSession,
    url: str,
    turns: int,
    report: TrafficReport,
    rng: random.Random,
) -> None:
    """One user's conversation of ``turns`` requests, streamed or not at random, under one
    conversation id (so it stays on one variant while the weights allow), counted in
    ``report``."""
    conv = f"demo-{uuid.uuid4()}"
    seen: set[str] = set()
    messages: list[dict[str, str]] = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn + 1} of conversation {conv}"})
        stream = rng.random() < 0.5
        body = {
            "model": "demo",
            "messages": messages,
            "stream": stream,
            "stream_options": {"include_usage": True} if stream else None,
        }
        try:
            async with session.post(url, json=body, headers={"x-conversation-id": conv}) as resp:
                answer = ResponseInspector(resp.headers.get("content-type", ""), ANSWER_BYTES)
                answer.feed(await resp.read(), 0)
                variant = resp.headers.get("x-llm-variant", "?")
                ok = resp.status == 200
        except aiohttp.ClientError:
            report.errors += 1
            continue
        report.requests += 1
        report.errors += 0 if ok else 1
        report.by_variant[variant] += 1
        seen.add(variant)
        # The answer's text, as a chat client sends the conversation back (not the raw body).
        messages.append({"role": "assistant", "content": answer.finish().text or ""})
    if len(seen) > 1:
        report.moved_conversations += 1


def describe(report: TrafficReport, seconds: float) -> str:
    shares = ", ".join(
        f"{v} {n} ({100 * n / max(report.requests, 1):.1f}%)"
        for v, n in sorted(report.by_variant.items())
    )
    return (
        f"{report.requests} requests in {seconds:.1f}s, {report.errors} errors; {shares}; "
        f"conversations moved by a ramp or a rollback: {report.moved_conversations}"
    )


REGRESSION = {"tail_ms": 2500.0, "tail_rate": 0.08, "refusal_rate": 0.2}
REGRESSION_STAGE = 2  # index of the 25% stage in the demo schedule


async def _traffic_until(listener: str, stop: asyncio.Event, report: TrafficReport) -> None:
    url = f"{listener}/v1/chat/completions"
    rng = random.Random(11)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def worker() -> None:
            while not stop.is_set():
                await conversation(session, url, rng.randint(2, 6), report, rng)

        await asyncio.gather(*(worker() for _ in range(8)))


async def rollout(
    listener: str, redis_url: str, name: str, canary_model: str, scenario: str, limit_s: float
) -> str:
    """Run traffic and print the evaluator's decisions as they happen; return the end status."""
    from extproc import store
    from extproc.evaluator.rollout import load_state, read_audit

    r = store.connect(redis_url)
    stop = asyncio.Event()
    report = TrafficReport(0, 0, Counter(), 0)
    traffic = asyncio.create_task(_traffic_until(listener, stop, report))
    seen: set[str] = set()
    regressed = False
    t0 = time.monotonic()
    status = "running"
    try:
        while time.monotonic() - t0 < limit_s:
            await asyncio.sleep(1.0)
            state = await load_state(r, name)
            for rec in await read_audit(r, name, 50):
                if rec["id"] in seen:
                    continue
                seen.add(rec["id"])
                w = ", ".join(f"{k} {v:g}%" for k, v in (rec.get("weights") or {}).items())
                print(
                    f"  [{time.monotonic() - t0:5.0f}s] {rec['action']:<9} [{w}] "
                    f"{'; '.join(rec['reasons'])}",
                    flush=True,
                )
            if state is None:
                continue
            status = state.status
            if status != "running":
                break
            if scenario == "regression" and not regressed and state.stage >= REGRESSION_STAGE:
                regressed = True
                print(
                    f"  [{time.monotonic() - t0:5.0f}s] the candidate model starts to degrade: "
                    "a slow tail and more refusals (the demo switches it on)",
                    flush=True,
                )
                async with aiohttp.ClientSession() as s:
                    await s.post(f"{canary_model}/admin/behaviour", json=REGRESSION)
    finally:
        stop.set()
        await traffic
        await r.aclose()
    print(f"  traffic: {describe(report, time.monotonic() - t0)}")
    return status
