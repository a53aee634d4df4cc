"""Quality signals that are not per-response: judge verdicts, user feedback, watchdog probes.

Telemetry events say how each request went; these say how good the answers were, and they arrive
from elsewhere (a judge model, the user, a reference prompt set), later and far less often. They
share one Redis stream per experiment, ``keys.signals(E)``, each entry one field ``j`` holding
JSON with a ``kind``, so the evaluator reads every kind with one cursor.

The JSON is the contract between the processes that write signals (``extproc quality``) and the
evaluator that reads them, so parsing is strict: an unknown kind, a missing or unknown field, or a
value of the wrong type is a ``ValueError`` that names the problem, never a half-read signal.
Feedback carries no variant: the evaluator joins it with the events it reads, by ``request_id``
or by ``key_hash`` (the same keyed hash of the sticky key that events carry; never a raw id).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import redis.asyncio as aioredis
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from extproc.contract import keys

__all__ = [
    "FIELD",
    "FeedbackSignal",
    "FeedbackValue",
    "JudgeScores",
    "JudgeSignal",
    "Rubric",
    "Signal",
    "SignalBatch",
    "WatchdogSignal",
    "append",
    "parse",
    "read",
    "to_json",
]

log = logging.getLogger(__name__)

FIELD = b"j"
STREAM_MAXLEN = 200_000
"""Approximate cap of the stream: judge calls are budgeted and feedback is sparse, so this holds
days of signals while bounding what a flood of feedback posts can cost."""

FeedbackValue = Literal["up", "down", "retry", "escalation"]
Winner = Literal["primary", "shadow", "tie"]
Score = Annotated[float, Field(ge=1, le=10)]
Text = Annotated[str, Field(min_length=1)]
Millis = Annotated[int, Field(ge=0)]

# Strict: no coercion ("3" is not 3) and no unknown fields, in the JSON and when constructing.
_STRICT = ConfigDict(extra="forbid", strict=True)


@dataclass(frozen=True, kw_only=True)
class Rubric:
    """Scores 1-10 of one answer (the mean over both presentation orders, so halves occur)."""

    __pydantic_config__: ClassVar[ConfigDict] = _STRICT
    accuracy: Score
    clarity: Score
    completeness: Score


@dataclass(frozen=True, kw_only=True)
class JudgeScores:
    __pydantic_config__: ClassVar[ConfigDict] = _STRICT
    primary: Rubric
    shadow: Rubric


@dataclass(frozen=True, kw_only=True)
class JudgeSignal:
    """A judge model's pairwise verdict on one captured pair (primary and shadow answer).

    ``consistent`` is false when the two presentation orders disagreed; the winner is then
    ``tie``, so position bias can only dilute a difference, never invent one.
    """

    __pydantic_config__: ClassVar[ConfigDict] = _STRICT
    kind: Literal["judge"] = "judge"
    time_ms: Millis  # start of the judged request
    request_id: Text
    primary: Text  # the variant that served the user
    shadow: Text  # the variant that answered the mirrored copy
    winner: Winner
    scores: JudgeScores
    consistent: bool


@dataclass(frozen=True, kw_only=True)
class FeedbackSignal:
    """A user's reaction to an answer; attributed to a variant by the reader, not the writer."""

    __pydantic_config__: ClassVar[ConfigDict] = _STRICT
    kind: Literal["feedback"] = "feedback"
    time_ms: Millis  # when the feedback was received
    request_id: Text | None
    key_hash: Text | None
    value: FeedbackValue

    def __post_init__(self) -> None:
        if self.request_id is None and self.key_hash is None:
            raise ValueError("feedback needs a request_id or a key_hash to be attributed")


@dataclass(frozen=True, kw_only=True)
class WatchdogSignal:
    """One reference prompt sent to one variant (forced) and the outcome of its checks."""

    __pydantic_config__: ClassVar[ConfigDict] = _STRICT
    kind: Literal["watchdog"] = "watchdog"
    time_ms: Millis  # when the probe was sent
    variant: Text
    prompt_id: Text
    passed: bool
    checks: dict[str, bool]
    latency_ms: Annotated[float, Field(ge=0)]


Signal = JudgeSignal | FeedbackSignal | WatchdogSignal
_ADAPTER: TypeAdapter[Signal] = TypeAdapter(Annotated[Signal, Field(discriminator="kind")])


def _problems(err: ValidationError) -> str:
    out = []
    for e in err.errors(include_url=False):
        # The first location step of a tagged union is the kind itself: noise in a message.
        loc = [str(p) for p in e["loc"]][1:] if e["type"] != "union_tag_invalid" else []
        out.append(f"{'.'.join(loc) or '(signal)'}: {e['msg']}")
    return "; ".join(out)


def parse(raw: str | bytes) -> Signal:
    """The signal in one stream entry's JSON; ``ValueError`` naming every problem otherwise."""
    try:
        return _ADAPTER.validate_json(raw)
    except ValidationError as err:
        raise ValueError(f"not a valid signal: {_problems(err)}") from None


def to_json(signal: Signal) -> str:
    """The wire form; validated on the way out too, so a writer cannot store what readers refuse."""
    doc = json.dumps(dataclasses.asdict(signal), separators=(",", ":"))
    parse(doc)
    return doc


async def append(redis: aioredis.Redis, experiment: str, signal: Signal) -> str:
    """Add a signal to the experiment's stream; returns the entry id."""
    entry = await redis.xadd(
        keys.signals(experiment),
        {FIELD: to_json(signal)},
        maxlen=STREAM_MAXLEN,
        approximate=True,
    )
    return entry.decode() if isinstance(entry, bytes) else str(entry)


@dataclass(frozen=True)
class SignalBatch:
    """Signals after a cursor. ``next_id`` moves past malformed entries too (they are counted and
    logged, never returned), so one bad entry cannot stall a reader."""

    signals: list[tuple[str, Signal]]
    next_id: str
    malformed: int


async def read(
    redis: aioredis.Redis, experiment: str, after_id: str = "0-0", count: int = 1000
) -> SignalBatch:
    """Up to ``count`` entries strictly after ``after_id``, oldest first."""
    entries = await redis.xrange(keys.signals(experiment), min=f"({after_id}", count=count) or []
    out: list[tuple[str, Signal]] = []
    next_id, malformed = after_id, 0
    for raw_id, fields in entries:
        next_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
        try:
            out.append((next_id, parse((fields or {}).get(FIELD, b""))))
        except ValueError as err:
            malformed += 1
            log.warning("%s: skipping signal %s: %s", experiment, next_id, err)
    return SignalBatch(signals=out, next_id=next_id, malformed=malformed)
