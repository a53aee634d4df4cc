"""Quality signals on the real stack: a judge model (the mock model in judge mode) asked in both
orders, watchdog probes forced through Envoy to each variant, user feedback attributed by request
id or by the keyed hash of a conversation id, and the json_valid telemetry signal."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import yaml
from aiohttp import web

from extproc import store
from extproc.config import ConfigError
from extproc.contract import keys, signals
from extproc.dev import stack
from extproc.quality import feedback
from extproc.quality.llm_judge import ANSWER_A
from extproc.quality.watchdog import Checks, score
from extproc.quality.worker import QualitySettings, prepare
from extproc.telemetry.events import decode_event
from extproc.telemetry.v1.event_pb2 import Assignment, TelemetryEvent
from tests.conftest import PATIENT_ENVOY, LiveStack, start_stack, wait_for, write_experiment

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

E = "chat-upgrade"
PROBES = {
    "prompts": [
        {
            "id": "json",
            "prompt": "Give me JSON.",
            "json_mode": True,
            "checks": {"json_valid": True},
        },
        {"id": "short", "prompt": "Say hi.", "checks": {"max_chars": 5}},
    ]
}


def feedback_auth(s: LiveStack) -> dict[str, str]:
    """The bearer token `extproc up` gave the feedback endpoint."""
    return {"Authorization": f"Bearer {s.state['feedback_token']}"}


@pytest.fixture(scope="module")
def quality(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveStack, str]]:
    """A shadow experiment with captures, a judge (mock model in judge mode) and a watchdog."""
    tmp = tmp_path_factory.mktemp("quality")
    judge = stack.Stack(tmp / "judge")
    port = stack.free_port()
    judge.spawn(
        "judge",
        [
            *(sys.executable, "-m", "extproc", "mock-model", "--port", str(port)),
            *("--name", "judge", "--judge-prefers", "longer"),
        ],
    )
    judge_url = f"http://127.0.0.1:{port}"
    try:
        wait_for(stack.http_ok(f"{judge_url}/healthz"), "the judge stand-in")
        (tmp / "probes.yaml").write_text(yaml.safe_dump(PROBES))
        exp = write_experiment(
            tmp,
            strategy="shadow",
            variants={
                "stable": {"cluster": "model_stable", "address": "127.0.0.1:8001", "weight": 100},
                "canary": {"cluster": "model_canary", "address": "127.0.0.1:8002", "weight": 0},
            },
            shadow={"variant": "canary", "share": 100},
            capture={"sample": 100},
            # The captured bodies' signals (JSON validity) come back on the sidecar's answer to
            # the last body chunk; a loaded machine must not let Envoy give up waiting for it.
            envoy=PATIENT_ENVOY,
            rollout={"cadence_s": 0.5, "min_stage_seconds": 600},
            judge={
                "endpoint": f"{judge_url}/v1",
                "model": "judge",
                "calls_per_minute": 1200,
                # Generous: a judge call that times out twice is a judge_error, not a verdict,
                # and a loaded machine must not turn into a missing verdict.
                "timeout_s": 60,
                "max_retries": 1,
            },
            watchdog={"file": "probes.yaml", "interval_s": 2},  # relative to the experiment
        )
        s = start_stack(tmp / "stack", exp)
        try:
            # The shadow answers four times as long: a judge that prefers length prefers them.
            canary = s.state["endpoints"]["models"]["canary"]
            httpx.post(f"{canary}/admin/behaviour", json={"verbosity": 4}).raise_for_status()
            yield s, judge_url
        finally:
            stack.down(s.state_dir)
    finally:
        judge.stop_all()


def all_signals(s: LiveStack) -> list[signals.Signal]:
    entries = s.redis().xrange(keys.signals(E))
    return [signals.parse(fields[signals.FIELD]) for _id, fields in entries]


def events_of(s: LiveStack, request_ids: set[str]) -> list[TelemetryEvent]:
    decoded = (decode_event(fields) for _id, fields in s.redis().xrange(keys.events(E)))
    return [ev for ev in decoded if ev is not None and ev.request_id in request_ids]


def ask(s: LiveStack, http: httpx.Client, tag: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        r = s.chat(
            http,
            {"x-conversation-id": f"{tag}{i}"},
            messages=[{"role": "user", "content": f"{tag} question {i}"}],
        )
        assert r.status_code == 200
        ids.append(r.headers["x-request-id"])
    return ids


def verdicts(s: LiveStack, ids: list[str]) -> dict[str, dict[str, Any]] | None:
    r = s.redis()
    raw = {rid: r.hget(keys.pair(E, rid), "judge") for rid in ids}
    if not all(raw.values()):
        return None
    return {rid: json.loads(v or b"") for rid, v in raw.items()}


def test_pairs_are_judged_in_both_orders_and_the_verdict_recorded(
    quality: tuple[LiveStack, str], http: httpx.Client
) -> None:
    s, judge = quality
    sent = ask(s, http, "judge", 4)
    got = wait_for(lambda: verdicts(s, sent), "a verdict in every pair", 60)
    for v in got.values():
        assert (v["winner"], v["consistent"], v["orders"]) == ("shadow", True, ["shadow", "shadow"])
        assert v["model"] == "judge"
        assert v["scores"]["shadow"]["accuracy"] > v["scores"]["primary"]["accuracy"]

    judged = {sig.request_id: sig for sig in all_signals(s) if isinstance(sig, signals.JudgeSignal)}
    for rid in sent:
        sig = judged[rid]
        assert (sig.primary, sig.shadow, sig.winner, sig.consistent) == (
            "stable",
            "canary",
            "shadow",
            True,
        )

    # The judge saw each pair twice: once with the primary answer first, once with the shadow's.
    out = s.cli("pairs", E, "--json", "--count", "200")
    pairs = {p["request_id"]: p for p in json.loads(out.stdout)}
    asked = http.get(f"{judge}/admin/requests").json()["requests"]
    shown_first = []
    for req in asked:
        user = req["body"]["messages"][1]["content"]
        found = re.search(f"<{ANSWER_A}>\n(.*?)\n</{ANSWER_A}>", user, re.DOTALL)
        assert found
        shown_first.append(found.group(1))
    for rid in sent:
        assert pairs[rid]["judge"]["winner"] == "shadow"
        assert pairs[rid]["primary"]["answer"] in shown_first
        assert pairs[rid]["shadow"]["answer"] in shown_first


def test_a_position_biased_judge_gives_inconsistent_ties(
    quality: tuple[LiveStack, str], http: httpx.Client
) -> None:
    s, judge = quality
    http.post(f"{judge}/admin/behaviour", json={"judge_prefers": "first"}).raise_for_status()
    try:
        sent = ask(s, http, "biased", 3)
        got = wait_for(lambda: verdicts(s, sent), "a verdict in every pair", 60)
    finally:
        http.post(f"{judge}/admin/behaviour", json={"judge_prefers": "longer"}).raise_for_status()
    for v in got.values():
        assert (v["winner"], v["consistent"], v["orders"]) == ("tie", False, ["primary", "shadow"])


def test_watchdog_probes_every_variant_through_envoy(quality: tuple[LiveStack, str]) -> None:
    s, _ = quality

    def probes() -> dict[tuple[str, str], signals.WatchdogSignal] | None:
        got = {
            (sig.variant, sig.prompt_id): sig
            for sig in all_signals(s)
            if isinstance(sig, signals.WatchdogSignal)
        }
        return got if len(got) == 4 else None

    got = wait_for(probes, "a watchdog signal per variant and prompt", 30)
    for variant in ("stable", "canary"):
        ok, short = got[(variant, "json")], got[(variant, "short")]
        assert ok.passed
        assert ok.checks == {"status": True, "json_valid": True}
        assert not short.passed
        assert short.checks == {"status": True, "max_chars": False}
        assert ok.latency_ms > 0
    # The probes were forced, so the evaluator leaves them out of the stage comparison.
    decoded = (decode_event(fields) for _id, fields in s.redis().xrange(keys.events(E)))
    forced = {
        ev.variant
        for ev in decoded
        if ev is not None and not ev.shadow and ev.assignment == Assignment.ASSIGNMENT_FORCED
    }
    assert forced == {"stable", "canary"}


def test_feedback_by_request_id_and_by_conversation_id(
    quality: tuple[LiveStack, str], http: httpx.Client
) -> None:
    s, _ = quality
    url = s.state["endpoints"]["feedback"]
    assert s.status()["endpoints"]["feedback"] == url
    answered = s.chat(http, {"x-conversation-id": "feedback-conversation"})
    rid = answered.headers["x-request-id"]

    auth = feedback_auth(s)
    by_request = http.post(
        url, json={"experiment": E, "request_id": rid, "value": "down"}, headers=auth
    )
    assert by_request.status_code == 202, by_request.text
    by_conversation = http.post(
        url,
        json={"experiment": E, "conversation_id": "feedback-conversation", "value": "escalation"},
        headers=auth,
    )
    assert by_conversation.status_code == 202, by_conversation.text

    def entry(entry_id: str) -> signals.Signal:
        ((_, fields),) = s.redis().xrange(keys.signals(E), min=entry_id, max=entry_id)
        return signals.parse(fields[signals.FIELD])

    first = entry(by_request.json()["id"])
    assert isinstance(first, signals.FeedbackSignal)
    assert (first.request_id, first.key_hash, first.value) == (rid, None, "down")
    second = entry(by_conversation.json()["id"])
    assert isinstance(second, signals.FeedbackSignal)
    assert (second.request_id, second.value) == (None, "escalation")
    # The same pseudonym as the request's telemetry event: the evaluator joins on it.
    (event,) = wait_for(
        lambda: [ev for ev in events_of(s, {rid}) if not ev.shadow] or None, "the request's event"
    )
    assert event.key_hash
    assert second.key_hash == event.key_hash
    assert "feedback-conversation" not in str(s.redis().xrange(keys.signals(E)))


@pytest.mark.parametrize(
    ("body", "problems"),
    [
        (
            {"experiment": E, "value": "meh", "rating": 3},
            [
                "value: Input should be 'up', 'down', 'retry' or 'escalation'",
                "rating: unknown field",
                "request_id: required unless conversation_id is given",
            ],
        ),
        (
            {"experiment": "Bad Name", "request_id": 7, "value": "up"},
            [
                "experiment: String should match pattern '^[a-z0-9][a-z0-9_-]{0,31}$'",
                "request_id: Input should be a valid string",
            ],
        ),
        ({"request_id": "r", "value": "up"}, ["experiment: Field required"]),
        ([{"value": "up"}], ["(body): must be a JSON object"]),
        ("not json", ["(body): not valid JSON"]),
    ],
)
def test_bad_feedback_gets_a_400_naming_each_problem(
    quality: tuple[LiveStack, str], http: httpx.Client, body: Any, problems: list[str]
) -> None:
    s, _ = quality
    url = s.state["endpoints"]["feedback"]
    content = body if isinstance(body, str) else json.dumps(body)
    headers = {"content-type": "application/json", **feedback_auth(s)}
    r = http.post(url, content=content, headers=headers)
    assert r.status_code == 400
    assert r.json()["error"]["problems"] == problems


def test_feedback_for_an_unknown_experiment_is_a_404(
    quality: tuple[LiveStack, str], http: httpx.Client
) -> None:
    s, _ = quality
    r = http.post(
        s.state["endpoints"]["feedback"],
        json={"experiment": "no-such", "request_id": "r", "value": "up"},
        headers=feedback_auth(s),
    )
    assert r.status_code == 404
    assert r.json()["error"]["message"] == "unknown experiment 'no-such'"


def test_json_validity_of_answers_to_json_requests(
    quality: tuple[LiveStack, str], http: httpx.Client
) -> None:
    s, _ = quality
    json_mode = {"type": "json_object"}
    cases = {
        "whole": {"response_format": json_mode},
        "streamed": {"response_format": json_mode, "stream": True},
        "cut": {"response_format": json_mode, "max_tokens": 3},  # the wrapper never closes
        "text": {},
    }
    ids = {}
    for name, extra in cases.items():
        r = s.chat(http, {"x-conversation-id": f"json-{name}"}, **extra)
        assert r.status_code == 200
        ids[r.headers["x-request-id"]] = name

    def both_sides() -> list[TelemetryEvent] | None:
        got = events_of(s, set(ids))
        return got if len(got) == 2 * len(ids) else None

    seen: dict[tuple[str, bool], bool | None] = {}
    for ev in wait_for(both_sides, "primary and shadow events of each request"):
        seen[(ids[ev.request_id], ev.shadow)] = ev.json_valid if ev.HasField("json_valid") else None
    for shadow in (False, True):
        assert seen[("whole", shadow)] is True
        assert seen[("streamed", shadow)] is True
        assert seen[("cut", shadow)] is False
        assert seen[("text", shadow)] is None


# --- without the stack ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("checks", "status", "answer", "expected"),
    [
        ({}, 200, "hi", {"status": True}),
        ({}, 500, None, {"status": False}),
        ({"contains": "PARIS"}, 200, "It is Paris.", {"status": True, "contains": True}),
        ({"contains": ["a", "z"]}, 200, "abc", {"status": True, "contains": False}),
        ({"not_contains": ["sorry"]}, 200, "Sorry!", {"status": True, "not_contains": False}),
        ({"json_valid": True}, 200, ' {"a": 1} ', {"status": True, "json_valid": True}),
        (
            {"json_valid": True},
            200,
            '```json\n{"a": 1}\n```',
            {"status": True, "json_valid": False},
        ),
        ({"max_chars": 3}, 200, "four", {"status": True, "max_chars": False}),
        ({"regex": r"\d{3}"}, 200, "call 555", {"status": True, "regex": True}),
        (
            {"not_contains": ["x"], "max_chars": 9},
            502,
            None,
            {"status": False, "not_contains": False, "max_chars": False},
        ),
    ],
)
def test_watchdog_checks(
    checks: dict[str, Any], status: int, answer: str | None, expected: dict[str, bool]
) -> None:
    assert score(Checks.model_validate(checks), status, answer) == expected


def test_check_validates_the_watchdog_prompt_set(tmp_path: Path) -> None:
    (tmp_path / "probes.yaml").write_text(
        yaml.safe_dump(
            {
                "prompts": [
                    {"id": "a", "prompt": "x", "checks": {"regex": "(", "max_chars": 0}},
                    {"id": "a", "prompt": "y", "checks": {"contain": "z"}},
                ]
            }
        )
    )
    exp = write_experiment(tmp_path, watchdog={"file": "probes.yaml"})
    out = subprocess.run(
        [sys.executable, "-m", "extproc", "check", str(exp)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert "prompts.0.checks.max_chars: Input should be greater than or equal to 1" in out.stderr
    assert "prompts.0.checks.regex: Value error, not a valid regex" in out.stderr
    assert "prompts.1.checks.contain: Extra inputs are not permitted" in out.stderr


def test_the_worker_refuses_settings_it_cannot_run_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from extproc.config import load_experiment

    monkeypatch.delenv("JUDGE_KEY", raising=False)
    path = write_experiment(
        tmp_path,
        shadow={"variant": "canary", "share": 10},
        capture={"sample": 10},
        judge={"endpoint": "http://127.0.0.1:1/v1", "model": "m", "api_key_env": "JUDGE_KEY"},
        watchdog={"file": "missing.yaml"},
    )
    with pytest.raises(ConfigError) as err:
        prepare(load_experiment(path), QualitySettings())
    assert err.value.problems[0] == "judge.api_key_env: $JUDGE_KEY is not set"
    assert err.value.problems[1] == (
        "watchdog: needs the Envoy listener to probe through (--listener)"
    )
    assert err.value.problems[2].endswith("missing.yaml): cannot read: No such file or directory")


@pytest.fixture
async def feedback_url(redis_url: str) -> AsyncIterator[str]:
    """The feedback app with a token, in this process, on a real Redis."""
    r = store.connect(redis_url)
    await r.set(keys.definition("exp"), json.dumps({"salt": "s"}))
    runner = web.AppRunner(feedback.make_app(r, token="t0ken"), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1/feedback"
    await runner.cleanup()
    await r.aclose()


async def test_a_feedback_token_is_enforced(feedback_url: str) -> None:
    body = {"experiment": "exp", "request_id": "r", "value": "up"}
    async with aiohttp.ClientSession() as c:
        async with c.post(feedback_url, json=body) as resp:
            assert resp.status == 401
        async with c.post(
            feedback_url, json=body, headers={"Authorization": "Bearer wrong"}
        ) as resp:
            assert resp.status == 401
        async with c.post(
            feedback_url, json=body, headers={"Authorization": "Bearer t0ken"}
        ) as resp:
            assert resp.status == 202


def test_the_evaluator_attributes_every_signal_kind_to_its_variant(
    quality: tuple[LiveStack, str], http: httpx.Client
) -> None:
    """Judge verdicts, feedback and watchdog probes reach the evaluator's per-variant figures."""
    s, _ = quality
    url = s.state["endpoints"]["feedback"]
    rids = ask(s, http, "attribution", 4)
    for rid in rids:
        body = {"experiment": E, "request_id": rid, "value": "down"}
        posted = http.post(url, json=body, headers=feedback_auth(s))
        assert posted.status_code == 202, posted.text

    def figures() -> dict[str, Any] | None:
        ev = s.status().get("evaluation") or {}
        v = ev.get("variants", {})
        stable, canary = v.get("stable", {}), v.get("canary", {})
        done = (
            stable.get("feedback", {}).get("down", 0) >= len(rids)
            and canary.get("judge_verdicts", 0) > 0
            and canary.get("watchdog_probes", 0) > 0
            and stable.get("watchdog_probes", 0) > 0
        )
        return v if done else None

    v = wait_for(figures, "signals in the evaluator's figures", timeout_s=60)
    assert v["canary"].get("feedback", {}) == {}  # users only ever saw stable's answers
    # The judge prefers the longer answer, and the shadow's are four times as long: the canary
    # wins nearly every decisive verdict and stable's rate mirrors it. Not all of them: the window
    # also holds pairs sampled from the module's earlier tests, and one of those went to stable
    # in a loaded run (0.9), so the rates are compared rather than pinned.
    assert v["canary"]["judge_win_rate"] > 0.5 > v["stable"]["judge_win_rate"]
    assert v["canary"]["judge_win_rate"] + v["stable"]["judge_win_rate"] == pytest.approx(1.0)
