"""One definition per figure: what `extproc status` and the dashboard count is what the
evaluator's guardrails count (extproc/telemetry/outcome.py), on the same events.

The error rate is server errors (5xx, timeout, reset) over assigned requests; client errors are
their own figure; forced tester traffic and shadow copies are counted apart; an in-flight notice
is never a request. Events go through the real telemetry writer into a real Redis, and the
dashboard's document is read back with the functions its API serves.
"""

from __future__ import annotations

import time

import pytest
import redis.asyncio as aioredis

from extproc import store
from extproc.config import EXAMPLE_EXPERIMENT, Price, load_experiment
from extproc.evaluator.window import StageWindow
from extproc.ops import status
from extproc.ops.dashboard import views
from extproc.telemetry import outcome, rollup
from extproc.telemetry.v1.event_pb2 import Assignment, ErrorClass, TelemetryEvent
from extproc.telemetry.writer import TelemetryWriter

pytestmark = pytest.mark.timeout(60)

EXP = load_experiment(EXAMPLE_EXPERIMENT)
NAME = EXP.name
E = ErrorClass
STICKY, FORCED = Assignment.ASSIGNMENT_STICKY, Assignment.ASSIGNMENT_FORCED


def ev(variant: str, rid: str, error: int = E.ERROR_CLASS_NONE, **fields: object) -> TelemetryEvent:
    base: dict[str, object] = {
        "experiment": NAME,
        "variant": variant,
        "request_id": rid,
        "assignment": STICKY,
        "key_hash": f"k-{rid}",
        "status": 200 if error == E.ERROR_CLASS_NONE else 500,
        "error": error,
        "time_unix_ms": int(time.time() * 1000),
        "duration_ms": 100.0,
        "prompt_tokens": 10,
        "completion_tokens": 5,
    }
    return TelemetryEvent(**(base | fields))


def traffic() -> list[TelemetryEvent]:
    """Every kind of event a stage sees, with counts that tell the definitions apart."""
    out: list[TelemetryEvent] = []

    def add(variant: str, tag: str, n: int, error: int = E.ERROR_CLASS_NONE, **f: object) -> None:
        out.extend(ev(variant, f"{variant}-{tag}-{i}", error, **f) for i in range(n))

    for v, ok, fivexx in (("stable", 50, 2), ("canary", 20, 3)):
        add(v, "ok", ok)
        add(v, "5xx", fivexx, E.ERROR_CLASS_UPSTREAM_5XX)
        add(v, "timeout", 1, E.ERROR_CLASS_TIMEOUT, status=504)
        add(v, "reset", 1, E.ERROR_CLASS_RESET, status=0)
        add(v, "4xx", 3, E.ERROR_CLASS_CLIENT_ERROR, status=400)
        add(v, "gone", 2, E.ERROR_CLASS_CLIENT_DISCONNECT)
    # Tester traffic, mostly failing: it must not move the canary's error rate.
    add("canary", "forced", 10, E.ERROR_CLASS_UPSTREAM_5XX, assignment=FORCED)
    # Shadow copies: the mirrored side, summarised apart.
    add("canary", "shadow", 4, E.ERROR_CLASS_TIMEOUT, shadow=True, status=504)
    # In-flight notices: two for requests that ended (listed above), two still open.
    for rid in ("canary-ok-0", "canary-5xx-0", "canary-open-0", "canary-open-1"):
        out.append(ev("canary", rid, in_flight=True, status=0))
    return out


async def seed(r: aioredis.Redis, events: list[TelemetryEvent]) -> None:
    await store.register_experiment(r, EXP)
    writer = TelemetryWriter(r)
    for e in events:
        writer.submit(e)
    await writer.flush()


async def test_the_pages_error_rate_is_the_guardrails(client: aioredis.Redis) -> None:
    events = traffic()
    await seed(client, events)
    page = await views.experiment(client, NAME)
    assert page is not None
    # The evaluator's window over the same events; notices are not requests (the window of this
    # branch predates them, so they are left out here as the contract says the window does).
    window = StageWindow(started_ms=0)
    for e in events:
        if not outcome.is_notice(e):
            window.add(e)
    rows = {row["metric"]: row for row in page["comparison"]["rows"]}
    for variant in ("stable", "canary"):
        figures = page["variants"][variant]
        w = window.of(variant)
        assert figures["window_requests"] == w.requests
        assert figures["errors"] == w.errors
        assert figures["error_rate"] == round(w.errors / w.requests, 4)
        cell = rows["error_rate"]["stable"] if variant == "stable" else None
        if cell is not None:
            assert cell == figures["error_rate"]
    assert rows["error_rate"]["candidates"]["canary"]["value"] == round(
        window.of("canary").errors / window.of("canary").requests, 4
    )
    canary = page["variants"]["canary"]
    # 20 + 3 + 1 + 1 + 3 + 2 assigned requests, 5 of them server errors, 5 client errors.
    assert (canary["window_requests"], canary["errors"], canary["client_errors"]) == (30, 5, 5)
    assert canary["client_error_rate"] == round(5 / 30, 4)
    assert canary["timeout_rate"] == round(1 / 30, 4)
    assert canary["forced_requests"] == window.forced == 10
    assert canary["open_requests"] == 2
    assert page["forced"]["canary"]["error_rate"] == 1.0
    assert page["shadow"]["canary"]["window_requests"] == window.shadow == 4
    assert page["shadow"]["canary"]["timeout_rate"] == 1.0
    # The text of the figure is the same wherever it is read.
    assert rows["error_rate"]["candidates"]["canary"]["text"]["value"] == "16.67%"
    compared = "\n".join(status.figure_lines(page)).split("tester traffic")[0]
    (line,) = (x for x in compared.splitlines() if x.startswith("error rate"))
    assert line.split()[-2:] == ["6.78%", "16.67%"]  # 4 of stable's 59, 5 of the canary's 30


def test_every_answer_signal_is_counted_as_outcome_defines_it() -> None:
    price = Price(input_per_mtok=1.0, output_per_mtok=2.0)
    events = [
        # Streamed answers: 11 tokens, 10 after the first over 500 ms -> 20 tokens/s.
        ev("c", "a", streamed=True, first_token_ms=100.0, duration_ms=600.0, completion_tokens=11,
           tool_calls=True, empty_answer=False, refusal=False, answer_chars=4,
           cached_prompt_tokens=8, json_valid=True),
        ev("c", "b", streamed=True, first_token_ms=100.0, duration_ms=300.0, completion_tokens=11,
           empty_answer=True, refusal=False, answer_chars=0, json_valid=False),
        # Not streamed: no generation speed; no cached figure reported: unknown, not zero.
        ev("c", "c", empty_answer=False, refusal=True, answer_chars=10, cached_prompt_tokens=0),
        # A failed request: no answer signals, and not a tool call whatever it says.
        ev("c", "d", E.ERROR_CLASS_UPSTREAM_5XX, tool_calls=True, streamed=True,
           first_token_ms=1.0, completion_tokens=11),
    ]  # fmt: skip
    got = rollup.tally(events)[("assigned", "c")].figures(price)
    assert got["window_requests"] == 4
    assert got["tool_call_rate"] == round(1 / 3, 4)  # over the three successes
    assert got["empty_answer_rate"] == round(1 / 3, 4)
    assert got["json_invalid_rate"] == 0.5
    assert got["output_tokens_per_s"] == pytest.approx((20 + 50) / 2)
    assert got["cached_prompt_tokens"] == 4  # mean of 8 and 0; the unknowns left out
    # Of the successful requests, as the guardrail's window takes it.
    assert got["cost_per_request"] == round(
        sum(price.cost(e.prompt_tokens, e.completion_tokens) for e in events[:3]) / 3, 8
    )
    assert got["refusal_rate"] == round(1 / 3, 4)


def test_a_request_without_usage_has_no_cost() -> None:
    price = Price(input_per_mtok=1.0, output_per_mtok=1.0)
    bare = TelemetryEvent(variant="c", error=E.ERROR_CLASS_RESET)
    assert outcome.cost(bare, price) is None
    assert outcome.cost(ev("c", "x"), None) is None
    assert outcome.cost(ev("c", "x"), price) == pytest.approx(15e-6)


@pytest.mark.parametrize(
    ("streamed", "first_token_ms", "duration_ms", "completion_tokens", "tps"),
    [
        (True, 0.0, 1000.0, 3, 2.0),
        (False, 0.0, 1000.0, 3, None),  # its first byte is its last
        (True, 0.0, 1000.0, 1, None),  # no token after the first
        (True, 50.0, 50.0, 9, None),  # no time after the first token
        (True, None, 1000.0, 9, None),  # first token unknown
    ],
)
def test_output_tokens_per_s_of_one_event(
    streamed: bool,
    first_token_ms: float | None,
    duration_ms: float,
    completion_tokens: int,
    tps: float | None,
) -> None:
    e = TelemetryEvent(
        streamed=streamed,
        first_token_ms=first_token_ms,
        duration_ms=duration_ms,
        completion_tokens=completion_tokens,
    )
    assert outcome.output_tokens_per_s(e) == tps
