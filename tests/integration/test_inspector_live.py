"""The compiled inspector against inspect.lua, in one real Envoy: two listeners, identical but for
the inspector, in front of one model server; each answer is fetched through both and the metadata
each wrote is compared key by key (the first-token time only for presence: it is a clock).

The bodies: every API format whole and streamed (text with escapes and non-ASCII, tool calls,
answers cut at the token limit, prompt-cache hits), bodies a client could not craft but a broken
or hostile model server could (unterminated strings, a backslash at the end of a chunk, NUL and
invalid UTF-8, a JSON body past the 64 KiB head, a stream whose text passes the kept length, no
body at all), and a few hundred generated from the pieces the inspectors look for, cut into
chunks at random places."""

from __future__ import annotations

import json
import os
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import httpx
import pytest
from envoy.config.accesslog.v3.accesslog_pb2 import AccessLog
from envoy.config.bootstrap.v3.bootstrap_pb2 import Admin, Bootstrap
from envoy.config.core.v3.substitution_format_string_pb2 import SubstitutionFormatString
from envoy.config.route.v3.route_components_pb2 import Route, RouteAction, RouteMatch, VirtualHost
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.extensions.access_loggers.file.v3.file_pb2 import FileAccessLog
from envoy.extensions.dynamic_modules.v3.dynamic_modules_pb2 import DynamicModuleConfig
from envoy.extensions.filters.http.dynamic_modules.v3.dynamic_modules_pb2 import (
    DynamicModuleFilter,
)
from envoy.extensions.filters.http.router.v3.router_pb2 import Router
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from google.protobuf.json_format import MessageToJson
from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import StringValue

from extproc.contract.clusters import socket_address, static_cluster, typed
from extproc.dataplane import accesslog
from extproc.dataplane.event import Observed
from extproc.dev import stack
from extproc.dev.mockformats import FORMATS, Answer
from extproc.envoyconf.common import http_listener
from extproc.envoyconf.inspector import (
    CHOICE_ENV,
    MODULE_NAME,
    SEARCH_PATH_ENV,
    inspect_filter,
)
from extproc.telemetry.v1.event_pb2 import TelemetryEvent
from tests.conftest import fixed_upstream, upstream_stack, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SSE = "text/event-stream"
JSON = "application/json"
Body = tuple[str, list[bytes]]  # content type, the pieces the server writes


def _answer(**changes: Any) -> Answer:
    base: dict[str, Any] = {
        "uid": "0123456789abcdef0123456789abcdef",
        "created": 1_700_000_000,
        "model": "m",
        "tokens": ["Hello", ', "wo\\rld"', " \u00e9t\u00e9 \u2603", " \U0001f600", "."],
        "tool": "",
        "cut": False,
        "prompt_tokens": 12,
        "cached_tokens": 4,
        "include_usage": True,
    }
    return Answer(**(base | changes))


def _format_bodies() -> dict[str, Body]:
    answers = {
        "text": _answer(),
        "tool": _answer(tool="lookup", tokens=['{"q":', ' "x"}']),
        "cut": _answer(cut=True, cached_tokens=None, include_usage=False),
        "refusal": _answer(tokens=["I", " can't", " help", " with", " that."]),
    }
    out: dict[str, Body] = {}
    for path, fmt in FORMATS.items():
        api = path.rsplit("/", 1)[1]
        for kind, a in answers.items():
            out[f"/{api}/{kind}/json"] = (JSON, [json.dumps(fmt.body(a)).encode()])
            pieces = [fmt.head(a) + fmt.piece(a, 0)]
            pieces += [fmt.piece(a, i) for i in range(1, len(a.tokens))]
            out[f"/{api}/{kind}/sse"] = (SSE, [*pieces, fmt.tail(a)])
    return out


def _hostile_bodies() -> dict[str, Body]:
    chat = b'{"object":"chat.completion","choices":[{"message":{"content":"'
    sse_chat = b'data: {"object":"chat.completion.chunk","choices":[{"delta":{"content":"'
    long_text = b"".join(sse_chat + f"piece {i} ".encode() * 20 + b'"}}]}\n\n' for i in range(60))
    chunked = [long_text[i : i + 4096] for i in range(0, len(long_text), 4096)]
    return {
        "/empty/json": (JSON, []),
        "/empty/sse": (SSE, []),
        "/unterminated/json": (JSON, [chat + b"never ends"]),
        "/unterminated/sse": (SSE, [sse_chat + b"no closing quote\n\n"]),
        "/backslash-at-cut/json": (JSON, [chat + b"a\\", b'"b" and more"}}]}']),
        "/backslash-at-cut/sse": (SSE, [sse_chat + b"a\\", b'"b"}}]}\n\n']),
        "/line-across-chunks/sse": (SSE, [sse_chat[:20], sse_chat[20:] + b"joined", b'"}}]}\n\n']),
        "/binary/json": (JSON, [bytes(range(256)) * 3]),
        "/invalid-utf8/json": (JSON, [chat + b"\xff\xfe\xc3" + b'"}}]}']),
        "/nul/sse": (SSE, [sse_chat + b"a\x00b" + b'"}}]}\n\n']),
        "/past-head/json": (JSON, [b'{"object":"chat.completion","pad":"' + b"x" * 70_000, b'"}']),
        "/text-past-kept/sse": (SSE, chunked),
        "/no-format/sse": (SSE, [b"data: {}\n\n" * 3]),
        "/object-not-word/json": (
            JSON, [b'{"object":"a-b","type":"message","content":[{"type":"text","text":"hi"}]}']
        ),
        "/choices-no-object/json": (JSON, [b'{"choices":[{"text":"plain"}]}']),
        "/choices-delta/sse": (SSE, [b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n']),
        "/anthropic-usage/sse": (
            SSE,
            [b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
             b'{"input_tokens": 33,"cache_read_input_tokens" :\t7}}}\n\n'],
        ),
        "/plain/text": ("text/plain", [b"just text"]),
        # The counts and the finish reason: the last believable count of each side, the cache
        # hits of the last count of them, reasons of at most 32 of [a-z_].
        "/usage-unbelievable/json": (
            JSON,
            [b'{"object":"chat.completion","choices":[{"message":{"content":"x"},'
             b'"finish_reason":"stop"}],"usage":{"prompt_tokens" :\n 0005,"completion_tokens":7,'
             b'"prompt_tokens":4294967296,"completion_tokens":99999999999999999999999,'
             b'"prompt_tokens_details":{"cached_tokens":3},"cache_read_input_tokens":4294967296}}'],
        ),
        "/usage-cached-last/json": (
            JSON,
            [b'{"type":"message","content":[{"type":"text","text":"hi"}],'
             b'"stop_reason":"end_turn","usage":{"input_tokens":9,"output_tokens":2,'
             b'"cache_read_input_tokens":1,"cached_tokens":6},"stop_reason":"x-y"}'],
        ),
        "/finish-too-long/json": (
            JSON,
            [b'{"object":"chat.completion","choices":[{"message":{"content":"x"},'
             b'"finish_reason":"' + b"a" * 33 + b'"finish_reason":"length"}]}'],
        ),
        "/finish-only-too-long/json": (
            JSON,
            [b'{"object":"text_completion","choices":[{"text":"x",'
             b'"finish_reason":"' + b"b" * 33 + b'"}]}'],
        ),
    }  # fmt: skip


# What the inspectors look for, and what surrounds it, for generated bodies.
_PIECES = [
    b'"object"', b'"type"', b'"content"', b'"text"', b'"delta"', b'"refusal"', b'"tool_calls"',
    b'"choices"', b'"message"', b'"output_text"', b'"response.output_text.delta"',
    b'"text_delta"', b'"function_call"', b'"tool_use"', b'"input_tokens"',
    b'"cache_read_input_tokens"', b'"prompt_tokens"', b'"completion_tokens"', b'"output_tokens"',
    b'"cached_tokens"', b'"finish_reason"', b'"stop_reason"', b'"stop"', b"4294967296",
    b'"chat.completion"', b'"chat.completion.chunk"',
    b'"text_completion"', b'"response"', b'"message_start"', b'"response.created"',
    b":", b" ", b"\t", b"\n", b"\n\n", b"data: ", b"{", b"}", b"[", b"]", b'"', b"\\", b'\\"',
    b"42", b"word", b"\xc3\xa9", b"\xff", b",",
]  # fmt: skip


def _generated_bodies(count: int, seed: int) -> dict[str, Body]:
    rng = random.Random(seed)
    out: dict[str, Body] = {}
    for i in range(count):
        body = b"".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 120)))
        cuts = sorted(rng.sample(range(len(body) + 1), min(3, len(body) + 1)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        out[f"/generated/{i}"] = (SSE if i % 2 else JSON, [p for p in pieces if p])
    return out


def _non_ascii_answers() -> dict[str, tuple[str, bytes | list[bytes]]]:
    """Raw UTF-8 answers longer than the kept text (so the text is cut, and the tail starts,
    inside a character), and one with bytes that are no UTF-8 at all."""
    text = "\u00e9\u2603\U0001f600" * 400  # 9 bytes a round: cuts land inside characters
    usage = {"prompt_tokens": 5, "completion_tokens": 1200, "total_tokens": 1205}
    whole = {
        "object": "chat.completion",
        "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": usage,
    }
    chunks = [
        "data: "
        + json.dumps(
            {
                "object": "chat.completion.chunk",
                "choices": [{"delta": {"content": text[i : i + 7]}}],
            },
            ensure_ascii=False,
        )
        + "\n\n"
        for i in range(0, len(text), 7)
    ]
    broken = b'{"object":"chat.completion","choices":[{"message":{"content":"\xff\xc3("}}]}'
    return {
        "/v1/chat/completions": (JSON, json.dumps(whole, ensure_ascii=False).encode()),
        "/stream/v1/chat/completions": (SSE, [c.encode() for c in chunks] + [b"data: [DONE]\n\n"]),
        "/broken/v1/chat/completions": (JSON, broken),
    }


BODIES = {
    **_format_bodies(),
    **_hostile_bodies(),
    **_generated_bodies(300, seed=7),
    **{f"/non-ascii{p}": body for p, body in _non_ascii_answers().items()},
}


MODULE_NAMESPACE = "extproc.module"  # the module's metadata, apart from the script's


@dataclass
class Inspected:
    url: str
    log: Path

    def entries(self) -> dict[str, dict[str, Any]]:
        """By path: what each inspector wrote ("lua", "module")."""
        if not self.log.exists():
            return {}
        # The last piece is a line Envoy may still be writing (or nothing).
        lines = self.log.read_text().split("\n")[:-1]
        return {e["path"]: e for e in map(json.loads, lines)}


def _manager(log: Path) -> hcm.HttpConnectionManager:
    """Both inspectors on one stream, so that both see the same frames of every body."""
    module = DynamicModuleFilter(
        dynamic_module_config=DynamicModuleConfig(name=MODULE_NAME),
        filter_name=MODULE_NAME,
        filter_config=typed(StringValue(value=MODULE_NAMESPACE)),
    )
    line = Struct()
    line.update(
        {
            "path": "%REQ(:PATH)%",
            "lua": "%DYNAMIC_METADATA(extproc)%",
            "module": f"%DYNAMIC_METADATA({MODULE_NAMESPACE})%",
        }
    )
    file_log = FileAccessLog(path=str(log), log_format=SubstitutionFormatString(json_format=line))
    route = Route(match=RouteMatch(prefix="/"), route=RouteAction(cluster="model"))
    manager = hcm.HttpConnectionManager(
        stat_prefix="inspectors",
        route_config=RouteConfiguration(
            virtual_hosts=[VirtualHost(name="all", domains=["*"], routes=[route])]
        ),
        http_filters=[
            inspect_filter("lua"),
            hcm.HttpFilter(name="module", typed_config=typed(module)),
            hcm.HttpFilter(name="envoy.filters.http.router", typed_config=typed(Router())),
        ],
    )
    manager.access_log.append(AccessLog(name="file", typed_config=typed(file_log)))
    return manager


@pytest.fixture(scope="module")
def inspected(
    tmp_path_factory: pytest.TempPathFactory, inspector_module: Path
) -> Iterator[Inspected]:
    tmp = tmp_path_factory.mktemp("inspectors")
    with fixed_upstream(BODIES) as upstream:
        port, admin = stack.free_port(), stack.free_port()
        log = tmp / "access.log"
        boot = Bootstrap(
            admin=Admin(address=socket_address(f"127.0.0.1:{admin}")),
            static_resources=Bootstrap.StaticResources(
                listeners=[http_listener("llm", f"127.0.0.1:{port}", _manager(log))],
                clusters=[static_cluster("model", upstream, http2=False, timeout_ms=2_000)],
            ),
        )
        cfg = tmp / "envoy.json"
        cfg.write_text(MessageToJson(boot))
        argv = [stack.envoy_binary(), "-c", str(cfg), "--disable-hot-restart"]
        argv += ["--concurrency", "1", "--file-flush-interval-msec", "20"]
        env = {**os.environ, SEARCH_PATH_ENV: str(inspector_module)}
        with open(tmp / "envoy.out", "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for(stack.http_ok(f"http://127.0.0.1:{admin}/ready"), "envoy ready", timeout_s=30)
            yield Inspected(f"http://127.0.0.1:{port}", log)
            # Whatever the bodies, the module never took Envoy down.
            assert proc.poll() is None, (tmp / "envoy.out").read_text()[-2000:]
        finally:
            proc.terminate()
            proc.wait(10)


def test_the_module_writes_what_the_lua_script_writes(inspected: Inspected) -> None:
    with httpx.Client(timeout=10) as client:
        for path in BODIES:
            assert client.post(inspected.url + path, content=b"{}").status_code == 200, path

    def logged() -> dict[str, dict[str, Any]] | None:
        got = inspected.entries()
        return got if len(got) == len(BODIES) else None

    got = wait_for(logged, "an access-log line per request")
    differ = {}
    for path in BODIES:
        lua, module = got[path]["lua"] or {}, got[path]["module"] or {}
        assert ("first_token_us" in lua) == ("first_token_us" in module), path
        lua.pop("first_token_us", None)
        module.pop("first_token_us", None)
        if lua != module:
            differ[path] = {k: (lua.get(k), module.get(k)) for k in lua.keys() | module.keys()}
    assert not differ


def test_the_inspectors_find_the_counts_the_sidecar_read_from_the_tail(
    inspected: Inspected,
) -> None:
    """Earlier releases' inspectors sent the body's last 1 KiB and the sidecar read the usage and
    finish reason from it (``accesslog._tail_usage``, kept for an Envoy still configured by
    one); the inspectors now find them. Over every body: the same counts and reasons, wherever
    the tail has them (without, an SSE stream's first event may supply a count)."""
    with httpx.Client(timeout=10) as client:
        for path in BODIES:
            assert client.post(inspected.url + path, content=b"{}").status_code == 200, path

    def logged() -> dict[str, dict[str, Any]] | None:
        got = inspected.entries()
        return got if len(got) >= len(BODIES) else None

    got = wait_for(logged, "an access-log line per request")
    compared = 0
    for path, (_, body) in BODIES.items():
        module = got[path]["module"] or {}
        known = accesslog._FORMATS.get(module.get("format", ""))
        if known is None:  # no format: no counts from either
            assert not {"prompt_tokens", "completion_tokens", "finish_reason"} & module.keys()
            continue
        whole = body if isinstance(body, bytes) else b"".join(body)
        tail = whole[-1024:].decode("utf-8", "replace")
        seen = Observed()
        accesslog._tail_usage(seen, Struct(), tail, known[1], known[2])
        assert module.get("completion_tokens") == seen.completion_tokens, path
        assert module.get("finish_reason", "") == seen.finish_reason, path
        if seen.prompt_tokens is not None:
            assert module.get("prompt_tokens") == seen.prompt_tokens, path
        if accesslog._CACHED.search(tail):
            assert module.get("cached_prompt_tokens") == seen.cached_prompt_tokens, path
        compared += 1
    assert compared > len(_format_bodies())  # generated and hostile bodies too, not only those


def test_what_the_module_finds_in_each_format(inspected: Inspected) -> None:
    """Not only agreement: the fields themselves, for some of the formats' answers."""
    paths = (
        "/completions/text/sse", "/messages/tool/json", "/messages/text/sse",
        "/usage-unbelievable/json", "/usage-cached-last/json", "/finish-too-long/json",
        "/finish-only-too-long/json",
    )  # fmt: skip
    with httpx.Client(timeout=10) as client:
        for path in paths:
            assert client.post(inspected.url + path, content=b"{}").status_code == 200

    def logged() -> dict[str, dict[str, Any]] | None:
        got = {p: e["module"] for p, e in inspected.entries().items()}
        return got if all(p in got for p in paths) else None

    got = wait_for(logged, "the module's access-log lines")
    text = got["/completions/text/sse"]
    assert text["format"] == "completions"
    assert text["text"] == 'Hello, \\"wo\\\\rld\\" \\u00e9t\\u00e9 \\u2603 \\ud83d\\ude00.'
    assert text["first_token_us"] > 1.7e15
    assert (text["prompt_tokens"], text["completion_tokens"]) == (12, 5)
    assert (text["cached_prompt_tokens"], text["finish_reason"]) == (4, "stop")
    assert "tail" not in text  # the counts, not the body's last 1 KiB
    assert got["/messages/tool/json"]["tool_calls"] is True
    stream = got["/messages/text/sse"]
    # Anthropic counts cache hits apart from input_tokens: 12 prompt tokens, 4 of them cached.
    assert (stream["format"], stream["prompt_tokens"], stream["cached_prompt_tokens"]) == (
        "messages",
        8,
        4,
    )
    assert stream["finish_reason"] == "end_turn"
    assert got["/usage-unbelievable/json"] == {
        "format": "chat", "text": "x", "first_token_us": ANY,
        "prompt_tokens": 5, "completion_tokens": 7, "finish_reason": "stop",
    }  # fmt: skip
    assert got["/usage-cached-last/json"] == {
        "format": "messages", "text": "hi", "first_token_us": ANY,
        "prompt_tokens": 9, "completion_tokens": 2, "cached_prompt_tokens": 6,
        "finish_reason": "end_turn",
    }  # fmt: skip
    assert got["/finish-too-long/json"]["finish_reason"] == "length"
    assert "finish_reason" not in got["/finish-only-too-long/json"]


@pytest.mark.parametrize("kind", ["lua", "module"])
def test_answers_in_any_bytes_lose_no_event(
    kind: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    http: httpx.Client,
    request: pytest.FixtureRequest,
) -> None:
    """The access log carries the inspector's strings in protobuf string fields, which must be
    UTF-8; one bad string would fail its whole message, every other request's entry with it.
    Through a real stack (``dataplane: native``, the sidecar decoding the access log): every
    request an event, the answer's length counted, whatever the body's bytes."""
    if kind == "module":
        request.getfixturevalue("inspector_module")  # skips where it cannot be built
    monkeypatch.setenv(CHOICE_ENV, kind)
    with upstream_stack(tmp_path, "native", _non_ascii_answers()) as s:
        assert s.state["inspector"]["kind"] == kind
        ids: dict[str, str] = {}
        for prefix in ("", "/stream", "/broken") * 4:
            r = http.post(
                f"{s.listener}{prefix}/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.status_code == 200, r.text
            ids[r.headers["x-request-id"]] = prefix

        def found() -> dict[str, TelemetryEvent] | None:
            got = {e.request_id: e for e in s.events() if e.request_id in ids}
            return got if len(got) == len(ids) else None

        events = wait_for(found, "an event for every request")
        for rid, prefix in ids.items():
            ev = events[rid]
            assert ev.status == 200
            if prefix != "/broken":
                assert ev.answer_chars > 0, prefix
