"""Fixtures the unit tests share."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from typing import Any

import pytest

from extproc.dev.mockmodel import MockBehaviour, serve

Start = Callable[[MockBehaviour], Awaitable[str]]


@pytest.fixture
async def start_mock() -> AsyncIterator[Start]:
    """Start real model stand-ins on free ports; returns their base URLs once they listen."""
    tasks: list[asyncio.Task[None]] = []

    async def start(behaviour: MockBehaviour) -> str:
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve("127.0.0.1", 0, behaviour, ready.set_result))
        tasks.append(task)
        waiters: list[asyncio.Future[Any]] = [ready, task]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # surfaces the start-up error
        return f"http://127.0.0.1:{ready.result()}"

    yield start
    for task in tasks:
        task.cancel()
    for task in tasks:
        with suppress(asyncio.CancelledError):
            await task
