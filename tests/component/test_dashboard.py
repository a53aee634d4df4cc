"""The dashboard's JSON API on the real stack (`extproc up` starts the dashboard), and its time
series on synthetic events.

The figures must be the ones `extproc status --json` prints, and an action must take the road
`extproc experiment VERB` takes: an intent in the commands stream that the evaluator applies.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from extproc.config import load_experiment
from extproc.contract import keys
from extproc.dev import stack
from extproc.ops import figures as fig
from extproc.ops.dashboard import TOKEN_ENV
from extproc.ops.dashboard.series import MAX_BUCKETS, MIN_SPAN_S, bucket_step, series, width_for
from extproc.ops.figures import flatten
from extproc.telemetry import rollup
from extproc.telemetry.v1.event_pb2 import ErrorClass, TelemetryEvent
from tests.conftest import LiveStack, as_read, start_stack, wait_for, write_experiment

pytestmark = pytest.mark.timeout(120)
NAME = "chat-upgrade"
CLI = [sys.executable, "-m", "extproc"]


def dashboard_experiment(tmp: Path) -> Path:
    """The example experiment, quick to apply intents (a tick every 0.5 s), never advancing on its
    own during a test (an hour per stage), and capturing every request's texts."""
    return write_experiment(
        tmp,
        rollout={"stages": [10, 50, 100], "min_stage_seconds": 3600, "cadence_s": 0.5},
        capture={"sample": 100},
    )


def dashboard(s: LiveStack) -> tuple[str, str]:
    """The stack's dashboard URL and its token, as `extproc up` recorded them."""
    return str(s.state["endpoints"]["dashboard"]), str(s.state["dashboard_token"])


def send_traffic(s: LiveStack, http: httpx.Client, n: int, tag: str) -> None:
    """``n`` requests, every third forced to the canary, then wait until `extproc status` counts
    every one of them: traffic has stopped and the figures no longer move."""
    before = sum(v["requests"] for v in s.status()["variants"].values())
    for i in range(n):
        headers = {"x-conversation-id": f"{tag}-{i}"}
        if i % 3 == 0:
            headers["x-experiment"] = "canary"
        assert s.chat(http, headers, stream=i % 2 == 0).status_code == 200

    def counted() -> bool:
        doc = s.status()
        return sum(v["requests"] for v in doc["variants"].values()) == before + n

    wait_for(counted, f"status to count all {n} requests")


@pytest.fixture(scope="module")
def dash_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    tmp = tmp_path_factory.mktemp("dashboard")
    s = start_stack(tmp / "stack", dashboard_experiment(tmp))
    try:
        yield s
    finally:
        stack.down(s.state_dir)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def action(
    http: httpx.Client, s: LiveStack, verb: str, token: str | None, name: str = NAME, **body: Any
) -> httpx.Response:
    url, _ = dashboard(s)
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return http.post(f"{url}/api/experiments/{name}/actions/{verb}", json=body, headers=headers)


def rollout_of(s: LiveStack) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(s.redis().get(keys.rollout(NAME)))
    return doc


# --- the page and the health check --------------------------------------------------------------


def test_up_records_the_dashboard_and_status_shows_it(dash_stack: LiveStack) -> None:
    url, token = dashboard(dash_stack)
    assert (dash_stack.state_dir / stack.STATE_FILE).stat().st_mode & 0o777 == 0o600
    doc = dash_stack.status()
    assert doc["endpoints"]["dashboard"] == url
    assert doc["dashboard_url"] == f"{url}/#token={token}"
    out = dash_stack.cli("status")
    assert f"dashboard  {url}/#token={token}" in out.stdout


def test_up_sets_a_feedback_token_that_status_shows_and_feedback_requires(
    dash_stack: LiveStack, http: httpx.Client
) -> None:
    token = dash_stack.state["feedback_token"]
    assert len(token) >= 24
    doc = dash_stack.status()
    assert doc["feedback_token"] == token
    url = doc["endpoints"]["feedback"]
    assert f"feedback   {url}   (Authorization: Bearer {token})" in dash_stack.cli("status").stdout
    body = {"experiment": NAME, "request_id": "r-token", "value": "down"}
    before = dash_stack.redis().xlen(keys.signals(NAME))
    for headers in ({}, bearer(f"{token}x"), bearer(dash_stack.state["dashboard_token"])):
        assert http.post(url, json=body, headers=headers).status_code == 401
    assert dash_stack.redis().xlen(keys.signals(NAME)) == before
    assert http.post(url, json=body, headers=bearer(token)).status_code == 202


def test_page_and_health(dash_stack: LiveStack, http: httpx.Client) -> None:
    url, _ = dashboard(dash_stack)
    assert http.get(f"{url}/healthz").json() == {"ok": True}
    page = http.get(f"{url}/")
    assert page.status_code == 200
    assert '<script src="/static/app.js"' in page.text
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    for asset in ("app.js", "app.css"):
        assert http.get(f"{url}/static/{asset}").status_code == 200


# --- figures --------------------------------------------------------------------------------------


def test_figures_and_series_are_those_of_status(dash_stack: LiveStack, http: httpx.Client) -> None:
    send_traffic(dash_stack, http, 30, "figures")
    url, _ = dashboard(dash_stack)
    doc = http.get(f"{url}/api/experiments/{NAME}").json()
    st = dash_stack.status()
    assert doc["variants"] == st["variants"]
    assert (doc["window_events"], doc["routing"]) == (st["window_events"], st["routing"])
    assert doc["rollout"] | {"updated": 0} == st["rollout"] | {"updated": 0}  # saved every tick
    # Every third request was forced to the canary: tester traffic, counted apart.
    assert doc["forced"] == st["forced"]
    forced = doc["variants"]["canary"]["forced_requests"]
    assert forced >= 10
    assert doc["forced"]["canary"]["window_requests"] == forced

    cmp = doc["comparison"]
    assert (cmp["stable"], cmp["candidates"]) == ("stable", ["canary"])
    stable, canary = flatten(st["variants"]["stable"]), flatten(st["variants"]["canary"])
    rows = {row["metric"]: row for row in cmp["rows"]}
    assert set(rows) == set(stable)
    for metric, row in rows.items():
        effect = row["candidates"]["canary"]
        assert (row["stable"], effect["value"]) == (stable[metric], canary[metric])
        # The page shows these texts as given: the CLI's, by the one formatting rule.
        assert row["stable_text"] == fig.value_text(metric, stable[metric])
        assert effect["text"] == {
            "value": fig.value_text(metric, canary[metric]),
            "diff": fig.diff_text(metric, effect["diff"]),
            "rel": fig.rel_text(effect["rel"]),
        }
        assert row["label"] == fig.label(metric)
    p99 = rows["latency_ms.p99"]["candidates"]["canary"]
    assert p99["diff"] == pytest.approx(canary["latency_ms.p99"] - stable["latency_ms.p99"])
    assert rows["requests"]["candidates"]["canary"]["diff"] is None  # a total, not an effect

    # Over the status window, the charts' steps add up to the status figures.
    got = http.get(f"{url}/api/experiments/{NAME}/series?span={st['window_s']}").json()
    assert got["span_s"] == st["window_s"]
    assert all(b - a == got["step_s"] for a, b in itertools.pairwise(got["t"]))
    for variant, figures in st["variants"].items():
        cols = got["variants"][variant]
        for total in ("window_requests", "errors", "prompt_tokens", "completion_tokens"):
            assert sum(cols[total]) == figures[total], (variant, total)


def test_pairs_are_those_of_extproc_pairs_with_the_judge_verdict(
    dash_stack: LiveStack, http: httpx.Client
) -> None:
    url, token = dashboard(dash_stack)
    out = dash_stack.cli("pairs", NAME, "--json", "--count", "5")
    assert out.returncode == 0, out.stderr
    expected = json.loads(out.stdout)
    assert expected, "capture.sample is 100: every request is captured"
    verdict = {"winner": "shadow", "scores": {"primary": 6, "shadow": 8}, "consistent": True}
    rid = expected[0]["request_id"]
    dash_stack.redis().hset(keys.pair(NAME, rid), "judge", json.dumps(verdict))
    pairs = f"{url}/api/experiments/{NAME}/pairs"
    got = http.get(pairs, params={"count": 5}, headers=bearer(token)).json()
    assert [p["request_id"] for p in got] == [p["request_id"] for p in expected]
    assert got[0]["judge"] == verdict
    assert got[0]["primary"] == expected[0]["primary"]


def test_captured_texts_need_the_token_and_figures_do_not(
    dash_stack: LiveStack, http: httpx.Client
) -> None:
    url, token = dashboard(dash_stack)
    pairs = f"{url}/api/experiments/{NAME}/pairs"
    for headers in ({}, {"Authorization": f"Bearer {token}x"}):
        r = http.get(pairs, headers=headers)
        assert r.status_code == 401
        assert r.json() == {"error": "missing or wrong bearer token"}
    assert http.get(pairs, headers=bearer(token)).status_code == 200
    for figures in ("/api/status", f"/api/experiments/{NAME}", f"/api/experiments/{NAME}/series"):
        assert http.get(f"{url}{figures}").status_code == 200


# --- errors ---------------------------------------------------------------------------------------


def test_unknown_experiment_is_404(dash_stack: LiveStack, http: httpx.Client) -> None:
    url, token = dashboard(dash_stack)
    for path in ("", "/series", "/pairs"):
        r = http.get(f"{url}/api/experiments/nope{path}", headers=bearer(token))
        assert r.status_code == 404
        assert "nope" in r.json()["error"]
    r = action(http, dash_stack, "pause", token, name="nope")
    assert r.status_code == 404
    assert "nope" in r.json()["error"]


def test_bad_input_is_400(dash_stack: LiveStack, http: httpx.Client) -> None:
    url, token = dashboard(dash_stack)
    r = http.get(f"{url}/api/experiments/{NAME}/series", params={"span": "a while"})
    assert r.status_code == 400
    assert "span" in r.json()["error"]
    r = http.get(
        f"{url}/api/experiments/{NAME}/pairs", params={"count": "0.5"}, headers=bearer(token)
    )
    assert r.status_code == 400
    r = action(http, dash_stack, "explode", token)
    assert r.status_code == 400
    assert "rollback" in r.json()["error"]  # lists the valid actions
    r = http.post(
        f"{url}/api/experiments/{NAME}/actions/pause",
        content=b"{not json",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert r.status_code == 400
    assert "JSON" in r.json()["error"]


def test_actions_need_the_token(dash_stack: LiveStack, http: httpx.Client) -> None:
    url, token = dashboard(dash_stack)
    before = dash_stack.redis().xlen(keys.commands(NAME))
    wrong = [f"Bearer {token}x", f"Bearer {token[:-1]}", f"Basic {token}", token, "Bearer"]
    for header in [None, *wrong]:
        r = http.post(
            f"{url}/api/experiments/{NAME}/actions/rollback",
            headers={} if header is None else {"Authorization": header},
        )
        assert r.status_code == 401, header
        assert r.json() == {"error": "missing or wrong bearer token"}
        assert r.headers["WWW-Authenticate"] == "Bearer"
    assert dash_stack.redis().xlen(keys.commands(NAME)) == before


# --- actions --------------------------------------------------------------------------------------


def test_actions_take_the_cli_path_and_the_evaluator_applies_them(
    dash_stack: LiveStack, http: httpx.Client
) -> None:
    """Pause from the dashboard, resume from the CLI, promote from the dashboard: the same
    intents in the same stream, applied and audited by the evaluator; the promote carries the
    stage's guardrail checks into the audit, and the comparison shows them."""
    s = dash_stack
    _, token = dashboard(s)
    r = action(http, s, "pause", token, reason="looking at p99")
    assert r.status_code == 202
    assert r.json()["command"] == "pause"
    wait_for(lambda: rollout_of(s)["status"] == "paused", "the evaluator to apply the pause")

    out = s.cli("experiment", "resume", NAME, "--actor", "cli-user", "--json")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: rollout_of(s)["status"] == "running", "the evaluator to apply the resume")
    entries = s.redis().xrange(keys.commands(NAME))
    (by_dashboard,) = [f for i, f in entries if i.decode() == r.json()["id"]]
    (_, by_cli) = entries[-1]
    assert set(by_dashboard) == set(by_cli)  # one writer: the same intent record
    assert (by_dashboard[b"actor"], by_dashboard[b"reason"]) == (b"dashboard", b"looking at p99")

    assert action(http, s, "promote", token).status_code == 202
    wait_for(lambda: rollout_of(s)["stage"] == 1, "the evaluator to apply the promote")
    url, _ = dashboard(s)
    doc = http.get(f"{url}/api/experiments/{NAME}").json()
    by_operators = [rec for rec in doc["timeline"] if rec["actor"] in ("dashboard", "cli-user")]
    assert [(rec["action"], rec["actor"]) for rec in by_operators] == [
        ("pause", "dashboard"),
        ("resume", "cli-user"),
        ("advance", "dashboard"),
    ]
    assert by_operators[0]["reasons"] == ["pause by dashboard: looking at p99"]
    checks = doc["comparison"]["checks"]  # the evaluator's newest look, in the new stage
    assert checks["stage"] == 1
    assert checks["action"] in ("none", "advance")
    guardrails = load_experiment(s.experiment_path).spec.guardrails
    assert [(c["variant"], c["metric"]) for c in checks["items"]] == [
        ("canary", g.metric) for g in guardrails
    ]
    assert {c["status"] for c in checks["items"]} <= {"pass", "fail", "waiting"}


# --- `extproc dashboard` on its own -------------------------------------------------------------


@contextlib.contextmanager
def own_dashboard(redis_url: str, *args: str) -> Iterator[tuple[str, str]]:
    """`extproc dashboard` in a process of its own: its URL and the first line it printed."""
    port = stack.free_port()
    with subprocess.Popen(
        [*CLI, "dashboard", "--redis-url", redis_url, "--port", str(port), *args],
        stdout=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != TOKEN_ENV},
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            url = f"http://127.0.0.1:{port}"
            wait_for(stack.http_ok(f"{url}/healthz"), "the dashboard")
            yield url, line
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def test_cli_makes_up_a_token_and_prints_it(dash_stack: LiveStack, http: httpx.Client) -> None:
    with own_dashboard(dash_stack.redis_url) as (url, line):
        assert line.startswith(f"dashboard on {url}/#token=")
        token = line.strip().rpartition("#token=")[2]
        explode = f"{url}/api/experiments/{NAME}/actions/explode"
        wrong = http.post(explode, headers={"Authorization": "Bearer nope"})
        right = http.post(explode, headers={"Authorization": f"Bearer {token}"})
        assert (wrong.status_code, right.status_code) == (401, 400)  # 400: past the token check


def test_cli_keeps_a_given_token_out_of_its_output(
    dash_stack: LiveStack, http: httpx.Client
) -> None:
    with own_dashboard(dash_stack.redis_url, "--token", "s3cret-t0ken") as (url, line):
        assert "s3cret" not in line
        explode = f"{url}/api/experiments/{NAME}/actions/explode"
        r = http.post(explode, headers={"Authorization": "Bearer s3cret-t0ken"})
        assert r.status_code == 400


# --- series on synthetic events -----------------------------------------------------------------


def event(t_ms: int, variant: str, duration: float, *, shadow: bool = False) -> TelemetryEvent:
    return TelemetryEvent(
        time_unix_ms=t_ms,
        variant=variant,
        duration_ms=duration,
        first_token_ms=duration / 2,
        completion_tokens=10,
        shadow=shadow,
        error=ErrorClass.ERROR_CLASS_NONE if duration < 1000 else ErrorClass.ERROR_CLASS_TIMEOUT,
    )


def test_series_buckets_events_by_start_time() -> None:
    now = 1_000_000
    events = [
        event(1000 * now - 25_000, "stable", 100),
        event(1000 * now - 21_000, "stable", 300),  # the same 10 s bucket
        event(1000 * now - 5_000, "canary", 2000),  # a timeout
        event(1000 * now - 5_000, "canary", 50, shadow=True),
        event(1000 * now - 120_000, "stable", 1),  # before the span: left out
    ]
    variants = ["stable", "canary"]
    got = series(
        as_read(events, 10),
        variants,
        since_s=now - 60,
        until_s=now + 10,
        step_s=10,
        shadow_variant="canary",
    )
    # every step of the span, aligned to multiples of the step, the current one last
    assert got["t"] == [now - 60 + 10 * i for i in range(7)]
    stable, canary = got["variants"]["stable"], got["variants"]["canary"]
    assert stable["window_requests"] == [0, 0, 0, 2, 0, 0, 0]
    # The median of two, as a sample has it (the lower), within the sketch's accuracy.
    assert stable["latency_ms.p50"][3] == pytest.approx(100, rel=rollup.ALPHA)
    assert stable["latency_ms.p50"][:3] == [None] * 3
    assert canary["error_rate"] == [None] * 5 + [1.0, None]
    assert canary["latency_ms.p99"] == [None] * 7  # a failed request has no latency
    assert got["shadow"]["canary"]["latency_ms.p50"][5] == pytest.approx(50, rel=rollup.ALPHA)
    assert "open_requests" not in stable  # a figure of now, not of a step


def test_steps_are_round_multiples_of_the_rollups() -> None:
    assert bucket_step(600) == 10  # about 60 points
    assert bucket_step(MIN_SPAN_S) == 10  # never finer than the rollups
    assert bucket_step(6 * 3600) == 600
    assert width_for(600) == rollup.COARSE_S
    assert width_for(30) == rollup.FINE_S
    assert bucket_step(3600, step_s=15) == 20  # an asked step, rounded up to whole buckets


def test_series_of_coarse_buckets_add_up_to_the_fine_ones() -> None:
    now = 1_000_000 - 1_000_000 % 3600
    events = [event(1000 * (now - 7 * age), "stable", 10 + age % 50) for age in range(1, 3000)]
    step = bucket_step(6 * 3600)
    since = now - 6 * 3600
    coarse = series(as_read(events, 300), ["stable"], since_s=since, until_s=now, step_s=step)
    fine = series(as_read(events, 10), ["stable"], since_s=since, until_s=now, step_s=step)
    assert coarse == fine
    assert sum(coarse["variants"]["stable"]["window_requests"]) == len(events)


def test_series_never_has_more_than_max_buckets() -> None:
    step = bucket_step(86_400, step_s=1)
    assert step == 86_400 / MAX_BUCKETS
    got = series([], ["stable"], since_s=0, until_s=86_400, step_s=step)
    assert len(got["t"]) == MAX_BUCKETS
    assert set(got["variants"]["stable"]["window_requests"]) == {0}


def test_flatten_keeps_numbers_and_missing_figures() -> None:
    figures = {"a": 1, "b": {"p50": 2.5, "p99": None}, "judge": {"win_rate": 0.4}, "ok": True}
    assert flatten(figures | {"name": "x"}) == {
        "a": 1,
        "b.p50": 2.5,
        "b.p99": None,
        "judge.win_rate": 0.4,
    }


def test_comparison_prefers_the_evaluators_latest_look_and_shows_quality_signals() -> None:
    from extproc.ops.dashboard.views import comparison

    doc = {"stable": "stable", "variants": {"stable": {"requests": 10}, "canary": {"requests": 5}}}
    audit = [{"time": 1.0, "stage": 0, "action": "advance", "checks": [{"metric": "old"}]}]
    check = {"metric": "judge_win_rate", "estimate": 0.125, "bound": -2.675e-05, "margin": None}
    latest = {
        "time": 2.0,
        "stage": 1,
        "action": "none",
        "checks": [check],
        "variants": {
            "stable": {"judge_verdicts": 0, "feedback": {}},
            "canary": {
                "judge_verdicts": 8,
                "judge_win_rate": 0.25,
                "feedback": {"down": 1},
                "feedback_negative_rate": 0.2,
            },
        },
    }
    got = comparison(doc, audit, latest)
    # Each check with its verdict, made by the rule `extproc top` uses.
    assert got["checks"]["items"] == [check | {"verdict": fig.verdict(check)}]
    assert got["checks"]["stage"] == 1
    rows = {r["metric"]: r for r in got["rows"]}
    assert rows["stage.judge_win_rate"]["candidates"]["canary"]["value"] == 0.25
    assert rows["stage.feedback_negative_rate"]["candidates"]["canary"]["value"] == 0.2
    assert [c["metric"] for c in comparison(doc, audit)["checks"]["items"]] == ["old"]


def test_quality_signals_become_chart_columns() -> None:
    from extproc.contract.signals import (
        FeedbackSignal,
        JudgeScores,
        JudgeSignal,
        Rubric,
        WatchdogSignal,
    )

    r = Rubric(accuracy=5, clarity=5, completeness=5)
    sigs = [
        JudgeSignal(
            time_ms=10_000,
            request_id="p",
            primary="stable",
            shadow="canary",
            winner=w,
            scores=JudgeScores(primary=r, shadow=r),
            consistent=True,
        )
        for w in ("shadow", "shadow", "primary")
    ] + [
        FeedbackSignal(time_ms=10_500, request_id="r1", key_hash=None, value="retry"),
        FeedbackSignal(time_ms=10_500, request_id="unknown", key_hash=None, value="down"),
        WatchdogSignal(
            time_ms=10_000, variant="stable", prompt_id="p", passed=False, checks={}, latency_ms=1
        ),
    ]
    span = {"since_s": 10, "until_s": 70, "step_s": 10}
    answered = ({"r1": "canary"}, {})  # which variant answered request r1
    doc = series([], ["stable", "canary"], **span, signals=sigs, attribution=answered)
    i = doc["t"].index(10.0)
    canary, stable = doc["variants"]["canary"], doc["variants"]["stable"]
    assert canary["judge_win_rate"][i] == pytest.approx(2 / 3, abs=1e-4)
    assert stable["judge_win_rate"][i] == pytest.approx(1 / 3, abs=1e-4)
    assert canary["feedback_negative"][i] == 1  # the unknown request's feedback is left out
    assert stable["watchdog_fail_rate"][i] == 1.0
    assert canary["judge_win_rate"][i + 1] is None
    plain = series([], ["stable", "canary"], **span)
    assert "judge_win_rate" not in plain["variants"]["canary"]


@pytest.mark.parametrize(
    ("status", "valid"),
    [
        ("running", ["pause", "promote", "rollback", "abort"]),
        ("paused", ["resume", "promote", "rollback", "abort"]),
        ("completed", ["rollback", "restart"]),
        ("rolled_back", ["restart"]),
        ("aborted", ["restart"]),
    ],
)
def test_actions_offered_are_those_the_evaluator_applies(
    tmp_path: Path, status: str, valid: list[str]
) -> None:
    from extproc.evaluator.rollout import COMMANDS, RolloutState
    from extproc.ops.dashboard.views import valid_actions

    definition = load_experiment(write_experiment(tmp_path)).to_json_dict()
    state = RolloutState(status, 1, 0.0, "canary")  # type: ignore[arg-type]
    assert valid_actions(definition, state) == valid
    assert valid_actions(definition, None) == list(COMMANDS)  # no evaluator yet: it decides
    assert valid_actions({"name": "unreadable"}, state) == list(COMMANDS)


def test_a_small_difference_is_not_rounded_away() -> None:
    """Cost per request differs in the fifth decimal: the difference reads as such, not 0."""
    from extproc.ops.dashboard.views import comparison

    doc = {
        "stable": "stable",
        "variants": {
            "stable": {"cost_per_request": 0.0000324},
            "canary": {"cost_per_request": 0.0000424},
        },
    }
    cell = comparison(doc, [])["rows"][0]["candidates"]["canary"]
    assert cell["text"]["diff"] == "+0.0000100"
    assert cell["text"]["rel"] == "+30.9%"
