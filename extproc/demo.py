"""`extproc demo`: the local stack with two model stand-ins and multi-turn chat traffic.

It shows, on a real Envoy, what the sidecar does: sticky per-conversation routing at the file's
weights, a live weight change picked up by the sidecar, and the per-variant figures it collected.
The stack keeps running afterwards so you can explore it (`extproc status`, `extproc down`).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import aiohttp


@dataclass
class TrafficReport:
    requests: int
    errors: int
    by_variant: Counter[str]
    moved_conversations: int


async def _conversation(
    session: aiohttp.ClientSession,
    url: str,
    turns: int,
    report: TrafficReport,
    rng: random.Random,
) -> None:
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
                text = await resp.text()
                variant = resp.headers.get("x-llm-variant", "?")
                ok = resp.status == 200
        except aiohttp.ClientError:
            report.errors += 1
            continue
        report.requests += 1
        report.errors += 0 if ok else 1
        report.by_variant[variant] += 1
        seen.add(variant)
        messages.append({"role": "assistant", "content": text[:200]})
    if len(seen) > 1:
        report.moved_conversations += 1


async def run_traffic(
    listener: str, *, conversations: int, turns: int, concurrency: int = 8, seed: int = 7
) -> TrafficReport:
    """Multi-turn chats against the listener; each conversation keeps one x-conversation-id."""
    url = f"{listener}/v1/chat/completions"
    report = TrafficReport(0, 0, Counter(), 0)
    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one() -> None:
            async with sem:
                await _conversation(session, url, turns, report, rng)

        await asyncio.gather(*(one() for _ in range(conversations)))
    return report


def describe(report: TrafficReport, seconds: float) -> str:
    shares = ", ".join(
        f"{v} {n} ({100 * n / max(report.requests, 1):.1f}%)"
        for v, n in sorted(report.by_variant.items())
    )
    return (
        f"{report.requests} requests in {seconds:.1f}s, {report.errors} errors; {shares}; "
        f"conversations that changed variant: {report.moved_conversations}"
    )


def timed_traffic(listener: str, conversations: int, turns: int) -> str:
    t0 = time.monotonic()
    report = asyncio.run(run_traffic(listener, conversations=conversations, turns=turns))
    return describe(report, time.monotonic() - t0)
