"""User feedback: ``POST /v1/feedback`` turns a thumbs-up, a retry or an escalation into a signal.

Feedback is the one quality signal that comes from the users themselves, so it must be cheap to
send: the client quotes either the ``x-request-id`` of the answer (Envoy returns it on every
response) or its conversation id, and a value::

    {"experiment": "chat-upgrade", "request_id": "...", "value": "down"}
    {"experiment": "chat-upgrade", "conversation_id": "c-42", "value": "retry"}

The endpoint does not look up which variant served the request: the evaluator already reads the
events, which carry ``request_id`` and ``key_hash``, and joins them. A conversation id is turned
into that same keyed hash here (the experiment's salt, ``assignment.key_hash``) and never stored.

Answers: 202 with the signal's stream id; 400 with every problem of the body; 404 for an
experiment Redis does not know; 401 without the bearer token when ``EXTPROC_FEEDBACK_TOKEN`` is
set (any malformed ``Authorization`` too); 503 when Redis cannot be reached.

Feedback can drive a guardrail, so an endpoint anyone can post to could push a rollback: the
quality worker refuses to serve it without a token when a feedback guardrail acts
(``extproc.quality.worker.prepare``), and `extproc up` always sets one.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import RedisError

from extproc import store
from extproc.auth import FEEDBACK_TOKEN_ENV as TOKEN_ENV
from extproc.auth import bearer_ok
from extproc.config import NAME_RE
from extproc.contract import signals
from extproc.contract.assignment import key_hash, salt_key

__all__ = ["TOKEN_ENV", "make_app"]

log = logging.getLogger(__name__)

_SALT_TTL_S = 10.0
"""Salts are cached briefly: re-registering an experiment with a new salt is rare, a lookup per
post is not needed."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    experiment: str = Field(pattern=NAME_RE)
    request_id: str | None = Field(default=None, min_length=1, max_length=256)
    conversation_id: str | None = Field(default=None, min_length=1, max_length=1024)
    value: signals.FeedbackValue


def _problems(raw: Any) -> tuple[_Body | None, list[str]]:
    if not isinstance(raw, dict):
        return None, ["(body): must be a JSON object"]
    problems = []
    body = None
    try:
        body = _Body.model_validate(raw)
    except ValidationError as err:
        for e in err.errors(include_url=False):
            where = ".".join(str(p) for p in e["loc"]) or "(body)"
            msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
            problems.append(f"{where}: {msg}")
    if raw.get("request_id") is None and raw.get("conversation_id") is None:
        problems.append("request_id: required unless conversation_id is given")
    return (None, problems) if problems else (body, [])


def _error(status: int, kind: str, message: str, problems: list[str] | None = None) -> web.Response:
    doc: dict[str, Any] = {"message": message, "type": kind}
    if problems is not None:
        doc["problems"] = problems
    return web.json_response({"error": doc}, status=status)


class _Salts:
    """Experiment salts from the definitions in Redis, cached for a few seconds."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._cache: dict[str, tuple[float, bytes | None]] = {}

    async def get(self, experiment: str) -> bytes | None:
        now = time.monotonic()
        hit = self._cache.get(experiment)
        if hit is not None and now - hit[0] < _SALT_TTL_S:
            return hit[1]
        definition = await store.get_definition(self.redis, experiment)
        salt = None if definition is None else salt_key(str(definition["salt"]))
        self._cache[experiment] = (now, salt)
        return salt


_REDIS: web.AppKey[aioredis.Redis] = web.AppKey("extproc_feedback_redis", aioredis.Redis)
_SALTS = web.AppKey("extproc_feedback_salts", _Salts)
_TOKEN = web.AppKey("extproc_feedback_token", str)


async def _feedback(request: web.Request) -> web.Response:
    token = request.app[_TOKEN]
    if token and not bearer_ok(request.headers.getall("Authorization", []), token):
        refused = _error(401, "authentication_error", "a valid bearer token is required")
        refused.headers["WWW-Authenticate"] = "Bearer"
        return refused
    try:
        raw = json.loads(await request.read())
    except (ValueError, RecursionError):
        return _error(400, "invalid_request_error", "invalid body", ["(body): not valid JSON"])
    body, problems = _problems(raw)
    if body is None:
        return _error(400, "invalid_request_error", "invalid feedback", problems)
    try:
        salt = await request.app[_SALTS].get(body.experiment)
        if salt is None:
            return _error(404, "not_found_error", f"unknown experiment {body.experiment!r}")
        signal = signals.FeedbackSignal(
            time_ms=int(time.time() * 1000),
            request_id=body.request_id,
            key_hash=None
            if body.conversation_id is None
            else key_hash(salt, body.conversation_id.encode()),
            value=body.value,
        )
        entry = await signals.append(request.app[_REDIS], body.experiment, signal)
    except (OSError, RedisError):
        log.warning("feedback not recorded", exc_info=True)
        return _error(503, "server_error", "feedback store unavailable; retry later")
    return web.json_response({"accepted": True, "id": entry}, status=202)


async def _healthz(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


def make_app(redis: aioredis.Redis, token: str = "") -> web.Application:
    """The feedback application; an empty ``token`` accepts posts without authentication."""
    app = web.Application(client_max_size=16 * 1024)
    app[_REDIS] = redis
    app[_SALTS] = _Salts(redis)
    app[_TOKEN] = token
    app.router.add_post("/v1/feedback", _feedback)
    app.router.add_get("/healthz", _healthz)
    return app
