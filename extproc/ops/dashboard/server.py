"""The dashboard's HTTP server: a JSON API over Redis and the static page that polls it.

The figures are open (they are what `extproc status` shows to anyone with Redis access); the
captured prompts and answers (the pairs) and the actions need the bearer token: users' texts are
not figures, and actions change the rollout. The token travels in an ``Authorization`` header,
which a page of another site cannot make a browser send, so the actions need no other CSRF
defence. The page receives the token in the URL's fragment (``/#token=...``), which browsers
never send to a server or put in a ``Referer``.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from extproc import store
from extproc.auth import bearer_ok
from extproc.evaluator.rollout import COMMANDS, send_command
from extproc.ops.dashboard import views

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
REDIS = web.AppKey("redis", aioredis.Redis)
TOKEN = web.AppKey("token", str)
ACTOR = "dashboard"
DEFAULT_PAIRS, MAX_PAIRS = 20, 500
# The page's scripts and styles are its own files: no inline code, nothing from elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _name(request: web.Request) -> str:
    return request.match_info["name"]


class BadRequest(Exception):
    """A malformed request: a 400 with this message."""


def _number(request: web.Request, key: str) -> float | None:
    """A positive number from the query string, None when absent."""
    raw = request.query.get(key)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise BadRequest(f"{key} must be a positive number")
    return value


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bad input is a 400 and Redis trouble a 503, with the reason as JSON, never a traceback
    page; API answers are never cached (the page polls them)."""
    try:
        response = await handler(request)
    except BadRequest as err:
        response = _error(400, str(err))
    except (RedisError, OSError) as err:
        log.warning("%s %s: %s", request.method, request.path, err)
        response = _error(503, f"redis: {type(err).__name__}: {err}")
    if request.path.startswith("/api/"):
        response.headers["Cache-Control"] = "no-store"
    response.headers.update(SECURITY_HEADERS)
    return response


def _unauthorised(request: web.Request) -> web.Response | None:
    """None when the request carries the token, else the 401 to answer."""
    if bearer_ok(request.headers.getall("Authorization", []), request.app[TOKEN]):
        return None
    return _error(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


async def api_status(request: web.Request) -> web.Response:
    return web.json_response(await views.overview(request.app[REDIS]))


async def api_experiment(request: web.Request) -> web.Response:
    doc = await views.experiment(request.app[REDIS], _name(request))
    if doc is None:
        return _error(404, f"no experiment {_name(request)!r} in Redis")
    return web.json_response(doc)


async def api_series(request: web.Request) -> web.Response:
    span, step = _number(request, "span"), _number(request, "step")
    doc = await views.experiment_series(request.app[REDIS], _name(request), span, step)
    if doc is None:
        return _error(404, f"no experiment {_name(request)!r} in Redis")
    return web.json_response(doc)


async def api_pairs(request: web.Request) -> web.Response:
    """Users' prompts and the variants' answers: only with the token."""
    if refused := _unauthorised(request):
        return refused
    count = int(_number(request, "count") or DEFAULT_PAIRS)
    if not 1 <= count <= MAX_PAIRS:
        raise BadRequest(f"count must be from 1 to {MAX_PAIRS}")
    doc = await views.pairs(request.app[REDIS], _name(request), count)
    if doc is None:
        return _error(404, f"no experiment {_name(request)!r} in Redis")
    return web.json_response(doc)


async def api_action(request: web.Request) -> web.Response:
    """Record an operator intent exactly as `extproc experiment VERB NAME` does; the evaluator
    applies it on its next tick and writes the audit record."""
    if refused := _unauthorised(request):
        return refused
    name, verb = _name(request), request.match_info["verb"]
    r = request.app[REDIS]
    if await store.get_definition(r, name) is None:
        return _error(404, f"no experiment {name!r} in Redis")
    if verb not in COMMANDS:
        return _error(400, f"unknown action {verb!r}; one of {', '.join(COMMANDS)}")
    try:
        body: Any = await request.json() if request.can_read_body else {}
    except ValueError as err:
        raise BadRequest(f"the body must be JSON: {err}") from err
    reason = str(body.get("reason") or "") if isinstance(body, dict) else ""
    entry = await send_command(r, name, verb, ACTOR, reason)
    log.info("%s %s recorded (%s) from %s", verb, name, entry, request.remote)
    return web.json_response({"experiment": name, "command": verb, "id": entry}, status=202)


def make_app(redis_url: str, token: str) -> web.Application:
    """The application; its Redis client lives as long as the application runs."""
    app = web.Application(middlewares=[_guard])
    app[TOKEN] = token

    async def redis_client(app: web.Application) -> AsyncIterator[None]:
        app[REDIS] = store.connect(redis_url, timeout_s=5)
        yield
        await app[REDIS].aclose()

    app.cleanup_ctx.append(redis_client)
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/status", api_status)
    app.router.add_get("/api/experiments/{name}", api_experiment)
    app.router.add_get("/api/experiments/{name}/series", api_series)
    app.router.add_get("/api/experiments/{name}/pairs", api_pairs)
    app.router.add_post("/api/experiments/{name}/actions/{verb}", api_action)
    app.router.add_static("/static/", STATIC)
    return app


def run(redis_url: str, host: str, port: int, token: str | None) -> None:
    """Serve until SIGINT/SIGTERM. Without a token one is made up and printed (only then: a
    token the operator chose is not echoed into logs)."""
    url = f"http://{host}:{port}/"
    if token is None:
        token = secrets.token_urlsafe(24)
        print(f"dashboard on {url}#token={token}", flush=True)
    else:
        print(f"dashboard on {url} (actions need the configured token)", flush=True)
    web.run_app(make_app(redis_url, token), host=host, port=port, print=None, access_log=None)
