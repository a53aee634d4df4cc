"""Where each LLM API keeps what the telemetry reads: answer text, tool calls, usage, finish.

A response is recognised by what its body says, not by the request's path (proxies and gateways
rewrite paths, and the native plane's Lua filter never sees the request): the first event of a
stream, or the body, that names a format decides it. The native plane's ``inspect.lua`` applies
the same rules to the raw text (its ``FORMATS`` and ``format_of``), so both planes agree on what
a response said; a change here is a change there.

==================  =====================================  ==================================
format              answer text (stream / body)            usage, finish
==================  =====================================  ==================================
chat completions    ``choices[].delta.content`` (or        ``prompt_tokens``,
                    ``refusal``) / ``choices[0].message``  ``completion_tokens``,
                                                           ``finish_reason``
legacy completions  ``choices[].text``                     as chat completions
Responses           ``response.output_text.delta`` events  ``input_tokens``, ``output_tokens``
                    / the first ``output_text`` part       (``response.completed``)
Anthropic Messages  ``text_delta`` deltas / the first      ``input_tokens`` (``message_start``),
                    ``text`` block                         ``output_tokens``, ``stop_reason``
==================  =====================================  ==================================

A body in none of these gets timing only (``API_FORMAT_UNKNOWN``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from extproc.telemetry.v1.event_pb2 import ApiFormat

__all__ = ["Format", "Sink", "detect"]


class Sink(Protocol):
    """What a format reader reports to; the response inspector implements it."""

    def on_text(self, piece: str, keep: bool) -> None:
        """Answer text (the first token, when it is the first); ``keep``: of the first choice,
        the one whose text the signals judge."""

    def on_usage(self, usage: dict[str, Any], prompt: str, completion: str) -> None:
        """A usage object, its counts under the names ``prompt`` and ``completion``."""

    def on_finish(self, reason: object) -> None:
        """Why the answer ended, if ``reason`` is a string."""


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


# --- OpenAI chat completions and legacy completions ----------------------------------------


def _chat_piece(choice: dict[str, Any]) -> object:
    delta = _dict(choice.get("delta"))
    content = delta.get("content")
    # A refusal streams in its own field; the user sees it as the answer all the same.
    return content if isinstance(content, str) and content else delta.get("refusal")


def _completion_piece(choice: dict[str, Any]) -> object:
    return choice.get("text")


def _choices_event(piece: Callable[[dict[str, Any]], object]) -> Callable[[Any, Sink], None]:
    def event(obj: dict[str, Any], sink: Sink) -> None:
        for choice in _list(obj.get("choices")):
            if isinstance(choice, dict):
                text = piece(choice)
                if isinstance(text, str) and text:
                    sink.on_text(text, choice.get("index", 0) == 0)
                sink.on_finish(choice.get("finish_reason"))
        _openai_usage(obj, sink)

    return event


def _openai_usage(obj: dict[str, Any], sink: Sink) -> None:
    usage = obj.get("usage")
    if isinstance(usage, dict):
        sink.on_usage(usage, "prompt_tokens", "completion_tokens")


def _chat_text(choice: dict[str, Any]) -> object:
    message = _dict(choice.get("message"))
    content = message.get("content")
    return content if isinstance(content, str) else message.get("refusal")


def _choices_body(text: Callable[[dict[str, Any]], object]) -> Callable[[Any, Sink], None]:
    def body(obj: dict[str, Any], sink: Sink) -> None:
        _openai_usage(obj, sink)
        for index, choice in enumerate(_list(obj.get("choices"))):
            if isinstance(choice, dict):
                sink.on_finish(choice.get("finish_reason"))
                answer = text(choice) if index == 0 else None
                if isinstance(answer, str):
                    sink.on_text(answer, True)

    return body


# --- OpenAI Responses ------------------------------------------------------------------------


def _responses_event(obj: dict[str, Any], sink: Sink) -> None:
    kind = obj.get("type")
    if kind == "response.output_text.delta":
        delta = obj.get("delta")
        if isinstance(delta, str) and delta:
            sink.on_text(delta, True)
    usage = _dict(obj.get("response")).get("usage")  # response.completed (and .incomplete)
    if isinstance(usage, dict):
        sink.on_usage(usage, "input_tokens", "output_tokens")


def _responses_body(obj: dict[str, Any], sink: Sink) -> None:
    usage = obj.get("usage")
    if isinstance(usage, dict):
        sink.on_usage(usage, "input_tokens", "output_tokens")
    for item in _list(obj.get("output")):
        for part in _list(_dict(item).get("content")):
            part = _dict(part)
            if part.get("type") == "output_text" and isinstance(part.get("text"), str):
                sink.on_text(part["text"], True)
                return


# --- Anthropic Messages ------------------------------------------------------------------------


def _messages_event(obj: dict[str, Any], sink: Sink) -> None:
    kind = obj.get("type")
    if kind == "content_block_delta":
        delta = _dict(obj.get("delta"))
        text = delta.get("text")
        if delta.get("type") == "text_delta" and isinstance(text, str) and text:
            sink.on_text(text, True)
        return
    # message_start holds the prompt's usage, message_delta the answer's (cumulative).
    usage = obj.get("usage") if kind == "message_delta" else _dict(obj.get("message")).get("usage")
    if isinstance(usage, dict):
        sink.on_usage(usage, "input_tokens", "output_tokens")
    sink.on_finish(_dict(obj.get("delta")).get("stop_reason"))


def _messages_body(obj: dict[str, Any], sink: Sink) -> None:
    usage = obj.get("usage")
    if isinstance(usage, dict):
        sink.on_usage(usage, "input_tokens", "output_tokens")
    sink.on_finish(obj.get("stop_reason"))
    for block in _list(obj.get("content")):
        block = _dict(block)
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            sink.on_text(block["text"], True)
            return


# --- the table ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Format:
    """One API's readers, and the cheap byte tests that spare decoding most stream events."""

    api: ApiFormat.ValueType
    text_mark: re.Pattern[bytes]
    """An event where this is not found carries no answer text (no need to decode it for that)."""
    tool: re.Pattern[bytes] | None
    """The mark of a tool call in an event or body (as inspect.lua finds it)."""
    event: Callable[[Any, Sink], None]
    body: Callable[[Any, Sink], None]


CHAT: Final = Format(
    ApiFormat.API_FORMAT_CHAT_COMPLETIONS,
    re.compile(rb'"content"|"refusal"'),
    re.compile(rb'"tool_calls"\s*:\s*\[\s*\{'),
    _choices_event(_chat_piece),
    _choices_body(_chat_text),
)
COMPLETIONS: Final = Format(
    ApiFormat.API_FORMAT_COMPLETIONS,
    re.compile(rb'"text"'),
    None,
    _choices_event(_completion_piece),
    _choices_body(_completion_piece),
)
RESPONSES: Final = Format(
    ApiFormat.API_FORMAT_RESPONSES,
    re.compile(rb'"response\.output_text\.delta"'),
    re.compile(rb'"type"\s*:\s*"function_call"'),
    _responses_event,
    _responses_body,
)
MESSAGES: Final = Format(
    ApiFormat.API_FORMAT_MESSAGES,
    re.compile(rb'"text_delta"'),
    re.compile(rb'"type"\s*:\s*"tool_use"'),
    _messages_event,
    _messages_body,
)


_OBJECTS: Final = {
    "chat.completion": CHAT,
    "chat.completion.chunk": CHAT,
    "text_completion": COMPLETIONS,
    "response": RESPONSES,
}


def detect(obj: dict[str, Any]) -> Format | None:
    """The format a decoded event or body names, else None, as inspect.lua's ``format_of``
    decides: by its ``object``, else its event ``type`` (Responses' ``response.*``, Anthropic's
    ``message*``), else the shape of its first choice (a server that names no object)."""
    named = obj.get("object")
    if isinstance(named, str) and named in _OBJECTS:
        return _OBJECTS[named]
    kind = obj.get("type")
    if isinstance(kind, str) and kind.startswith("response."):
        return RESPONSES
    if isinstance(kind, str) and kind.startswith("message"):
        return MESSAGES
    for choice in _list(obj.get("choices"))[:1]:
        choice = _dict(choice)
        if isinstance(choice.get("delta"), dict) or isinstance(choice.get("message"), dict):
            return CHAT
        if "text" in choice:
            return COMPLETIONS
    return None
