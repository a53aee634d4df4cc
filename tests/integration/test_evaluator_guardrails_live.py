"""Guardrail behaviours of the evaluator on the real stack (Envoy, the sidecar, Redis, the
evaluator, the mock models as local processes), each checked on the decision it must take:

- a regression of the latency tail only (the median unchanged) is rolled back on the default ramp
  of stages, by a ``latency_p99`` guardrail alone;
- an error burst that stable and the candidate share holds the rollout (``max_absolute`` with the
  default ``shared_incident: hold``) and never rolls it back, however often the evaluator looks;
- a candidate that stops calling the tools its requests offer is rolled back by a
  ``tool_call_rate`` guardrail;
- the dashboard's error rate of each variant is the one the error guardrail judged.

Unit tests judge the statistics on synthetic numbers; these check that what the data plane records
of real responses (latencies, 5xx answers, tool calls in JSON and SSE bodies) reaches the judge,
and that its decision reaches the routing and the audit log.

Traffic is a few concurrent clients, each request with a fresh conversation id (the evaluator
counts conversations, not requests). Every wait is on the evaluator's own state, read with
``extproc status`` after each batch of answered requests, with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from extproc.config import Rollout
from extproc.dev import stack
from tests.conftest import LiveStack, start_stack, write_experiment

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# The mock models answer after 40 ms: a median the data plane's own jitter does not dominate.
BASE_LATENCY = ["--latency-ms", "40"]
WORKERS = 12  # concurrent clients: enough for a few hundred requests a second, no more
POLL_EVERY = 150  # answered requests between two looks at the evaluator's state
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search_docs",
            "description": "Search the documentation",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
]


@pytest.fixture(params=["ext_proc", "native"])
def dataplane(request: pytest.FixtureRequest) -> str:
    """The data plane whose telemetry feeds the evaluator."""
    return str(request.param)


@contextlib.contextmanager
def live(tmp: Path, dataplane: str, **experiment: Any) -> Iterator[LiveStack]:
    """A stack of the test's own (its rollout ends in a decision), torn down whatever happens."""
    exp = write_experiment(tmp, dataplane=dataplane, **experiment)
    s = start_stack(tmp / "stack", exp, mock_args={"stable": BASE_LATENCY, "canary": BASE_LATENCY})
    try:
        yield s
    finally:
        stack.down(s.state_dir)


async def behave(http: httpx.AsyncClient, s: LiveStack, variant: str, **changes: Any) -> None:
    """Change a mock model's behaviour while it serves (``POST /admin/behaviour``)."""
    url = s.state["endpoints"]["models"][variant]
    (await http.post(f"{url}/admin/behaviour", json=changes)).raise_for_status()


class Traffic:
    """Chat requests from ``WORKERS`` concurrent clients until the block ends.

    Workers, not waves: a request held by a slow tail must not hold up the others, or the
    candidate's tail would set the pace of all traffic. A worker ends only by an exception (a
    transport error), which :meth:`after` raises at once instead of waiting for its deadline.
    """

    def __init__(self, http: httpx.AsyncClient, listener: str, body: Callable[[int], Any]) -> None:
        self.http, self.url, self.body = http, f"{listener}/v1/chat/completions", body
        self.answered = 0
        self.statuses: Counter[int] = Counter()
        self.variants: Counter[str] = Counter()
        self._progress = asyncio.Condition()
        self._workers: list[asyncio.Task[None]] = []

    async def _work(self) -> None:
        while True:
            n = self.answered
            resp = await self.http.post(
                self.url, json=self.body(n), headers={"x-conversation-id": str(uuid.uuid4())}
            )
            self.statuses[resp.status_code] += 1
            self.variants[resp.headers.get("x-llm-variant", "")] += 1
            async with self._progress:
                self.answered += 1
                self._progress.notify_all()

    async def after(self, n: int, timeout_s: float = 60) -> None:
        """Until ``n`` more requests were answered."""
        target = self.answered + n
        waiting = asyncio.ensure_future(self._reach(target))
        done, _ = await asyncio.wait(
            [waiting, *self._workers], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        waiting.cancel()
        for task in done:
            if task is not waiting:
                task.result()  # a worker died: its error
        assert waiting in done, f"{n} requests not answered within {timeout_s} s"

    async def _reach(self, target: int) -> None:
        async with self._progress:
            await self._progress.wait_for(lambda: self.answered >= target)

    async def __aenter__(self) -> Traffic:
        self._workers = [asyncio.create_task(self._work()) for _ in range(WORKERS)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)


async def poll(
    s: LiveStack,
    traffic: Traffic,
    done: Callable[[dict[str, Any]], bool],
    what: str,
    deadline_s: float,
    every: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Look at the status after each batch of answered requests until ``done``; ``every`` checks
    each status seen on the way (an invariant that must hold at every look)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while True:
        await traffic.after(POLL_EVERY)
        st = await asyncio.to_thread(s.status)
        if every is not None:
            every(st)
        if done(st):
            return st
        assert loop.time() < deadline, f"{what}: not within {deadline_s} s; last status {st}"


def rollback_of(s: LiveStack) -> dict[str, Any]:
    """The one rollback record of the audit log."""
    out = s.cli("log", "chat-upgrade", "--json", "--count", "100000")
    assert out.returncode == 0, out.stderr
    records: list[dict[str, Any]] = json.loads(out.stdout)
    rollback = [r for r in records if r["action"] == "rollback"]
    assert len(rollback) == 1, [r["action"] for r in records]
    return rollback[0]


def rolled_back(st: dict[str, Any]) -> bool:
    return bool(st["rollout"] and st["rollout"]["status"] == "rolled_back")


def chat(_: int) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}


async def test_p99_only_regression_is_rolled_back_on_the_default_ramp(
    tmp_path: Path, dataplane: str
) -> None:
    """A quarter of the candidate's requests take a second longer; the other three quarters, and
    so its median, are stable's: a regression of the tail alone (every quantile above the 75th
    moves, the p99 far beyond stable's). Only a ``latency_p99`` guardrail watches, the stages are
    the default ramp (2% first: the candidate sees few requests while stable's p99 is still being
    estimated), only the stage times are short. The regression must be rolled back, on the p99.

    The magnitude is chosen to be caught every time with a few thousand requests: this checks
    that real latencies reach the tail tests and their verdict the routing, not the tests' power
    on small regressions (docs/EVALUATOR.md: a p99 +30% needs far more candidate requests)."""
    tail_ms = 1000.0
    assert Rollout().stages == [2, 5, 10, 25, 50, 100]  # what leaving `stages` out means
    with live(
        tmp_path,
        dataplane,
        rollout={"cadence_s": 0.2, "min_stage_seconds": 1, "min_stage_samples": 20},
        guardrails=[{"metric": "latency_p99", "max_increase": 0.0, "min_samples": 20}],
    ) as s:
        async with httpx.AsyncClient(timeout=30) as http:
            await behave(http, s, "canary", tail_rate=0.25, tail_ms=tail_ms)
            async with Traffic(http, s.listener, chat) as traffic:
                await poll(s, traffic, rolled_back, "rollback of a p99 regression", 240)
            assert set(traffic.statuses) == {200}

            served = set()
            for _ in range(10):
                resp = await http.post(f"{s.listener}/v1/chat/completions", json=chat(0))
                served.add(resp.headers["x-llm-variant"])
        rollback = await asyncio.to_thread(rollback_of, s)

    assert served == {"stable"}
    assert any("latency_p99" in r for r in rollback["reasons"]), rollback["reasons"]
    (check,) = [c for c in rollback["checks"] if c["status"] == "fail"]
    assert check["metric"] == "latency_p99"
    canary, stable = rollback["snapshot"]["canary"], rollback["snapshot"]["stable"]
    # What was judged is the regression asked for: the tail moved, the median did not.
    assert canary["latency_p99"] >= tail_ms
    assert stable["latency_p99"] < tail_ms
    assert abs(canary["latency_p50"] - stable["latency_p50"]) < tail_ms / 10
    print(
        f"\nrolled back at stage {rollback['stage'] + 1} after {traffic.answered} requests "
        f"({traffic.variants['canary']} served by the candidate): {rollback['reasons']}"
    )


async def test_shared_error_burst_holds_and_never_rolls_back(
    tmp_path: Path, dataplane: str
) -> None:
    """Stable and the candidate fail 20% of their requests at once: an incident they share (a
    dependency down), ten times the error_rate guardrail's ceiling of 2%. With the default
    ``shared_incident: hold`` the evaluator must hold the rollout, not roll back the candidate,
    for as long as the burst lasts. The stage cannot end during the test (10 minutes), so hold
    and rollback are the only decisions it can take."""
    looks = 25  # evaluator ticks to wait through while held, after the first hold
    with live(
        tmp_path,
        dataplane,
        rollout={
            "stages": [50, 100],
            "cadence_s": 0.2,
            "min_stage_seconds": 600,
            "min_stage_samples": 20,
        },
        # No shared_incident: the default, hold, is what is under test.
        guardrails=[
            {"metric": "error_rate", "max_increase": 0.5, "max_absolute": 0.02, "min_samples": 50}
        ],
    ) as s:

        def held(st: dict[str, Any]) -> bool:
            ro = st["rollout"]
            return bool(
                ro["last_action"] == "hold"
                and any("shared_incident: hold" in r for r in ro["last_reasons"])
            )

        def never_rolled_back(st: dict[str, Any]) -> None:
            assert not rolled_back(st), st["rollout"]
            assert st["rollout"]["stage"] == 0

        def ticks(st: dict[str, Any]) -> int:
            return max(int(e["ticks"]) for e in st["evaluators"] if e["active"])

        async with httpx.AsyncClient(timeout=30) as http:
            await asyncio.gather(
                behave(http, s, "stable", error_rate=0.2), behave(http, s, "canary", error_rate=0.2)
            )
            async with Traffic(http, s.listener, chat) as traffic:
                st = await poll(s, traffic, held, "a hold", 120, every=never_rolled_back)
                first_hold = ticks(st)

                def still_held_after_many_looks(st: dict[str, Any]) -> bool:
                    assert st["evaluation"]["action"] == "hold", st["evaluation"]["reasons"]
                    return ticks(st) >= first_hold + looks

                await poll(
                    s,
                    traffic,
                    still_held_after_many_looks,
                    f"{looks} more looks",
                    120,
                    every=never_rolled_back,
                )
                await asyncio.gather(
                    behave(http, s, "stable", error_rate=0.0),
                    behave(http, s, "canary", error_rate=0.0),
                )
            st = await asyncio.to_thread(s.status)
            out = await asyncio.to_thread(
                s.cli, "log", "chat-upgrade", "--json", "--count", "100000"
            )

    never_rolled_back(st)
    assert st["rollout"]["status"] == "running"
    assert out.returncode == 0, out.stderr
    records = json.loads(out.stdout)
    assert not [r for r in records if r["action"] == "rollback"]
    holds = [r for r in records if r["action"] == "hold"]
    assert holds
    assert all(any("not worse than stable" in reason for reason in r["reasons"]) for r in holds), [
        r["reasons"] for r in holds
    ]
    both = [st["evaluation"]["variants"][v]["error_rate"] for v in ("stable", "canary")]
    assert all(0.1 < rate < 0.3 for rate in both), both  # the burst was shared, and judged
    assert {500, 200} <= set(traffic.statuses)
    print(
        f"\nheld through {ticks(st) - first_hold} looks after the first hold; "
        f"{len(holds)} hold records in the audit log, {traffic.answered} requests; "
        f"first {holds[0]['reasons']}, last {holds[-1]['reasons']}"
    )


async def test_candidate_that_stops_calling_tools_is_rolled_back(
    tmp_path: Path, dataplane: str
) -> None:
    """Stable calls one of the offered tools in half of its answers, the candidate never does
    (it answers in prose). A ``tool_call_rate`` guardrail, two-sided as an agent's rollout would
    set it, must roll it back; half the requests stream, so both of the observer's ways of
    seeing a call (a JSON body, SSE deltas) feed it."""

    def with_tools(n: int) -> dict[str, Any]:
        return {**chat(n), "tools": TOOLS, "stream": n % 2 == 0}

    with live(
        tmp_path,
        dataplane,
        rollout={
            "stages": [20, 50, 100],
            "cadence_s": 0.2,
            "min_stage_seconds": 600,
            "min_stage_samples": 20,
        },
        guardrails=[
            {
                "metric": "tool_call_rate",
                "direction": "both",
                "max_increase": 0.3,
                "max_decrease": 0.3,
                "min_samples": 30,
            }
        ],
    ) as s:
        async with httpx.AsyncClient(timeout=30) as http:
            await asyncio.gather(
                behave(http, s, "stable", tool_call_rate=0.5),
                behave(http, s, "canary", tool_call_rate=0.0),
            )
            async with Traffic(http, s.listener, with_tools) as traffic:
                await poll(s, traffic, rolled_back, "rollback of a candidate without tools", 120)
            assert set(traffic.statuses) == {200}
        rollback = await asyncio.to_thread(rollback_of, s)

    assert rollback["stage"] == 0
    assert any("tool-call rate" in r for r in rollback["reasons"]), rollback["reasons"]
    (check,) = [c for c in rollback["checks"] if c["status"] == "fail"]
    assert check["metric"] == "tool_call_rate"
    canary, stable = rollback["snapshot"]["canary"], rollback["snapshot"]["stable"]
    assert canary["tool_calls"] == 0
    assert canary["successes"] >= 30
    assert 0.3 < stable["tool_call_rate"] < 0.7  # the observer counted stable's calls
    print(
        f"\nrolled back after {canary['successes']} candidate answers "
        f"({traffic.answered} requests): {rollback['reasons']}"
    )


async def test_the_pages_error_rate_is_the_guardrails(tmp_path: Path, dataplane: str) -> None:
    """Server errors, client errors and good answers of both variants: once every request is in,
    the dashboard's error rate of each variant is the rate the error guardrail judged (server
    errors over assigned requests; client errors shown apart on the page, not counted)."""
    with live(
        tmp_path,
        dataplane,
        rollout={"stages": [50, 100], "cadence_s": 0.2, "min_stage_seconds": 600},
        guardrails=[{"metric": "error_rate", "max_increase": 5.0, "min_samples": 20}],
    ) as s:
        sent: Counter[tuple[str, int]] = Counter()
        async with httpx.AsyncClient(timeout=30) as http:
            for variant, rate in (("stable", 0.1), ("canary", 0.2)):
                await behave(http, s, variant, error_rate=rate)

            async def one(i: int) -> None:
                # Every fifth request lacks its messages: the model answers 400, a client error.
                body = {"model": "m"} if i % 5 == 0 else chat(i)
                r = await http.post(
                    f"{s.listener}/v1/chat/completions",
                    json=body,
                    headers={"x-conversation-id": f"page-{i}"},
                )
                sent[(r.headers["x-llm-variant"], r.status_code // 100)] += 1

            for start in range(0, 240, WORKERS):
                await asyncio.gather(*(one(i) for i in range(start, start + WORKERS)))
            assert {code for _, code in sent} == {2, 4, 5}
            totals = Counter(dict.fromkeys(("stable", "canary"), 0))
            for (variant, _), n in sent.items():
                totals[variant] += n

            page_url = f"{s.state['endpoints']['dashboard']}/api/experiments/chat-upgrade"

            async def both() -> tuple[dict[str, Any], dict[str, Any]] | None:
                """The page's and the evaluator's figures, once both count every request."""
                page = (await http.get(page_url)).json()["variants"]
                judged = ((await asyncio.to_thread(s.status))["evaluation"] or {}).get(
                    "variants", {}
                )
                complete = all(
                    page[v]["window_requests"] == totals[v]
                    and judged.get(v, {}).get("requests") == totals[v]
                    for v in totals
                )
                return (page, judged) if complete else None

            deadline = asyncio.get_running_loop().time() + 60
            while (seen := await both()) is None:
                assert asyncio.get_running_loop().time() < deadline, "figures never complete"
                await asyncio.sleep(0.2)  # polling Redis-backed figures, not synchronising
            page, judged = seen
    for v in totals:
        assert page[v]["error_rate"] == judged[v]["error_rate"]
        assert page[v]["errors"] == judged[v]["errors"] == sent[(v, 5)]
        assert page[v]["client_errors"] == judged[v]["client_errors"] == sent[(v, 4)]
        assert page[v]["error_rate"] == pytest.approx(sent[(v, 5)] / totals[v], abs=1e-4)
