"""The routing decision for one request, shared by the blocking router and the observer.

The observer recomputes how a request was assigned from the same headers the router saw (plus the
``x-llm-variant`` the router set), so the router's answer to Envoy can be a prebuilt constant and
all per-request bookkeeping (key hashing, telemetry) stays off the blocking path.
"""

from __future__ import annotations

import hmac
import logging
import os
from dataclasses import dataclass

from envoy.config.core.v3.base_pb2 import HeaderMap

from extproc.config import Experiment
from extproc.contract import headers as h
from extproc.contract.assignment import bucket_of, key_hash, random_bucket, salt_key
from extproc.contract.errors import ForcingNotAllowed, UnknownVariant
from extproc.routing.live import Routing
from extproc.telemetry.v1.event_pb2 import Assignment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Policy:
    """What the decision needs from the experiment file, compiled once."""

    salt: bytes
    sticky_keys: tuple[str, ...]
    forced_header: str | None
    forced_allow: frozenset[str]
    wanted: frozenset[str]
    secret_header: str | None = None
    secret: bytes | None = None  # None with a secret_header: the secret is unset, refuse all

    @classmethod
    def compile(cls, experiment: Experiment) -> Policy:
        fr = experiment.spec.forced_routing
        forced = fr.header if fr.enabled else None
        wanted = {*experiment.spec.sticky_keys, h.VARIANT, h.REQUEST_ID, h.SHADOW_COPY}
        if forced:
            wanted.add(forced)
        secret_header, secret = None, None
        if forced and fr.secret_env:
            secret_header = fr.secret_header
            wanted.add(secret_header)
            value = os.environ.get(fr.secret_env, "")
            secret = value.encode() if value else None
            if secret is None:
                log.warning(
                    "forced_routing.secret_env: %s is not set: every forced request is refused",
                    fr.secret_env,
                )
        return cls(
            salt=salt_key(experiment.spec.salt),
            sticky_keys=tuple(experiment.spec.sticky_keys),
            forced_header=forced,
            forced_allow=frozenset(fr.allow),
            wanted=frozenset(wanted),
            secret_header=secret_header,
            secret=secret,
        )


def read_headers(hm: HeaderMap, wanted: frozenset[str]) -> dict[str, bytes]:
    """The wanted headers of a request; for a repeated header the first value wins."""
    out: dict[str, bytes] = {}
    for hv in hm.headers:
        k = hv.key
        if k in wanted and k not in out:
            out[k] = hv.raw_value or hv.value.encode()
    return out


def forced_variant(policy: Policy, routing: Routing, hdrs: dict[str, bytes]) -> str | None:
    """The variant a client forces, None when it forces none; raises for a refused force."""
    if policy.forced_header is None:
        return None
    raw = hdrs.get(policy.forced_header)
    if not raw:
        return None
    if policy.secret_header is not None:
        given = hdrs.get(policy.secret_header, b"")
        if policy.secret is None or not hmac.compare_digest(given, policy.secret):
            raise ForcingNotAllowed(
                f"forcing a variant needs a valid {policy.secret_header} header", []
            )
    name = raw.decode("utf-8", "replace").strip()
    variants = list(routing.table.variants)
    if name not in variants:
        shown = name if len(name) <= 64 else name[:64] + "..."
        raise UnknownVariant(f"unknown variant {shown!r} in {policy.forced_header}", variants)
    if policy.forced_allow and name not in policy.forced_allow:
        raise ForcingNotAllowed(
            f"variant {name!r} may not be forced here", sorted(policy.forced_allow)
        )
    return name


def sticky_key(policy: Policy, hdrs: dict[str, bytes]) -> bytes | None:
    for k in policy.sticky_keys:
        v = hdrs.get(k)
        if v:
            return v
    return None


def hashed_variant(policy: Policy, routing: Routing, hdrs: dict[str, bytes]) -> str:
    """The variant of the request's sticky bucket, else of a random bucket."""
    key = sticky_key(policy, hdrs)
    bucket = random_bucket() if key is None else bucket_of(policy.salt, key)
    return routing.table.variant_for(bucket)


@dataclass(frozen=True)
class Attribution:
    """How the observer attributes a request it saw: variant, how it was chosen, key pseudonym."""

    variant: str
    assignment: Assignment.ValueType
    key_hash: str


# Read once: each ``Assignment.X`` is a Python-level lookup on the generated enum wrapper, and the
# access log attributes every request.
_FALLBACK = Assignment.ASSIGNMENT_FALLBACK
_FORCED = Assignment.ASSIGNMENT_FORCED
_STICKY = Assignment.ASSIGNMENT_STICKY
_RANDOM = Assignment.ASSIGNMENT_RANDOM


def attribute(
    policy: Policy, stable: str, hdrs: dict[str, bytes], known: tuple[str, ...]
) -> Attribution:
    key = sticky_key(policy, hdrs)
    kh = key_hash(policy.salt, key) if key is not None else ""
    chosen = hdrs.get(h.VARIANT, b"").decode("utf-8", "replace")
    if chosen not in known:
        return Attribution(stable, _FALLBACK, kh)
    forced = hdrs.get(policy.forced_header) if policy.forced_header else None
    if forced and forced.decode("utf-8", "replace").strip() == chosen:
        return Attribution(chosen, _FORCED, kh)
    return Attribution(chosen, _STICKY if key is not None else _RANDOM, kh)
