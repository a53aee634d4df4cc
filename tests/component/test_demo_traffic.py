"""The demo's conversations send each answer's text back as the assistant's turn, as a chat
client does (not the raw response body, which then showed up in every captured prompt)."""

from __future__ import annotations

import json
import random
from collections import Counter

import aiohttp
import pytest
from aiohttp import web

from extproc.dev.demo import TrafficReport, conversation

pytestmark = pytest.mark.timeout(30)


async def test_each_turn_sends_the_previous_answers_text() -> None:
    seen: list[list[dict[str, str]]] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body["messages"])
        n = len(body["messages"])
        if body["stream"]:
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            for piece in (f"answer {n}", " streamed"):
                chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            return resp
        message = {"role": "assistant", "content": f"answer {n} whole"}
        return web.json_response({"choices": [{"index": 0, "message": message}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    report = TrafficReport(requests=0, errors=0, by_variant=Counter(), moved_conversations=0)
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            await conversation(session, url, 4, report, random.Random(3))
    finally:
        await runner.cleanup()
    assert report.requests == 4
    history = seen[-1]
    answers = [m["content"] for m in history if m["role"] == "assistant"]
    assert len(answers) == 3
    for answer, n in zip(answers, (1, 3, 5), strict=True):
        assert answer in (f"answer {n} streamed", f"answer {n} whole")
