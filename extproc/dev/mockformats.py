"""The stand-in's answers in each LLM API's wire format: the same answer (words or a tool call,
token counts, why it ended) as OpenAI chat completions, legacy completions, Responses, or an
Anthropic Messages reply, whole (JSON) or streamed (SSE), so the telemetry of every format can be
tested against one model whose knobs are known.

Each format renders an :class:`Answer`; the server (``mockmodel.py``) decides the answer and the
timing (a stream's head goes out with its first token, then one piece per token, then the tail).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Final, Protocol

__all__ = ["FORMATS", "Answer", "WireFormat"]


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    """One answer, whatever the format: its tokens (the pieces of a tool call's arguments when
    ``tool`` names the tool called), and its usage."""

    uid: str  # hex, unique per answer: the ids of its objects
    created: int
    model: str
    tokens: list[str]
    tool: str  # "" for a text answer
    cut: bool  # stopped at the request's token limit
    prompt_tokens: int
    cached_tokens: int | None  # prompt tokens reported as cache hits; None: not reported
    include_usage: bool  # chat and legacy completions streams: usage only when asked

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def call_id(self) -> str:
        return "call_" + self.uid[:24]


class WireFormat(Protocol):
    """One API's rendering of an answer."""

    def body(self, a: Answer) -> dict[str, Any]:
        """The whole answer (not streamed)."""

    def head(self, a: Answer) -> bytes:
        """The stream's events before the first token (sent with it)."""

    def piece(self, a: Answer, i: int) -> bytes:
        """The event of token ``i``."""

    def tail(self, a: Answer) -> bytes:
        """The stream's events after the last token."""


def _data(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _named(payload: dict[str, Any]) -> bytes:
    """An event as Responses and Anthropic stream them, named by an ``event:`` line."""
    return f"event: {payload['type']}\n".encode() + _data(payload)


_DONE: Final = b"data: [DONE]\n\n"


def _openai_usage(a: Answer) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": a.prompt_tokens,
        "completion_tokens": len(a.tokens),
        "total_tokens": a.prompt_tokens + len(a.tokens),
    }
    if a.cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": a.cached_tokens}
    return usage


# --- OpenAI chat completions -------------------------------------------------------------------


class ChatCompletions:
    """``/v1/chat/completions``."""

    @staticmethod
    def _finish(a: Answer) -> str:
        return "length" if a.cut else "tool_calls" if a.tool else "stop"

    def _chunk(self, a: Answer, delta: dict[str, Any], finish: str | None) -> bytes:
        payload: dict[str, Any] = {
            "id": "chatcmpl-" + a.uid,
            "object": "chat.completion.chunk",
            "created": a.created,
            "model": a.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if a.include_usage:
            # OpenAI sends "usage": null on every chunk once include_usage is on; consumers (our
            # own inspector first) must cope with that.
            payload["usage"] = None
        return _data(payload)

    def body(self, a: Answer) -> dict[str, Any]:
        reply: dict[str, Any] = {"role": "assistant", "content": a.text, "refusal": None}
        if a.tool:
            reply["content"] = None
            reply["tool_calls"] = [
                {
                    "id": a.call_id,
                    "type": "function",
                    "function": {"name": a.tool, "arguments": a.text},
                }
            ]
        return {
            "id": "chatcmpl-" + a.uid,
            "object": "chat.completion",
            "created": a.created,
            "model": a.model,
            "choices": [
                {"index": 0, "message": reply, "logprobs": None, "finish_reason": self._finish(a)}
            ],
            "usage": _openai_usage(a),
        }

    def head(self, a: Answer) -> bytes:
        # The role chunk travels with the first token, as with vLLM: no early byte that a
        # first-body-byte measurement would mistake for the first token.
        return self._chunk(a, {"role": "assistant", "content": None if a.tool else ""}, None)

    def piece(self, a: Answer, i: int) -> bytes:
        """Text, or a fragment of the call's arguments (as OpenAI streams them: the call's id,
        type and name with the first, only ``index`` after)."""
        if not a.tool:
            return self._chunk(a, {"content": a.tokens[i]}, None)
        call: dict[str, Any] = {"index": 0, "function": {"arguments": a.tokens[i]}}
        if i == 0:
            call = {"index": 0, "id": a.call_id, "type": "function"}
            call["function"] = {"name": a.tool, "arguments": a.tokens[i]}
        return self._chunk(a, {"tool_calls": [call]}, None)

    def tail(self, a: Answer) -> bytes:
        out = self._chunk(a, {}, self._finish(a))
        if a.include_usage:
            final = {
                "id": "chatcmpl-" + a.uid,
                "object": "chat.completion.chunk",
                "created": a.created,
                "model": a.model,
                "choices": [],
                "usage": _openai_usage(a),
            }
            out += _data(final)
        return out + _DONE


# --- OpenAI legacy completions -----------------------------------------------------------------


class Completions:
    """``/v1/completions``: text only (a tool call is not of this API)."""

    def _object(self, a: Answer, text: str, finish: str | None) -> dict[str, Any]:
        return {
            "id": "cmpl-" + a.uid,
            "object": "text_completion",
            "created": a.created,
            "model": a.model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        }

    def body(self, a: Answer) -> dict[str, Any]:
        out = self._object(a, a.text, "length" if a.cut else "stop")
        out["usage"] = _openai_usage(a)
        return out

    def head(self, a: Answer) -> bytes:
        return b""

    def piece(self, a: Answer, i: int) -> bytes:
        return _data(self._object(a, a.tokens[i], None))

    def tail(self, a: Answer) -> bytes:
        out = _data(self._object(a, "", "length" if a.cut else "stop"))
        if a.include_usage:
            final = self._object(a, "", None)
            final.update(choices=[], usage=_openai_usage(a))
            out += _data(final)
        return out + _DONE


# --- OpenAI Responses ----------------------------------------------------------------------------


class Responses:
    """``/v1/responses``: one output item, a message with one ``output_text`` part, or a
    ``function_call``; usage in the body and in the stream's ``response.completed``."""

    def _item(self, a: Answer, done: bool) -> dict[str, Any]:
        status = "completed" if done else "in_progress"
        if a.tool:
            return {
                "id": "fc_" + a.uid,
                "type": "function_call",
                "status": status,
                "call_id": a.call_id,
                "name": a.tool,
                "arguments": a.text if done else "",
            }
        content = [{"type": "output_text", "text": a.text, "annotations": []}] if done else []
        return {
            "id": "msg_" + a.uid,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def _response(self, a: Answer, done: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": "resp_" + a.uid,
            "object": "response",
            "created_at": a.created,
            "status": ("incomplete" if a.cut else "completed") if done else "in_progress",
            "incomplete_details": {"reason": "max_output_tokens"} if done and a.cut else None,
            "model": a.model,
            "output": [self._item(a, True)] if done else [],
            "text": {"format": {"type": "text"}},
            "usage": None,
        }
        if done:
            usage: dict[str, Any] = {"input_tokens": a.prompt_tokens}
            if a.cached_tokens is not None:
                usage["input_tokens_details"] = {"cached_tokens": a.cached_tokens}
            usage.update(
                output_tokens=len(a.tokens),
                output_tokens_details={"reasoning_tokens": 0},
                total_tokens=a.prompt_tokens + len(a.tokens),
            )
            out["usage"] = usage
        return out

    def body(self, a: Answer) -> dict[str, Any]:
        return self._response(a, True)

    def head(self, a: Answer) -> bytes:
        out = _named({"type": "response.created", "response": self._response(a, False)})
        item = {"type": "response.output_item.added", "output_index": 0}
        out += _named({**item, "item": self._item(a, False)})
        if not a.tool:
            part = {"type": "output_text", "text": "", "annotations": []}
            added = {"type": "response.content_part.added", "item_id": "msg_" + a.uid}
            out += _named({**added, "output_index": 0, "content_index": 0, "part": part})
        return out

    def piece(self, a: Answer, i: int) -> bytes:
        where: dict[str, Any]
        if a.tool:
            kind, where = "response.function_call_arguments.delta", {"item_id": "fc_" + a.uid}
        else:
            kind = "response.output_text.delta"
            where = {"item_id": "msg_" + a.uid, "content_index": 0}
        return _named({"type": kind, **where, "output_index": 0, "delta": a.tokens[i]})

    def tail(self, a: Answer) -> bytes:
        out = b""
        if not a.tool:
            done = {"type": "response.output_text.done", "item_id": "msg_" + a.uid}
            out += _named({**done, "output_index": 0, "content_index": 0, "text": a.text})
        item = {"type": "response.output_item.done", "output_index": 0}
        out += _named({**item, "item": self._item(a, True)})
        kind = "response.incomplete" if a.cut else "response.completed"
        return out + _named({"type": kind, "response": self._response(a, True)})


# --- Anthropic Messages ----------------------------------------------------------------------


class Messages:
    """``/v1/messages``: one content block, text or a ``tool_use``. As Anthropic counts them,
    ``input_tokens`` are the prompt tokens not read from the cache."""

    def _usage(self, a: Answer, output_tokens: int) -> dict[str, Any]:
        cached = a.cached_tokens or 0
        usage: dict[str, Any] = {"input_tokens": a.prompt_tokens - cached}
        if a.cached_tokens is not None:
            usage.update(cache_creation_input_tokens=0, cache_read_input_tokens=cached)
        usage["output_tokens"] = output_tokens
        return usage

    @staticmethod
    def _stop(a: Answer) -> str:
        return "max_tokens" if a.cut else "tool_use" if a.tool else "end_turn"

    def _block(self, a: Answer, done: bool) -> dict[str, Any]:
        if not a.tool:
            return {"type": "text", "text": a.text if done else ""}
        arguments: object = {}
        if done:
            try:
                arguments = json.loads(a.text)
            except ValueError:  # cut at the token limit: what a client could parse of it
                arguments = {}
        return {"type": "tool_use", "id": "toolu_" + a.uid[:24], "name": a.tool, "input": arguments}

    def body(self, a: Answer) -> dict[str, Any]:
        return {
            "id": "msg_" + a.uid,
            "type": "message",
            "role": "assistant",
            "model": a.model,
            "content": [self._block(a, True)],
            "stop_reason": self._stop(a),
            "stop_sequence": None,
            "usage": self._usage(a, len(a.tokens)),
        }

    def head(self, a: Answer) -> bytes:
        message = {**self.body(a), "content": [], "stop_reason": None, "usage": self._usage(a, 1)}
        out = _named({"type": "message_start", "message": message})
        block = {"type": "content_block_start", "index": 0, "content_block": self._block(a, False)}
        return out + _named(block)

    def piece(self, a: Answer, i: int) -> bytes:
        if a.tool:
            delta = {"type": "input_json_delta", "partial_json": a.tokens[i]}
        else:
            delta = {"type": "text_delta", "text": a.tokens[i]}
        return _named({"type": "content_block_delta", "index": 0, "delta": delta})

    def tail(self, a: Answer) -> bytes:
        delta = {"stop_reason": self._stop(a), "stop_sequence": None}
        return (
            _named({"type": "content_block_stop", "index": 0})
            + _named(
                {"type": "message_delta", "delta": delta, "usage": {"output_tokens": len(a.tokens)}}
            )
            + _named({"type": "message_stop"})
        )


FORMATS: Final[dict[str, WireFormat]] = {
    "/v1/chat/completions": ChatCompletions(),
    "/v1/completions": Completions(),
    "/v1/responses": Responses(),
    "/v1/messages": Messages(),
}
"""Each API's format, by the path the stand-in serves it on."""
