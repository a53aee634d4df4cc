"""A model server stand-in with knobs for the regressions a rollout must catch.

It speaks OpenAI chat completions, legacy completions and Responses, and Anthropic Messages, each
on its API's path, whole or streamed (``mockformats.py``); every knob works in each.

A regressed model still answers ``200 OK``; what changes is latency, time to first token, length,
error and refusal rates, and how often it calls the tools a request offers (an agent's model that
stops calling tools answers in prose instead). This server makes each of those a setting, so that
dry runs and integration tests can put a "good" and a "bad" variant behind a real Envoy and check
that the sidecar and the evaluator see the difference. Settings can change while it runs (``POST
/admin/behaviour``), so a test can make a canary go bad mid-experiment without restarting anything.

The words of an answer are deterministic in the prompt (a run of a lorem-like vocabulary starting at
a point chosen by a hash of the prompt), so two variants answer the same prompt with the same words
and a shadow comparison sees only what the settings change. The length is drawn per request around
the configured mean: the evaluator's statistics need variance, even when a load generator repeats
one prompt.

With ``--judge-prefers`` it stands in for the judge model of ``extproc quality`` instead: every
answer is a deterministic JSON verdict on the two answers in the prompt. ``GET /admin/requests``
lists the last requests received, so a test can check what a client really asked.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import random
import re
import time
import uuid
import zlib
from asyncio import sleep as _sleep
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from aiohttp import web

from extproc.dev.mockformats import FORMATS, Answer

__all__ = [
    "REFUSAL",
    "MockBehaviour",
    "add_arguments",
    "behaviour_from_args",
    "make_app",
    "serve",
]

_log = logging.getLogger(__name__)

REFUSAL: Final = "I'm sorry, but I can't help with that."
JUDGE_MODES: Final = ("", "longer", "first")
_RECORDED: Final = 1000

# A string split at import rather than a literal tuple: the vocabulary reads as text.
_VOCAB_TEXT: Final = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt "
    "ut labore et dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco "
    "laboris nisi aliquip ex ea commodo consequat duis aute irure in reprehenderit voluptate "
    "velit esse cillum fugiat nulla pariatur excepteur sint occaecat cupidatat non proident "
    "sunt culpa qui officia deserunt mollit anim id est laborum"
)
_VOCAB: Final = tuple(_VOCAB_TEXT.split())

# Which fields are which kind: the CLI, the admin endpoint and validation all derive from this, so
# a new knob is one line here plus the dataclass field.
_DELAY_FIELDS: Final = frozenset(
    {"latency_ms", "latency_jitter_ms", "tail_ms", "ttft_ms", "cold_ms"}
)
# Model servers take long prompts; aiohttp's 1 MiB default would answer 413 to a 10 MB one.
MAX_REQUEST_BYTES: Final = 64 * 1024 * 1024
_RATE_FIELDS: Final = frozenset(
    {
        "tail_rate",
        "error_rate",
        "refusal_rate",
        "tool_call_rate",
        "hang_rate",
        "cached_prompt_ratio",
    }
)
_FLOAT_FIELDS: Final = _DELAY_FIELDS | _RATE_FIELDS | {"tokens_per_s", "verbosity"}
_INT_FIELDS: Final = frozenset({"completion_tokens", "cold_requests"})


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclasses.dataclass(frozen=True, slots=True)
class MockBehaviour:
    """How the stand-in behaves; frozen so a request sees one consistent snapshot even when an
    admin call changes the settings halfway through its stream.

    The defaults are the fast mode (no delays at all), so tests and benchmarks pay nothing for
    settings they did not ask for.
    """

    name: str = dataclasses.field(
        default="mock-model",
        metadata=_help("model identity echoed in responses and in the x-mock-model header"),
    )
    latency_ms: float = dataclasses.field(
        default=0.0,
        metadata=_help("delay before the response headers (JSON) or before the first token (SSE)"),
    )
    latency_jitter_ms: float = dataclasses.field(
        default=0.0, metadata=_help("uniform +/- jitter added to --latency-ms")
    )
    tail_ms: float = dataclasses.field(
        default=0.0, metadata=_help("extra delay added with probability --tail-rate (slow tail)")
    )
    tail_rate: float = dataclasses.field(
        default=0.0, metadata=_help("probability of adding --tail-ms to a request")
    )
    ttft_ms: float = dataclasses.field(
        default=0.0, metadata=_help("extra time to first token when streaming")
    )
    cold_requests: int = dataclasses.field(
        default=0,
        metadata=_help(
            "a cold start: the first N chat requests since the start (or a stats reset) "
            "take --cold-ms longer"
        ),
    )
    cold_ms: float = dataclasses.field(
        default=0.0, metadata=_help("extra delay of each of the first --cold-requests requests")
    )
    tokens_per_s: float = dataclasses.field(
        default=0.0, metadata=_help("token generation rate; 0 = as fast as possible")
    )
    completion_tokens: int = dataclasses.field(
        default=32, metadata=_help("mean answer length in tokens (actual: uniform +/-50%%)")
    )
    verbosity: float = dataclasses.field(
        default=1.0, metadata=_help("multiplier on the answer length; 1.0 = normal")
    )
    error_rate: float = dataclasses.field(
        default=0.0, metadata=_help("probability of a 500 with an OpenAI-style error body")
    )
    refusal_rate: float = dataclasses.field(
        default=0.0, metadata=_help("probability that the answer is a refusal")
    )
    tool_call_rate: float = dataclasses.field(
        default=0.0,
        metadata=_help(
            "probability that the answer to a request offering tools is a call of one of them "
            "(tool_calls, finish_reason tool_calls) instead of text; never with tool_choice none"
        ),
    )
    hang_rate: float = dataclasses.field(
        default=0.0, metadata=_help("probability of never answering (for timeout tests)")
    )
    seed: int | None = dataclasses.field(
        default=None, metadata=_help("seed for reproducible randomness (default: unseeded)")
    )
    judge_prefers: str = dataclasses.field(
        default="",
        metadata=_help(
            "act as a pairwise judge (extproc.quality.llm_judge prompts): a JSON verdict "
            "preferring the 'longer' answer or the 'first' one shown (a position-biased judge); "
            "empty = off"
        ),
    )

    cached_prompt_ratio: float = dataclasses.field(
        default=0.0,
        metadata=_help(
            "share of the prompt's tokens reported as prompt-cache hits "
            "(usage.prompt_tokens_details.cached_tokens or each API's own, rounded down); "
            "0 = not reported, as by "
            "a server without prompt caching"
        ),
    )

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("name must be a non-empty string")
        # The name goes into a response header: refuse anything that could split or break it.
        if not (self.name.isascii() and self.name.isprintable()):
            raise ValueError("name must be printable ASCII")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number")
            value = float(value)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0")
            if name in _RATE_FIELDS and value > 1:
                raise ValueError(f"{name} must be between 0 and 1")
            object.__setattr__(self, name, value)
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ValueError("seed must be an integer or null")
        if self.judge_prefers not in JUDGE_MODES:
            raise ValueError(f"judge_prefers must be one of {JUDGE_MODES}")

    @property
    def fast(self) -> bool:
        """True when no request can ever sleep: what benchmarks of the proxy path want."""
        return self.tokens_per_s == 0 and all(getattr(self, f) == 0 for f in _DELAY_FIELDS)

    def updated(self, changes: Mapping[str, object]) -> MockBehaviour:
        """Apply a partial update from the admin endpoint, refusing unknown fields so a typo in a
        test fails loudly instead of silently leaving the old behaviour in place."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown behaviour field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# CLI


def _non_negative(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _rate(text: str) -> float:
    value = _non_negative(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``--host``, ``--port`` and one flag per :class:`MockBehaviour` field."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on; 0 = any free")
    for f in dataclasses.fields(MockBehaviour):
        flag = "--" + f.name.replace("_", "-")
        kind: Callable[[str], object]
        if f.name in _RATE_FIELDS:
            kind = _rate
        elif f.name in _FLOAT_FIELDS:
            kind = _non_negative
        elif f.name in _INT_FIELDS:
            kind = _count
        elif f.name == "seed":
            kind = int
        else:
            kind = str
        choices = JUDGE_MODES[1:] if f.name == "judge_prefers" else None  # "" is the default
        parser.add_argument(
            flag, type=kind, default=f.default, choices=choices, help=f.metadata["help"]
        )
    parser.add_argument(
        "--fast",
        action="store_true",
        help="force every delay to zero (no sleeps at all), whatever the other flags say",
    )


def behaviour_from_args(ns: argparse.Namespace) -> MockBehaviour:
    """Build the behaviour from parsed flags; raises ValueError on invalid combinations."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(MockBehaviour)}
    if getattr(ns, "fast", False):
        values.update(dict.fromkeys(_DELAY_FIELDS, 0.0), tokens_per_s=0.0)
    return MockBehaviour(**values)


# --------------------------------------------------------------------------------------------
# Requests


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclasses.dataclass(frozen=True, slots=True)
class _ChatRequest:
    prompt_text: str
    prompt_tokens: int
    stream: bool
    include_usage: bool
    max_tokens: int | None
    json_mode: bool
    # Names of the tools offered (``tools``), empty when none may be called (``tool_choice``
    # ``none``): what a tool call can name.
    tools: tuple[str, ...] = ()


def _message_text(where: str, message: object) -> str:
    """The text of one message; ``where`` is its path in the request (``messages[0]``)."""
    if not isinstance(message, dict):
        raise _BadRequest(f"{where} must be an object", where)
    if not isinstance(message.get("role"), str):
        raise _BadRequest(f"{where}.role must be a string", f"{where}.role")
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if not isinstance(part, dict):
                raise _BadRequest(f"{where}.content parts must be objects", f"{where}.content")
            text = part.get("text")
            if isinstance(text, str):
                parts.append(text)
        return " ".join(parts)
    raise _BadRequest(f"{where}.content must be a string, an array or null", f"{where}.content")


def _tool_names(body: dict[str, Any]) -> tuple[str, ...]:
    """The names of the tools a request offers, in its order: a function tool's
    ``function.name`` (Chat Completions), else a ``name`` of its own (Responses, Anthropic, other
    tool kinds)."""
    tools = body.get("tools")
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise _BadRequest("tools must be an array", "tools")
    names: list[str] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise _BadRequest(f"tools[{i}] must be an object", f"tools[{i}]")
        function = tool.get("function")
        name = function.get("name") if isinstance(function, dict) else tool.get("name")
        names.append(name if isinstance(name, str) and name else "tool")
    # tool_choice "none" (Anthropic: {"type": "none"}) forbids calls; a choice naming a function
    # ("required", an object) allows them, and the rate decides as for "auto".
    choice = body.get("tool_choice")
    forbidden = choice == "none" or (isinstance(choice, dict) and choice.get("type") == "none")
    return () if forbidden else tuple(names)


def _texts(path: str, body: dict[str, Any]) -> list[str]:
    """The prompt's texts, where each API puts them."""
    if path == "/v1/completions":
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return prompt
        raise _BadRequest("prompt must be a string or a non-empty array of strings", "prompt")
    key = "input" if path == "/v1/responses" else "messages"
    messages = body.get(key)
    if key == "input" and isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if messages is None:
        raise _BadRequest(f"Missing required parameter: '{key}'.", key)
    if not isinstance(messages, list) or not messages:
        raise _BadRequest(f"{key} must be a non-empty array", key)
    texts = [_message_text(f"{key}[{i}]", m) for i, m in enumerate(messages)]
    # Instructions outside the conversation: Responses' instructions, Anthropic's system.
    name = "instructions" if key == "input" else "system"
    extra = body.get(name) if path != "/v1/chat/completions" else None
    if isinstance(extra, str):
        texts.insert(0, extra)
    elif extra is not None:
        raise _BadRequest(f"{name} must be a string", name)
    return texts


def _json_mode(body: dict[str, Any]) -> bool:
    """Whether the request asks for JSON: chat's response_format, Responses' text.format."""
    param = "response_format"
    response_format = body.get(param)
    if isinstance(body.get("text"), dict):
        param, response_format = "text.format", body["text"].get("format")
    if response_format is None:
        return False
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise _BadRequest(
            f"{param}.type must be one of 'text', 'json_object', 'json_schema'", param
        )
    return bool(kind != "text")


def _parse_request(body: object, path: str = "/v1/chat/completions") -> _ChatRequest:
    """A request of the API served at ``path`` (see ``mockformats.FORMATS``)."""
    if not isinstance(body, dict):
        raise _BadRequest("The request body must be a JSON object.")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _BadRequest("model must be a string", "model")
    texts = _texts(path, body)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _BadRequest("stream must be a boolean", "stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _BadRequest("stream_options must be an object", "stream_options")
        flag = options.get("include_usage", False)
        if not isinstance(flag, bool):
            raise _BadRequest("stream_options.include_usage must be a boolean", "stream_options")
        include_usage = flag
    max_tokens: int | None = None
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _BadRequest(f"{key} must be an integer >= 1", key)
        max_tokens = value if max_tokens is None else min(max_tokens, value)
    # Legacy completions call no tools.
    tools = () if path == "/v1/completions" else _tool_names(body)
    prompt_text = "\n".join(texts)
    return _ChatRequest(
        prompt_text=prompt_text,
        prompt_tokens=len(prompt_text.split()),
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        json_mode=_json_mode(body),
        tools=tools,
    )


def _answer_tokens(prompt_text: str, words: int, json_mode: bool) -> list[str]:
    """Words deterministic in the prompt, so that variants answer one prompt with the same words."""
    start = zlib.crc32(prompt_text.encode("utf-8", "surrogatepass"))
    n = len(_VOCAB)
    tokens = [(" " if i else "") + _VOCAB[(start + i) % n] for i in range(words)]
    if tokens:
        tokens[0] = tokens[0].capitalize()
        tokens[-1] += "."
    if json_mode:
        # Two extra tokens for the wrapper, so a max_tokens cut yields invalid JSON, as it does
        # with real models.
        tokens = ['{"answer": "', *tokens, '"}']
    return tokens


def _tool_call(prompt_text: str, tools: tuple[str, ...]) -> tuple[str, list[str]]:
    """A call of one offered tool, deterministic in the prompt (as the words of an answer are):
    its name, and its JSON arguments in the pieces a stream sends them in (one per token)."""
    start = zlib.crc32(prompt_text.encode("utf-8", "surrogatepass"))
    query = " ".join(prompt_text.split()[:8])
    arguments = json.dumps({"query": query})
    pieces = re.findall(r"\S+\s*|\s+", arguments)
    return tools[start % len(tools)], pieces


def _judge_verdict(prompt_text: str, prefers: str) -> str:
    """A verdict in the format extproc.quality.llm_judge asks for, deterministic in the two
    answers."""
    from extproc.quality.llm_judge import ANSWER_A, ANSWER_B

    def answer(tag: str) -> str:
        found = re.search(f"<{tag}>\n(.*?)\n</{tag}>", prompt_text, re.DOTALL)
        return found.group(1) if found else ""

    a, b = answer(ANSWER_A), answer(ANSWER_B)
    if prefers == "first":
        winner = "A"
    else:
        winner = "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"

    def scores(side: str) -> dict[str, int]:
        n = 6 if winner == "tie" else 8 if winner == side else 5
        return {"accuracy": n, "clarity": n, "completeness": n}

    return json.dumps({"a": scores("A"), "b": scores("B"), "winner": winner})


def _refusal_tokens() -> list[str]:
    words = REFUSAL.split(" ")
    return [(" " if i else "") + w for i, w in enumerate(words)]


# --------------------------------------------------------------------------------------------
# Server state and responses


@dataclasses.dataclass(slots=True)
class _State:
    behaviour: MockBehaviour
    rng: random.Random
    started: int
    stopping: asyncio.Event
    requests: int = 0
    streamed: int = 0
    in_flight: int = 0
    outcomes: Counter[str] = dataclasses.field(default_factory=Counter)
    received: deque[dict[str, Any]] = dataclasses.field(
        default_factory=lambda: deque(maxlen=_RECORDED)
    )


_STATE: Final = web.AppKey("extproc_mockmodel_state", _State)

_SERVER_ERROR: Final = "The server had an error while processing your request. Sorry about that!"


def _error(
    status: int, message: str, kind: str, param: str | None = None, *, name: str | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    headers = {"x-mock-model": name} if name else None
    return web.json_response(body, status=status, headers=headers)


async def _pause(seconds: float) -> None:
    # Never call sleep for a zero delay: benchmarks of the proxy path must not pay for a loop turn.
    if seconds > 0:
        await _sleep(seconds)


def _first_delay(b: MockBehaviour, rng: random.Random) -> float:
    ms = b.latency_ms
    if b.latency_jitter_ms:
        ms += rng.uniform(-b.latency_jitter_ms, b.latency_jitter_ms)
    if b.tail_rate and rng.random() < b.tail_rate:
        ms += b.tail_ms
    return max(ms, 0.0) / 1000.0


def _answer_length(b: MockBehaviour, rng: random.Random) -> int:
    mean = b.completion_tokens * b.verbosity
    if mean <= 0:
        return 0
    # Uniform +/-50% around the mean: the evaluator's tests need variance, not just a shift.
    return max(1, int(rng.uniform(0.5, 1.5) * mean + 0.5))


async def _completions(request: web.Request) -> web.StreamResponse:
    """Every API's endpoint: the format is the path's (``mockformats.FORMATS``)."""
    state = request.app[_STATE]
    state.requests += 1
    state.in_flight += 1
    outcome = _Outcome()
    try:
        return await _answer(request, state, outcome)
    except Exception:
        outcome.value = "internal_error"
        raise
    finally:
        state.in_flight -= 1
        if outcome.value is not None:
            state.outcomes[outcome.value] += 1


class _Outcome:
    """What a request ended as; a holder because a cancellation (the client gave up) skips any
    return value, and then "disconnected" is the truth."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: str | None = "disconnected"


async def _answer(request: web.Request, state: _State, outcome: _Outcome) -> web.StreamResponse:
    b = state.behaviour
    rng = state.rng
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        outcome.value = "bad_request"
        return _error(413, exc.text or "Request too large.", "invalid_request_error", name=b.name)
    try:
        body = json.loads(raw)
        req = _parse_request(body, request.path)
    except (ValueError, RecursionError):
        outcome.value = "bad_request"
        message = "We could not parse the JSON body of your request."
        return _error(400, message, "invalid_request_error", name=b.name)
    except _BadRequest as exc:
        outcome.value = "bad_request"
        return _error(400, exc.message, "invalid_request_error", exc.param, name=b.name)
    if req.stream:
        state.streamed += 1
    state.received.append({"headers": dict(request.headers), "body": body})

    if b.hang_rate and rng.random() < b.hang_rate:
        # Counted now, not at the end, so a test can see the hang while the client still waits.
        state.outcomes["hang"] += 1
        outcome.value = None
        await state.stopping.wait()
        return _error(503, "Shutting down.", "server_error", name=b.name)
    delay = _first_delay(b, rng)
    if state.requests <= b.cold_requests:
        delay += b.cold_ms / 1000.0
    if b.error_rate and rng.random() < b.error_rate:
        await _pause(delay)
        outcome.value = "error"
        return _error(500, _SERVER_ERROR, "server_error", name=b.name)
    refused = not b.judge_prefers and bool(b.refusal_rate) and rng.random() < b.refusal_rate
    # No draw unless a call is possible: seeded runs without tools keep their sequence.
    calls = (
        not b.judge_prefers
        and not refused
        and bool(req.tools)
        and bool(b.tool_call_rate)
        and rng.random() < b.tool_call_rate
    )
    tool = ""
    if b.judge_prefers:
        tokens = [_judge_verdict(req.prompt_text, b.judge_prefers)]
    elif refused:
        tokens = _refusal_tokens()
    elif calls:
        # tokens are the pieces of the call's arguments; the answer has no text.
        tool, tokens = _tool_call(req.prompt_text, req.tools)
    else:
        tokens = _answer_tokens(req.prompt_text, _answer_length(b, rng), req.json_mode)
    cut = req.max_tokens is not None and len(tokens) > req.max_tokens
    if cut:
        tokens = tokens[: req.max_tokens]
    answered = "refusal" if refused else "tool_call" if calls else "ok"
    answer = Answer(
        uid=uuid.uuid4().hex,
        created=int(time.time()),
        model=b.name,
        tokens=tokens,
        tool=tool,
        cut=cut,
        prompt_tokens=req.prompt_tokens,
        cached_tokens=(
            math.floor(b.cached_prompt_ratio * req.prompt_tokens) if b.cached_prompt_ratio else None
        ),
        include_usage=req.include_usage,
    )
    wire = FORMATS[request.path]
    if not req.stream:
        if b.tokens_per_s:
            # A longer answer takes longer even unstreamed: verbosity regressions show as latency.
            delay += len(tokens) / b.tokens_per_s
        await _pause(delay)
        outcome.value = answered
        return web.json_response(wire.body(answer), headers={"x-mock-model": b.name})

    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "x-mock-model": b.name,
        }
    )
    await response.prepare(request)
    # Headers go out at once, as real servers do: time to first byte is not time to first token.
    await _pause(delay + b.ttft_ms / 1000.0)
    loop = asyncio.get_running_loop()
    interval = 1.0 / b.tokens_per_s if b.tokens_per_s else 0.0
    try:
        # The stream's head travels with the first token: no early byte that a first-body-byte
        # measurement would mistake for the first token.
        head = wire.head(answer)
        if tokens:
            head += wire.piece(answer, 0)
        await response.write(head)
        started = loop.time()
        for i in range(1, len(tokens)):
            if interval:
                await _pause(started + i * interval - loop.time())
            await response.write(wire.piece(answer, i))
        await response.write(wire.tail(answer))
        await response.write_eof()
    except ConnectionResetError:
        # The client went away; aiohttp finishes quietly when we return the prepared response.
        return response
    outcome.value = answered
    return response


async def _models(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    model = {
        "id": state.behaviour.name,
        "object": "model",
        "created": state.started,
        "owned_by": "extproc-mock",
    }
    return web.json_response({"object": "list", "data": [model]})


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _get_behaviour(request: web.Request) -> web.Response:
    return web.json_response(request.app[_STATE].behaviour.as_dict())


async def _set_behaviour(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    try:
        changes = json.loads(await request.read())
    except (ValueError, RecursionError):
        return _error(400, "The body must be a JSON object.", "invalid_request_error")
    if not isinstance(changes, dict):
        return _error(400, "The body must be a JSON object.", "invalid_request_error")
    try:
        behaviour = state.behaviour.updated(changes)
    except (TypeError, ValueError) as exc:
        return _error(400, str(exc), "invalid_request_error")
    state.behaviour = behaviour
    if "seed" in changes:
        state.rng.seed(behaviour.seed)
    return web.json_response(behaviour.as_dict())


async def _get_stats(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    return web.json_response(
        {
            "model": state.behaviour.name,
            "requests": state.requests,
            "streamed": state.streamed,
            "in_flight": state.in_flight,
            "outcomes": dict(state.outcomes),
        }
    )


async def _get_requests(request: web.Request) -> web.Response:
    """The last requests received (headers and JSON body), oldest first: what a test checks
    a client (the judge, the watchdog) really sent."""
    return web.json_response({"requests": list(request.app[_STATE].received)})


async def _reset_stats(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    state.requests = state.streamed = 0
    state.outcomes.clear()
    state.received.clear()
    return await _get_stats(request)


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _openai_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Every error a client can see is OpenAI-shaped JSON, so SDKs report it instead of choking."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        return _error(exc.status, exc.reason, kind)
    except Exception:
        _log.exception("mock model handler failed")
        return _error(500, _SERVER_ERROR, "server_error")


async def _on_shutdown(app: web.Application) -> None:
    app[_STATE].stopping.set()


def make_app(behaviour: MockBehaviour) -> web.Application:
    """The aiohttp application; separate from :func:`serve` so tests can mount it anywhere."""
    app = web.Application(middlewares=[_openai_errors], client_max_size=MAX_REQUEST_BYTES)
    app[_STATE] = _State(
        behaviour=behaviour,
        rng=random.Random(behaviour.seed),
        started=int(time.time()),
        stopping=asyncio.Event(),
    )
    for path in FORMATS:
        app.router.add_post(path, _completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/admin/behaviour", _get_behaviour)
    app.router.add_post("/admin/behaviour", _set_behaviour)
    app.router.add_get("/admin/stats", _get_stats)
    app.router.add_delete("/admin/stats", _reset_stats)
    app.router.add_get("/admin/requests", _get_requests)
    app.on_shutdown.append(_on_shutdown)
    return app


async def serve(
    host: str,
    port: int,
    behaviour: MockBehaviour,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Serve until cancelled; ``ready`` gets the bound port, so callers wait on it, not on time."""
    runner = web.AppRunner(
        make_app(behaviour),
        access_log=None,
        # A client that gives up (timeout tests, Envoy resets) cancels its handler at once.
        handler_cancellation=True,
        shutdown_timeout=2.0,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        if ready is not None:
            ready(int(runner.addresses[0][1]))
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
