"""What happens to user traffic when our parts fail, and that SSE passes through untouched."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import redis

from extproc.contract import keys
from extproc.dev import stack
from extproc.telemetry.v1.event_pb2 import Assignment, ErrorClass, TelemetryEvent
from tests.conftest import REQUEST_PATH, LiveStack, start_stack, wait_for, write_experiment

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def recorded_ids(s: LiveStack) -> dict[str, TelemetryEvent]:
    return {ev.request_id: ev for ev in s.events()}


def test_sidecar_killed_traffic_flows_to_stable(
    own_data_stack: LiveStack, http: httpx.Client
) -> None:
    own_data_stack.set_weights(stable=0, canary=100)
    assert (
        own_data_stack.chat(http, {"x-conversation-id": "a"}).headers["x-llm-variant"] == "canary"
    )
    os.kill(own_data_stack.pid("sidecar"), signal.SIGKILL)
    wait_for(
        lambda: not stack._alive(own_data_stack.state["processes"]["sidecar"]), "sidecar to die"
    )
    for i in range(30):
        r = own_data_stack.chat(http, {"x-conversation-id": f"k-{i}"}, stream=i % 2 == 0)
        assert r.status_code == 200
        assert r.headers["x-llm-variant"] == "stable"
        assert r.headers["x-mock-model"] == "stable"


def test_redis_down_traffic_flows_and_telemetry_resumes(
    own_data_stack: LiveStack, http: httpx.Client
) -> None:
    proc = own_data_stack.state["processes"]["redis"]
    sent: list[str] = []

    def send(n: int) -> None:
        for _ in range(n):
            r = own_data_stack.chat(http, {"x-conversation-id": str(uuid.uuid4())})
            assert r.status_code == 200
            sent.append(r.headers["x-request-id"])

    send(5)
    os.kill(int(proc["pid"]), signal.SIGKILL)
    wait_for(lambda: not stack._alive(proc), "redis to die")
    send(20)  # Redis is down: users see no difference; events wait in the sidecar's buffer
    restarted = subprocess.Popen(proc["argv"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(stack.redis_ok(own_data_stack.redis_url), "redis to come back")
        send(5)
        got = wait_for(
            lambda: (
                (ids := recorded_ids(own_data_stack)) and all(i in ids for i in sent[5:]) and ids
            ),
            "events of the outage and after to reach the restarted redis",
        )
        assert set(sent[5:]) <= set(got)  # the first 5 died with the old redis (no persistence)
        # the sidecar re-registers the experiment in the empty redis (its routing follower
        # notices the loss on its own schedule, not with the events)
        with redis.Redis.from_url(own_data_stack.redis_url) as r:
            wait_for(lambda: r.exists(keys.definition("chat-upgrade")), "re-registration")
        assert own_data_stack.status()["routing"]["version"] >= 1
    finally:
        restarted.terminate()
        restarted.wait(timeout=10)


class _SSEUpstream(BaseHTTPRequestHandler):
    """Sends a fixed SSE body in awkward chunks (split events, split UTF-8 characters)."""

    protocol_version = "HTTP/1.1"
    chunks: tuple[bytes, ...] = ()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for c in self.chunks:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(c), c))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args: object) -> None:
        pass


def _sse_body() -> bytes:
    events = [
        b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n',
        b": keep-alive comment\n\n",
        'data: {"choices":[{"delta":{"content":"Grüße, ☃ "}}]}\r\n\r\n'.encode(),
        b'data: {"choices":[{"delta":{"content":"world"},"finish_reason":"stop"}]}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n',
        b"data: [DONE]\n\n",
    ]
    return b"".join(events)


@pytest.fixture
def sse_upstream() -> Iterator[tuple[int, bytes]]:
    body = _sse_body()
    cuts = [0, 7, 8, 70, 71, 95, 96, 97, 98, 140, len(body)]  # mid-event, mid-character
    _SSEUpstream.chunks = tuple(body[a:b] for a, b in itertools.pairwise(cuts))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SSEUpstream)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server.server_address[1], body
    finally:
        server.shutdown()
        server.server_close()


def test_sse_passes_through_byte_for_byte(
    tmp_path: Path, sse_upstream: tuple[int, bytes], http: httpx.Client
) -> None:
    port, body = sse_upstream
    exp = write_experiment(
        tmp_path,
        variants={
            "stable": {"cluster": "a", "address": f"127.0.0.1:{port}", "weight": 50},
            "canary": {"cluster": "b", "address": f"127.0.0.1:{port}", "weight": 50},
        },
    )
    s = start_stack(tmp_path / "stack", exp, mock_models=False, components=REQUEST_PATH)
    try:
        with http.stream(
            "POST",
            f"{s.listener}/v1/chat/completions",
            json={"model": "m", "messages": [], "stream": True},
            headers={"x-conversation-id": "sse"},
        ) as r:
            received = b"".join(r.iter_raw())
            rid = r.headers["x-request-id"]
        assert received == body
        ev = wait_for(lambda: recorded_ids(s).get(rid), "the SSE request's event")
        assert ev.streamed
        assert ev.status == 200
        assert ev.error == ErrorClass.ERROR_CLASS_NONE
        assert (ev.prompt_tokens, ev.completion_tokens) == (3, 4)
        assert ev.finish_reason == "stop"
        assert ev.response_bytes == len(body)
        assert ev.assignment == Assignment.ASSIGNMENT_STICKY
    finally:
        stack.down(s.state_dir)
