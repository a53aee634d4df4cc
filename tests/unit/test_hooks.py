"""Lifecycle webhooks: delivery with retries, backoff and a timeout per try, against an
in-process HTTP server; which decision calls which hook; what the file may say."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from extproc.config import ConfigError, Hooks, parse_experiment
from extproc.evaluator import hooks

pytestmark = pytest.mark.timeout(30)

EXPERIMENT: dict[str, Any] = {
    "name": "exp",
    "salt": "s",
    "stable": "stable",
    "variants": {
        "stable": {"cluster": "a", "weight": 90, "model": "m1"},
        "canary": {"cluster": "b", "weight": 10, "model": "m2"},
    },
}


class Receiver:
    """An HTTP server that answers ``statuses`` in turn (then 200), or never answers."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.statuses: list[int] = []
        self.hang = asyncio.Event()  # set: every request waits (a timeout per try) ...
        self.release = asyncio.Event()  # ... until the test is over
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        if self.hang.is_set():
            await self.release.wait()
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)  # a free port, picked by the kernel
    await site.start()
    port = runner.addresses[0][1]
    rec.url = f"http://127.0.0.1:{port}/hook"
    yield rec
    rec.release.set()
    await runner.cleanup()


class Waits:
    """The injected sleep: records the backoff instead of waiting it."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    async def __call__(self, s: float) -> None:
        self.seconds.append(s)


async def test_a_hook_is_delivered_once_when_answered(receiver: Receiver) -> None:
    waits = Waits()
    done = await hooks.deliver(receiver.url, {"a": 1}, Hooks(), waits)
    assert done == hooks.Delivery(True, 1)
    assert receiver.bodies == [{"a": 1}]
    assert waits.seconds == []


async def test_a_failing_hook_is_retried_with_doubling_backoff(receiver: Receiver) -> None:
    receiver.statuses = [500, 503]
    waits = Waits()
    done = await hooks.deliver(receiver.url, {}, Hooks(retries=3, backoff_s=0.5), waits)
    assert done == hooks.Delivery(True, 3)
    assert waits.seconds == [0.5, 1.0]


async def test_a_hook_that_fails_every_try_says_why(receiver: Receiver) -> None:
    receiver.statuses = [500] * 10
    waits = Waits()
    done = await hooks.deliver(receiver.url, {}, Hooks(retries=2, backoff_s=1), waits)
    assert done == hooks.Delivery(False, 3, "HTTP 500")
    assert len(receiver.bodies) == 3
    assert waits.seconds == [1, 2]  # none after the last try


async def test_a_hung_receiver_costs_one_timeout_per_try(receiver: Receiver) -> None:
    receiver.hang.set()
    done = await hooks.deliver(receiver.url, {}, Hooks(retries=1, timeout_s=0.2), Waits())
    assert (done.ok, done.tries, done.error) == (False, 2, "TimeoutError")


async def test_an_unreachable_receiver_is_a_failure_not_an_exception() -> None:
    done = await hooks.deliver("http://127.0.0.1:1/hook", {}, Hooks(retries=0), Waits())
    assert (done.ok, done.tries) == (False, 1)
    assert done.error.startswith("Client")


@pytest.mark.parametrize(
    ("action", "hook"),
    [
        ("start", "on_start"),
        ("restart", "on_start"),
        ("advance", "on_advance"),
        ("rollback", "on_rollback"),
        ("complete", "on_complete"),
        ("hold", None),
        ("pause", None),
        ("abort", None),
    ],
)
def test_which_decision_calls_which_hook(action: str, hook: str | None) -> None:
    every = Hooks(
        **{h: f"http://x/{h}" for h in ("on_start", "on_advance", "on_rollback", "on_complete")}
    )
    assert hooks.hook_url(every, action) == (None if hook is None else (hook, f"http://x/{hook}"))
    assert hooks.hook_url(Hooks(), action) is None


def test_the_body_names_variants_models_and_the_decision() -> None:
    spec = parse_experiment(EXPERIMENT).spec
    record = {"attempt": 2, "stage": 1, "status": "running", "weights": {"canary": 50}, "time": 1.0}
    b = hooks.body(spec, "on_advance", "advance", {**record, "reasons": ["healthy"]})
    assert b["hook"] == "on_advance"
    assert (b["experiment"], b["attempt"], b["stage"], b["stable"]) == ("exp", 2, 1, "stable")
    assert b["variants"]["canary"] == {"model": "m2", "cluster": "b"}
    assert b["reasons"] == ["healthy"]


def test_hook_urls_are_checked_with_their_paths() -> None:
    doc = {**EXPERIMENT, "hooks": {"on_start": "ftp://x", "on_rollback": "nowhere", "retries": 99}}
    with pytest.raises(ConfigError) as err:
        parse_experiment(doc)
    problems = err.value.problems
    assert "hooks.on_start: 'ftp://x' is not an http(s) URL" in problems
    assert "hooks.on_rollback: 'nowhere' is not an http(s) URL" in problems
    assert any(p.startswith("hooks.retries: ") for p in problems)
