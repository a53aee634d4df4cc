"""LLM-as-judge: a judge model compares the primary and the shadow answer of captured pairs.

Per-response signals (refusals, length) cannot say that an answer got worse while staying polite
and the same length; a judge model can, at a price, and with biases that this module counters:

* **Position bias.** Judges favour the answer shown first (or second). Every pair is judged twice
  with the order swapped; when the two verdicts disagree the pair is a ``tie`` with
  ``consistent=false``, so the bias can dilute a difference but never create one. Rubric scores
  are the mean of both orders.
* **Unparsable replies.** The reply must be exactly the JSON object asked for (a Markdown
  ```json fence around it is tolerated, nothing else), validated strictly; an invalid reply is
  retried at most ``max_retries`` times, telling the judge what was wrong.
* **Cost.** A token bucket spaces calls (retries included) at least ``60 / calls_per_minute``
  seconds apart, so no minute holds more than ``calls_per_minute`` calls. Pairs wait in Redis
  meanwhile; those that expire (capture TTL) before their turn are simply not judged.

Pairs come from the sidecar's captures (``keys.pair``); a verdict goes into the pair hash (field
``judge``) and, in the same Lua script, into the signals stream, so the two cannot disagree and a
pair is recorded once even if two workers judged it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import openai
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import RedisError

from extproc.config import Judge
from extproc.contract import keys, signals
from extproc.contract.assignment import BUCKETS
from extproc.supervise import raise_if_cancelled

__all__ = [
    "ANSWER_A",
    "ANSWER_B",
    "InvalidReply",
    "JudgeClient",
    "JudgeFailed",
    "JudgeWorker",
    "OrderVerdict",
    "Pair",
    "PairFeed",
    "TokenBucket",
    "combine",
    "judge_messages",
    "parse_reply",
]

log = logging.getLogger(__name__)

ANSWER_A = "answer_a"
ANSWER_B = "answer_b"
"""Tags around the two answers in the judge prompt (the mock model's judge mode reads them)."""

PAIR_GRACE_S = 120.0
"""How long a pair with only one side is waited for (a shadow answer can take the model's whole
timeout); after that it is passed over."""

_SKEW_S = 5.0
"""A pair's score is re-set by its second capture, possibly a little earlier than the first: the
feed re-reads this far behind its cursor."""

_CONCURRENT_PAIRS = 4
_PAGE = 500

_SYSTEM = """You are an impartial judge. Two assistants answered the same conversation. Score each \
answer from 1 to 10 on:
- accuracy: correct facts and reasoning, no invented content;
- clarity: easy to follow, well organised;
- completeness: addresses everything the user asked.
Then name the better answer overall, or "tie". The order in which the answers are shown and their \
length must not influence you.
Reply with only this JSON object and nothing else:
{"a": {"accuracy": <1-10>, "clarity": <1-10>, "completeness": <1-10>},
 "b": {"accuracy": <1-10>, "clarity": <1-10>, "completeness": <1-10>},
 "winner": "A" | "B" | "tie"}"""


def _quote(text: str, tag: str) -> str:
    # An answer cannot close its own tag and pose as the other answer.
    safe = re.sub(r"<(/?(?:answer_[ab]|conversation))>", r"&lt;\1&gt;", text)
    return f"<{tag}>\n{safe}\n</{tag}>"


def judge_messages(prompt: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    """The chat messages of one judge call; A is shown first."""
    user = "\n\n".join(
        (
            _quote(prompt, "conversation"),
            _quote(answer_a, ANSWER_A),
            _quote(answer_b, ANSWER_B),
        )
    )
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]


# --------------------------------------------------------------------------------------------
# Replies


class InvalidReply(ValueError):
    """The judge answered, but not with the JSON object asked for."""


class JudgeFailed(Exception):
    """No usable verdict within the retries (or a refusal no retry can fix, such as a 401)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Scores(_Strict):
    accuracy: int = Field(ge=1, le=10)
    clarity: int = Field(ge=1, le=10)
    completeness: int = Field(ge=1, le=10)

    def rubric_with(self, other: _Scores) -> signals.Rubric:
        """The mean of this order's and the swapped order's scores of the same answer."""
        return signals.Rubric(
            accuracy=(self.accuracy + other.accuracy) / 2,
            clarity=(self.clarity + other.clarity) / 2,
            completeness=(self.completeness + other.completeness) / 2,
        )


class OrderVerdict(_Strict):
    """The judge's reply for one presentation order: ``a`` is the answer shown first."""

    a: _Scores
    b: _Scores
    winner: Literal["A", "B", "tie"]


_FENCE = re.compile(r"\A```(?:json)?[ \t]*\r?\n(.*?)\r?\n[ \t]*```\Z", re.DOTALL | re.IGNORECASE)


def parse_reply(text: str) -> OrderVerdict:
    """The verdict in a judge's reply; :class:`InvalidReply` says what is wrong with it."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        return OrderVerdict.model_validate_json(body)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(reply)'}: {e['msg']}"
            for e in err.errors(include_url=False)
        )
        raise InvalidReply(problems) from None


Side = Literal["primary", "shadow", "tie"]


def _side(winner: str, first: Side) -> Side:
    if winner == "tie":
        return "tie"
    second: Side = "shadow" if first == "primary" else "primary"
    return first if winner == "A" else second


@dataclass(frozen=True)
class Combined:
    winner: Side
    consistent: bool
    scores: signals.JudgeScores
    orders: tuple[Side, Side]


def combine(primary_first: OrderVerdict, shadow_first: OrderVerdict) -> Combined:
    """One verdict from both orders: agreement wins, disagreement is an inconsistent tie."""
    w1 = _side(primary_first.winner, "primary")
    w2 = _side(shadow_first.winner, "shadow")
    return Combined(
        winner=w1 if w1 == w2 else "tie",
        consistent=w1 == w2,
        scores=signals.JudgeScores(
            primary=primary_first.a.rubric_with(shadow_first.b),
            shadow=primary_first.b.rubric_with(shadow_first.a),
        ),
        orders=(w1, w2),
    )


# --------------------------------------------------------------------------------------------
# Budget and client


class TokenBucket:
    """At most ``rate_per_s`` acquisitions per second in the long run, bursts of ``capacity``.

    With capacity 1 (the judge's setting) calls are spaced ``1 / rate_per_s`` apart, which is
    also what rate-limited APIs like best. A waiter reserves its token when it arrives (the count
    may go negative) and sleeps off the deficit: first come, first served, without a lock, and a
    cancelled waiter's token stays spent, so cancellation can never let more calls through.
    """

    def __init__(
        self,
        rate_per_s: float,
        capacity: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """``clock`` and ``sleep`` go together (tests give a fake pair to check the spacing
        without waiting on real time)."""
        if rate_per_s <= 0 or capacity < 1:
            raise ValueError("a token bucket needs rate_per_s > 0 and capacity >= 1")
        self.rate = rate_per_s
        self.capacity = capacity
        self._clock = clock
        self._sleep = sleep
        self._tokens = capacity
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now

    async def acquire(self) -> None:
        """Take a token, waiting until it is due."""
        self._refill()
        self._tokens -= 1
        if self._tokens < 0:
            await self._sleep(-self._tokens / self.rate)


class JudgeClient:
    """Asks an OpenAI-compatible API (``openai.AsyncOpenAI``) for verdicts, within the budget.

    The SDK owns the transport: connection errors, 408, 409, 429 and 5xx answers are retried up
    to ``max_retries`` times with its backoff, waiting as long as a ``Retry-After`` asks; other
    refusals (400, 401, 403, 404) are final. This module owns what the SDK cannot know: a reply
    that is not the verdict asked for is retried (up to ``max_retries`` times) with what was
    wrong, and each of those calls waits for the budget. Transport retries are not budgeted
    calls: they answer the provider's own request to try again later.
    """

    def __init__(
        self,
        settings: Judge,
        api_key: str | None = None,
        bucket: TokenBucket | None = None,
    ) -> None:
        self.settings = settings
        # No key: no Authorization header at all (an endpoint inside the cluster may need none;
        # the SDK insists on some key, so it gets a placeholder that each call omits).
        self.client = openai.AsyncOpenAI(
            api_key=api_key or "none",
            base_url=settings.endpoint,
            timeout=settings.timeout_s,
            max_retries=settings.max_retries,
        )
        self._headers: dict[str, Any] = {} if api_key else {"Authorization": openai.Omit()}
        self.bucket = bucket or TokenBucket(settings.calls_per_minute / 60)
        self.calls = 0

    async def close(self) -> None:
        await self.client.close()

    async def _complete(self, messages: list[dict[str, str]]) -> str:
        """One budgeted call; the reply's text. A reply without text is an InvalidReply."""
        await self.bucket.acquire()
        self.calls += 1
        try:
            completion = await self.client.chat.completions.create(
                model=self.settings.model,
                messages=cast(Any, messages),
                temperature=0,
                response_format={"type": "json_object"},
                extra_headers=self._headers,
            )
        except openai.APIStatusError as err:
            detail = err.response.text[:200]
            raise JudgeFailed(f"judge endpoint answered HTTP {err.status_code}: {detail}") from None
        except openai.APIError as err:  # no reply at all, after the SDK's retries
            raise InvalidReply(f"no reply: {type(err).__name__}: {err}") from None
        # The SDK does not validate replies: a server not quite OpenAI's may leave fields out.
        choices = getattr(completion, "choices", None) or []
        message = getattr(choices[0], "message", None) if choices else None
        content = getattr(message, "content", None)
        if not isinstance(content, str):
            raise InvalidReply("the completion has no text content")
        return content

    async def verdict(self, prompt: str, answer_a: str, answer_b: str) -> OrderVerdict:
        """One order's verdict, retrying invalid replies; raises JudgeFailed when out of tries."""
        messages = judge_messages(prompt, answer_a, answer_b)
        problem = ""
        for _attempt in range(self.settings.max_retries + 1):
            try:
                text = await self._complete(messages)
            except InvalidReply as err:
                problem = str(err)
                continue
            try:
                return parse_reply(text)
            except InvalidReply as err:
                problem = str(err)
                # Say what was wrong: a judge fixes a format slip far more often than it repeats.
                messages = [
                    *messages[:2],
                    {"role": "assistant", "content": text[:4000]},
                    {
                        "role": "user",
                        "content": f"That reply was not usable ({problem[:300]}). "
                        "Reply with only the JSON object described.",
                    },
                ]
        raise JudgeFailed(f"no valid verdict in {self.settings.max_retries + 1} call(s): {problem}")

    async def compare(self, prompt: str, primary: str, shadow: str) -> Combined:
        """Both orders (concurrently, each within the budget), combined; when one fails the
        other is cancelled rather than left spending budget on a verdict nobody uses."""
        tasks = [
            asyncio.create_task(self.verdict(prompt, primary, shadow)),
            asyncio.create_task(self.verdict(prompt, shadow, primary)),
        ]
        try:
            first, second = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return combine(first, second)


# --------------------------------------------------------------------------------------------
# Pairs


@dataclass(frozen=True)
class Pair:
    """A captured pair with both answers, ready to judge."""

    request_id: str
    time_ms: int
    prompt: str
    primary_variant: str
    primary_answer: str
    shadow_variant: str
    shadow_answer: str

    @classmethod
    def from_fields(cls, request_id: str, primary: Any, shadow: Any) -> Pair | None:
        """None when either side failed or lacks text (nothing to compare)."""
        sides = (primary, shadow)
        if not all(isinstance(s, Mapping) for s in sides):
            return None
        if any(
            not isinstance(s.get("answer"), str)
            or not isinstance(s.get("variant"), str)
            or not isinstance(s.get("status"), int)
            or s["status"] >= 400
            for s in sides
        ):
            return None
        prompt = primary.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return None
        when = primary.get("time")
        return cls(
            request_id=request_id,
            time_ms=int(when * 1000) if isinstance(when, int | float) else int(time.time() * 1000),
            prompt=prompt,
            primary_variant=primary["variant"],
            primary_answer=primary["answer"],
            shadow_variant=shadow["variant"],
            shadow_answer=shadow["answer"],
        )


def sampled(request_id: str, share: float) -> bool:
    """Whether a pair is judged: a pure function of its id, so replicas of the worker agree."""
    digest = hashlib.blake2b(request_id.encode(), digest_size=8, person=b"extproc-jdg").digest()
    return int.from_bytes(digest, "big") % BUCKETS < share * BUCKETS / 100


def _json_or_none(raw: bytes | None) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


class PairFeed:
    """Pairs to judge, oldest first, each handed out once per process.

    A cursor over the pairs index (scored by time) stops at the oldest pair still waiting for its
    second side, so a slow shadow answer is not skipped; pairs already judged (after a restart)
    are recognised by their ``judge`` field.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        experiment: str,
        share: float,
        grace_s: float = PAIR_GRACE_S,
    ) -> None:
        self.redis = redis
        self.experiment = experiment
        self.share = share
        self.grace_s = grace_s
        self.cursor = 0.0
        self._done: dict[str, float] = {}

    async def poll(self) -> list[Pair]:
        index = keys.pairs(self.experiment)
        low = max(0.0, self.cursor - _SKEW_S)
        out: list[Pair] = []
        waiting: float | None = None
        last = self.cursor
        offset = 0
        now = time.time()
        while True:
            rows = cast(
                list[tuple[bytes, float]],
                await self.redis.zrangebyscore(
                    index, low, "+inf", start=offset, num=_PAGE, withscores=True
                ),
            )
            offset += len(rows)
            ids = [(raw.decode(), float(score)) for raw, score in rows]
            last = max([last, *(score for _, score in ids)])
            fresh = [(rid, score) for rid, score in ids if rid not in self._done]
            async with self.redis.pipeline(transaction=False) as pipe:
                for rid, _ in fresh:
                    pipe.hmget(
                        keys.pair(self.experiment, rid), "primary", "shadow", "judge", "judge_error"
                    )
                found = await pipe.execute() if fresh else []
            for (rid, score), (primary, shadow, judged, failed) in zip(fresh, found, strict=True):
                if judged is not None or failed is not None:
                    self._done[rid] = score
                elif primary is not None and shadow is not None:
                    self._done[rid] = score
                    pair = Pair.from_fields(rid, _json_or_none(primary), _json_or_none(shadow))
                    if pair is not None and sampled(rid, self.share):
                        out.append(pair)
                elif now - score > self.grace_s:
                    self._done[rid] = score  # one side never came (or the pair expired)
                elif waiting is None or score < waiting:
                    waiting = score
            if len(rows) < _PAGE:
                break
        self.cursor = waiting if waiting is not None else max(self.cursor, last)
        floor = self.cursor - _SKEW_S
        self._done = {rid: s for rid, s in self._done.items() if s >= floor}
        return out


# Record a verdict once, only while the pair exists (HSETNX on an expired pair would recreate it
# without a TTL), together with its signal: one script, one cluster slot (shared hash tag).
_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
if ARGV[3] ~= '' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'j', ARGV[3])
end
return 1
"""


class JudgeWorker:
    """Polls for complete pairs and judges them within the budget; one per experiment suffices
    (a second one is safe, but spends budget on pairs the first also judges)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        experiment: str,
        client: JudgeClient,
        poll_s: float = 1.0,
    ) -> None:
        self.redis = redis
        self.experiment = experiment
        self.client = client
        self.poll_s = poll_s
        self.feed = PairFeed(redis, experiment, client.settings.sample)
        self.judged = 0
        self.failed = 0
        self._record = redis.register_script(_RECORD)

    async def judge(self, pair: Pair) -> signals.JudgeSignal | None:
        """Judge one pair and record the outcome; the signal, or None when it failed."""
        key = keys.pair(self.experiment, pair.request_id)
        try:
            got = await self.client.compare(pair.prompt, pair.primary_answer, pair.shadow_answer)
        except JudgeFailed as err:
            self.failed += 1
            log.warning("%s: pair %s not judged: %s", self.experiment, pair.request_id, err)
            doc = json.dumps({"error": str(err)[:500], "time_ms": int(time.time() * 1000)})
            await self._record(
                keys=[key, keys.signals(self.experiment)], args=["judge_error", doc, "", 0]
            )
            return None
        signal = signals.JudgeSignal(
            time_ms=pair.time_ms,
            request_id=pair.request_id,
            primary=pair.primary_variant,
            shadow=pair.shadow_variant,
            winner=got.winner,
            scores=got.scores,
            consistent=got.consistent,
        )
        verdict = json.dumps(
            {
                "winner": got.winner,
                "consistent": got.consistent,
                "orders": list(got.orders),
                "scores": dataclasses.asdict(got.scores),
                "model": self.client.settings.model,
                "judged_at_ms": int(time.time() * 1000),
            }
        )
        stored = await self._record(
            keys=[key, keys.signals(self.experiment)],
            args=["judge", verdict, signals.to_json(signal), signals.STREAM_MAXLEN],
        )
        if not stored:
            return None  # expired meanwhile, or another worker was first
        self.judged += 1
        return signal

    async def _consume(self, queue: asyncio.Queue[Pair]) -> None:
        while True:
            # A cancel swallowed while judging (by redis-py) ends in the except below; without
            # this the consumer would wait on the queue forever and the worker never stop.
            raise_if_cancelled()
            pair = await queue.get()
            try:
                await self.judge(pair)
            except Exception:
                log.exception("%s: judging pair %s failed", self.experiment, pair.request_id)
            finally:
                queue.task_done()

    async def run(self) -> None:
        """Until cancelled. Redis trouble is logged and retried at the next poll."""
        queue: asyncio.Queue[Pair] = asyncio.Queue(maxsize=_CONCURRENT_PAIRS * 2)
        consumers = [asyncio.create_task(self._consume(queue)) for _ in range(_CONCURRENT_PAIRS)]
        try:
            while True:
                raise_if_cancelled()
                try:
                    for pair in await self.feed.poll():
                        await queue.put(pair)
                except (OSError, RedisError):
                    log.warning("%s: reading pairs failed", self.experiment, exc_info=True)
                await asyncio.sleep(self.poll_s)
        finally:
            for c in consumers:
                c.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*consumers, return_exceptions=True)
