"""Credentials over real HTTP: the dashboard's actions and captured pairs, and the feedback
endpoint, refuse every malformed ``Authorization`` header with a 401 (never a 500), through one
shared check; the quality worker refuses to serve feedback without a token when feedback can
move the rollout; and an explicit Redis URL wins over what a state file remembers.

Both servers run in this process on free ports over a real Redis; the requests go through
httpx, which sends header bytes as given (so bytes that are not UTF-8 reach the server).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from extproc import store
from extproc.cli import common
from extproc.cli import main as cli
from extproc.config import ConfigError, load_experiment
from extproc.contract import keys
from extproc.dev import stack
from extproc.ops.dashboard import server
from extproc.quality import feedback
from extproc.quality.worker import QualitySettings, prepare
from tests.conftest import write_experiment

TOKEN = "s3cret-t0ken"
NAME = "exp"

# Every way a client can get the header wrong; each must be a 401.
MALFORMED: list[list[tuple[str, bytes]]] = [
    [],
    [("Authorization", b"")],
    [("Authorization", b"Bearer")],
    [("Authorization", b"Bearer  " + TOKEN.encode())],
    [("Authorization", b"Basic " + TOKEN.encode())],
    [("Authorization", TOKEN.encode())],
    [("Authorization", b"Bearer " + TOKEN.encode() + b"x")],
    [("Authorization", b"Bearer " + TOKEN[:-1].encode())],
    [("Authorization", b"Bearer \xff\xfe")],
    [("Authorization", b"Bearer " + TOKEN.encode() + b"\xe9")],
    [("Authorization", b"\xc3\x28 " + TOKEN.encode())],
    [("Authorization", b"Bearer " + TOKEN.encode())] * 2,
    [("Authorization", b"Bearer " + TOKEN.encode()), ("Authorization", b"Bearer nope")],
]
RIGHT = [("Authorization", b"Bearer " + TOKEN.encode())]


async def _serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def dashboard_url(redis_url: str) -> AsyncIterator[str]:
    async for url in _serve(server.make_app(redis_url, TOKEN)):
        yield url


@pytest.fixture
async def feedback_url(redis_url: str) -> AsyncIterator[str]:
    r = store.connect(redis_url)
    await r.set(keys.definition(NAME), json.dumps({"salt": "s"}))
    try:
        async for url in _serve(feedback.make_app(r, TOKEN)):
            yield f"{url}/v1/feedback"
    finally:
        await r.aclose()


@pytest.mark.parametrize("headers", MALFORMED, ids=range(len(MALFORMED)))
async def test_the_dashboard_refuses_a_malformed_credential_with_a_401(
    dashboard_url: str, headers: list[tuple[str, bytes]]
) -> None:
    async with httpx.AsyncClient(timeout=10) as c:
        for method, path in (
            ("POST", f"/api/experiments/{NAME}/actions/pause"),
            ("GET", f"/api/experiments/{NAME}/pairs"),
        ):
            r = await c.request(method, f"{dashboard_url}{path}", headers=headers)
            assert r.status_code == 401, (method, path, r.text)
            assert r.json() == {"error": "missing or wrong bearer token"}
            assert r.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("headers", MALFORMED, ids=range(len(MALFORMED)))
async def test_feedback_refuses_a_malformed_credential_with_a_401(
    feedback_url: str, headers: list[tuple[str, bytes]]
) -> None:
    body = {"experiment": NAME, "request_id": "r", "value": "down"}
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.post(feedback_url, json=body, headers=headers)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["type"] == "authentication_error"
    assert r.headers["WWW-Authenticate"] == "Bearer"


async def test_the_right_token_passes_both_and_the_scheme_is_case_insensitive(
    dashboard_url: str, feedback_url: str
) -> None:
    body = {"experiment": NAME, "request_id": "r", "value": "down"}
    lower = [("Authorization", b"bearer " + TOKEN.encode())]
    async with httpx.AsyncClient(timeout=10) as c:
        for headers in (RIGHT, lower):
            # Past the check: the experiment has no definition the dashboard knows of.
            action = await c.post(
                f"{dashboard_url}/api/experiments/nope/actions/pause", headers=headers
            )
            assert action.status_code == 404
            pairs = await c.get(f"{dashboard_url}/api/experiments/nope/pairs", headers=headers)
            assert pairs.status_code == 404
            posted = await c.post(feedback_url, json=body, headers=headers)
            assert posted.status_code == 202, posted.text


async def test_the_dashboards_figures_stay_readable_without_a_token(dashboard_url: str) -> None:
    async with httpx.AsyncClient(timeout=10) as c:
        assert (await c.get(f"{dashboard_url}/api/status")).status_code == 200
        assert (await c.get(f"{dashboard_url}/api/experiments/nope")).status_code == 404


# --- feedback that can move the rollout needs a token ------------------------------------------

FEEDBACK_GUARDRAIL = {"metric": "feedback_negative_rate", "max_increase": 0.5}


def _experiment(tmp: Path, action: str) -> Path:
    return write_experiment(tmp, guardrails=[FEEDBACK_GUARDRAIL | {"action": action}])


@pytest.mark.parametrize("action", ["rollback", "hold"])
def test_feedback_that_can_move_the_rollout_is_not_served_without_a_token(
    tmp_path: Path, action: str
) -> None:
    exp = load_experiment(_experiment(tmp_path, action))
    with pytest.raises(ConfigError) as err:
        prepare(exp, QualitySettings(feedback_listen="127.0.0.1:9104"))
    (problem,) = err.value.problems
    assert f"feedback_negative_rate can {action} the rollout" in problem
    assert feedback.TOKEN_ENV in problem
    assert "--feedback-insecure" in problem


def test_feedback_without_a_token_is_served_when_it_cannot_move_the_rollout_or_when_told(
    tmp_path: Path,
) -> None:
    acting = load_experiment(_experiment(tmp_path, "rollback"))
    listen = "127.0.0.1:9104"
    prepare(acting, QualitySettings(feedback_listen=listen, feedback_token=TOKEN))
    prepare(acting, QualitySettings(feedback_listen=listen, feedback_insecure=True))
    prepare(acting, QualitySettings())  # no endpoint: nothing to refuse
    warning_only = load_experiment(_experiment(tmp_path, "warn"))
    prepare(warning_only, QualitySettings(feedback_listen=listen))


# --- where a verb finds Redis ------------------------------------------------------------------

DEAD_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1


def _state_file(folder: Path, pid: int, start_time: str | None) -> Path:
    """A state file as `extproc up` writes it, naming a Redis nobody answers on."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = {"pid": pid, "start_time": start_time, "argv": [], "log": str(folder / "x.log")}
    doc = {"processes": {"sidecar": proc}, "endpoints": {"redis": DEAD_REDIS}}
    (folder / stack.STATE_FILE).write_text(json.dumps(doc))
    return folder


def _list(capsys: pytest.CaptureFixture[str], state_dir: Path, *extra: str) -> tuple[int, str, str]:
    code = cli.main(["experiment", "list", "--json", "--state-dir", str(state_dir), *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_redis_url_from_the_environment_wins_over_a_running_stacks_state(
    tmp_path: Path,
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # This test's own process stands for a running stack: the state file is not stale.
    me = _state_file(tmp_path / "live", os.getpid(), stack._start_time(os.getpid()))
    monkeypatch.delenv("REDIS_URL", raising=False)
    code, _, err = _list(capsys, me)
    assert code == common.EXIT_FAIL  # the running stack's (dead) Redis was used
    assert "Connection" in err
    monkeypatch.setenv("REDIS_URL", redis_url)
    assert _list(capsys, me)[:2] == (common.EXIT_OK, "[]\n")
    monkeypatch.setenv("REDIS_URL", DEAD_REDIS)
    assert _list(capsys, me, "--redis-url", redis_url)[:2] == (common.EXIT_OK, "[]\n")


def test_a_stale_state_file_is_reported_and_not_used(
    tmp_path: Path,
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The recorded pid runs, but it is not the process that was started (another start time).
    stale = _state_file(tmp_path / "stale", os.getpid(), "0")
    monkeypatch.setenv("REDIS_URL", redis_url)
    assert _list(capsys, stale)[:2] == (common.EXIT_OK, "[]\n")
    monkeypatch.delenv("REDIS_URL")
    _, _, err = _list(capsys, stale)  # the default Redis: there may be one on this machine
    assert err.count(f"ignoring {stale / stack.STATE_FILE}") == 1
    assert "none of the processes it records is running" in err
    assert "127.0.0.1:1." not in err  # never the stale Redis
