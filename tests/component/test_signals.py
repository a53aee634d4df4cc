"""The signals contract: strict JSON both ways, and the stream read with a cursor (real Redis)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from extproc.contract import keys, signals

pytestmark = pytest.mark.timeout(30)

RUBRIC = {"accuracy": 8.0, "clarity": 7.5, "completeness": 9.0}
JUDGE: dict[str, Any] = {
    "kind": "judge",
    "time_ms": 1_700_000_000_000,
    "request_id": "r1",
    "primary": "stable",
    "shadow": "canary",
    "winner": "shadow",
    "scores": {"primary": RUBRIC, "shadow": {**RUBRIC, "accuracy": 9.5}},
    "consistent": True,
}
FEEDBACK: dict[str, Any] = {
    "kind": "feedback",
    "time_ms": 5,
    "request_id": None,
    "key_hash": "00ff",
    "value": "retry",
}
WATCHDOG: dict[str, Any] = {
    "kind": "watchdog",
    "time_ms": 5,
    "variant": "canary",
    "prompt_id": "capital",
    "passed": False,
    "checks": {"status": True, "contains": False},
    "latency_ms": 12.5,
}


@pytest.mark.parametrize("doc", [JUDGE, FEEDBACK, WATCHDOG], ids=lambda d: str(d["kind"]))
def test_every_kind_round_trips(doc: dict[str, Any]) -> None:
    sig = signals.parse(json.dumps(doc))
    assert json.loads(signals.to_json(sig)) == doc
    assert signals.parse(signals.to_json(sig)) == sig


def test_typed_access() -> None:
    sig = signals.parse(json.dumps(JUDGE))
    assert isinstance(sig, signals.JudgeSignal)
    assert sig.scores.shadow.accuracy == 9.5
    assert sig.winner == "shadow"


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ({**FEEDBACK, "kind": "rating"}, "does not match any of the expected tags"),
        ({k: v for k, v in JUDGE.items() if k != "winner"}, "winner: Field required"),
        ({**JUDGE, "winner": "both"}, "winner: Input should be 'primary', 'shadow' or 'tie'"),
        ({**JUDGE, "confidence": 0.9}, "confidence: Unexpected keyword argument"),
        ({**FEEDBACK, "time_ms": "5"}, "time_ms: Input should be a valid integer"),
        ({**FEEDBACK, "value": "meh"}, "value: Input should be"),
        ({**FEEDBACK, "key_hash": None}, "needs a request_id or a key_hash"),
        ({**FEEDBACK, "key_hash": ""}, "key_hash: String should have at least 1 character"),
        ({**WATCHDOG, "passed": "yes"}, "passed: Input should be a valid boolean"),
        ({**WATCHDOG, "checks": {"status": 1}}, "checks.status: Input should be a valid boolean"),
        (
            {**JUDGE, "scores": {"primary": RUBRIC, "shadow": {**RUBRIC, "clarity": 11}}},
            "scores.shadow.clarity: Input should be less than or equal to 10",
        ),
        ([JUDGE], "(signal): Input should be an object"),
    ],
)
def test_malformed_signals_are_refused_with_the_problem(doc: object, problem: str) -> None:
    with pytest.raises(ValueError, match="not a valid signal") as err:
        signals.parse(json.dumps(doc))
    assert problem in str(err.value)


def test_not_json_is_refused() -> None:
    with pytest.raises(ValueError, match="Invalid JSON"):
        signals.parse(b"{nope")


def test_a_writer_cannot_store_what_readers_refuse() -> None:
    bad = signals.WatchdogSignal(
        time_ms=-1, variant="v", prompt_id="p", passed=True, checks={}, latency_ms=1
    )
    with pytest.raises(ValueError, match="time_ms: Input should be greater than or equal to 0"):
        signals.to_json(bad)
    with pytest.raises(ValueError, match="needs a request_id or a key_hash"):
        signals.FeedbackSignal(time_ms=1, request_id=None, key_hash=None, value="up")


async def test_append_and_read_with_a_cursor(client: aioredis.Redis) -> None:
    written = [signals.parse(json.dumps(d)) for d in (JUDGE, FEEDBACK, WATCHDOG)]
    ids = [await signals.append(client, "exp", s) for s in written]
    assert await client.xlen(keys.signals("exp")) == 3

    first = await signals.read(client, "exp", count=2)
    assert first.signals == list(zip(ids[:2], written[:2], strict=True))
    assert first.next_id == ids[1]
    rest = await signals.read(client, "exp", first.next_id)
    assert rest.signals == [(ids[2], written[2])]
    empty = await signals.read(client, "exp", rest.next_id)
    assert (empty.signals, empty.next_id, empty.malformed) == ([], rest.next_id, 0)


async def test_a_malformed_entry_is_counted_and_passed_over(client: aioredis.Redis) -> None:
    stream = keys.signals("exp")
    await client.xadd(stream, {signals.FIELD: b'{"kind": "judge"}'})
    await client.xadd(stream, {b"x": b"1"})
    good = await signals.append(client, "exp", signals.parse(json.dumps(FEEDBACK)))
    batch = await signals.read(client, "exp")
    assert [entry for entry, _ in batch.signals] == [good]
    assert batch.malformed == 2
    assert batch.next_id == good
