"""Shadow mode on the real stack: mirrored copies, paired captures, a shadow that cannot hurt
the primary, and quality signals (refusals, verbosity) in the per-variant rates."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from extproc.dev import stack
from tests.conftest import REQUEST_PATH, LiveStack, start_stack, wait_for, write_experiment

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def shadow_stack(tmp_path: Path) -> Iterator[LiveStack]:
    exp = write_experiment(
        tmp_path,
        strategy="shadow",
        variants={
            "stable": {"cluster": "model_stable", "address": "127.0.0.1:8001", "weight": 100},
            "canary": {"cluster": "model_canary", "address": "127.0.0.1:8002", "weight": 0},
        },
        shadow={"variant": "canary", "share": 100},
        capture={"sample": 100, "redact": [r"[\w.+-]+@[\w-]+\.\w+"]},
        rollout={"cadence_s": 0.5, "min_stage_seconds": 600},
    )
    s = start_stack(tmp_path / "stack", exp, components=REQUEST_PATH)
    yield s
    stack.down(s.state_dir)


def model(s: LiveStack, http: httpx.Client, variant: str) -> str:
    return str(s.state["endpoints"]["models"][variant])


def stats(s: LiveStack, http: httpx.Client, variant: str) -> dict[str, Any]:
    doc: dict[str, Any] = http.get(f"{model(s, http, variant)}/admin/stats").json()
    return doc


def pairs(s: LiveStack) -> list[dict[str, Any]]:
    out = s.cli("pairs", "chat-upgrade", "--json", "--count", "100")
    assert out.returncode == 0, out.stderr
    got: list[dict[str, Any]] = json.loads(out.stdout)
    return got


def test_mirrored_requests_are_paired_and_redacted(
    shadow_stack: LiveStack, http: httpx.Client
) -> None:
    s = shadow_stack
    sent = []
    for i in range(8):
        r = s.chat(
            http,
            {"x-conversation-id": f"c{i}"},
            stream=i % 2 == 0,
            messages=[{"role": "user", "content": f"mail me at ann{i}@example.com"}],
        )
        assert r.status_code == 200
        assert r.headers["x-llm-variant"] == "stable"
        assert r.headers["x-mock-model"] == "stable"  # the user only ever sees the primary
        sent.append(r.headers["x-request-id"])
    wait_for(lambda: stats(s, http, "canary")["requests"] >= 8, "the shadow model to get copies")

    def complete() -> dict[str, dict[str, Any]] | None:
        got = {p["request_id"]: p for p in pairs(s)}
        ok = all(rid in got and "primary" in got[rid] and "shadow" in got[rid] for rid in sent)
        return got if ok else None

    got = wait_for(complete, "a primary and a shadow capture for every request")
    for rid in sent:
        p = got[rid]
        assert (p["primary"]["variant"], p["shadow"]["variant"]) == ("stable", "canary")
        assert p["primary"]["answer"]
        assert p["shadow"]["answer"]
        assert "[REDACTED]" in p["primary"]["prompt"]
        assert "@example.com" not in p["primary"]["prompt"]
    shadow_figures = s.status()["shadow"]["canary"]
    assert shadow_figures["window_requests"] >= 8


def test_hanging_shadow_does_not_touch_the_primary(
    shadow_stack: LiveStack, http: httpx.Client
) -> None:
    s = shadow_stack
    http.post(f"{model(s, http, 'canary')}/admin/behaviour", json={"hang_rate": 1.0})
    for i in range(10):
        r = s.chat(http, {"x-conversation-id": f"h{i}"})
        assert r.status_code == 200
        assert r.headers["x-mock-model"] == "stable"
    # every primary came back while the shadow copies are still hanging in the shadow model
    assert stats(s, http, "canary")["in_flight"] >= 1
    http.post(
        f"{model(s, http, 'canary')}/admin/behaviour", json={"error_rate": 1.0, "hang_rate": 0.0}
    )
    for i in range(10):
        assert s.chat(http, {"x-conversation-id": f"e{i}"}).status_code == 200


def test_refusal_and_verbosity_regressions_show_in_variant_rates(
    data_stack: LiveStack, http: httpx.Client
) -> None:
    canary = data_stack.state["endpoints"]["models"]["canary"]
    before = data_stack.status()["forced"]

    def counted(variant: str) -> int:
        return int((before.get(variant) or {}).get("window_requests", 0))

    http.post(f"{canary}/admin/behaviour", json={"refusal_rate": 1.0}).raise_for_status()
    try:
        for i in range(10):
            data_stack.chat(
                http, {"x-experiment": "canary", "x-conversation-id": f"r{i}"}, stream=i % 2 == 0
            )
            data_stack.chat(http, {"x-experiment": "stable", "x-conversation-id": f"r{i}"})
    finally:
        http.post(f"{canary}/admin/behaviour", json={"refusal_rate": 0.0}).raise_for_status()
    http.post(f"{canary}/admin/behaviour", json={"verbosity": 4.0}).raise_for_status()
    try:
        for i in range(10):
            data_stack.chat(http, {"x-experiment": "canary", "x-conversation-id": f"v{i}"})
    finally:
        http.post(f"{canary}/admin/behaviour", json={"verbosity": 1.0}).raise_for_status()

    def figures() -> dict[str, Any] | None:
        """Once every request above is counted (telemetry arrives in batches, so a first
        refusal can show before the verbose answers do)."""
        v = data_stack.status()["forced"]  # forced tester traffic: its own figures
        done = (
            v.get("canary", {}).get("window_requests", 0) >= counted("canary") + 20
            and v.get("stable", {}).get("window_requests", 0) >= counted("stable") + 10
        )
        return v if done else None

    v = wait_for(figures, "every forced request in the variants' rates")
    assert v["stable"]["refusal_rate"] == 0
    assert v["canary"]["refusal_rate"] >= 0.3
    assert v["canary"]["answer_chars_mean"] > v["stable"]["answer_chars_mean"]
