"""The routing decision and the observer's attribution, on Envoy's real header messages."""

from __future__ import annotations

import json

import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.config import parse_experiment
from extproc.contract.errors import ForcingNotAllowed, UnknownVariant
from extproc.dataplane.router import Router
from extproc.routing.decide import (
    Policy,
    attribute,
    forced_variant,
    hashed_variant,
    read_headers,
)
from extproc.routing.live import LiveRouting, Routing
from extproc.telemetry.v1.event_pb2 import Assignment

DOC = {
    "name": "exp",
    "salt": "s",
    "stable": "stable",
    "variants": {
        "stable": {"cluster": "a", "weight": 0},
        "canary": {"cluster": "b", "weight": 100},
    },
    "sticky_keys": ["x-conversation-id", "x-user-id"],
}


def choose_variant(policy: Policy, routing: Routing, hdrs: dict[str, bytes]) -> str:
    """The router's order: a forced variant, else the request's bucket."""
    return forced_variant(policy, routing, hdrs) or hashed_variant(policy, routing, hdrs)


def hmap(**headers: str) -> HeaderMap:
    # Envoy sends raw_value; older versions sent value: accept both
    return HeaderMap(
        headers=[
            HeaderValue(key=k.replace("_", "-"), raw_value=v.encode())
            if i % 2 == 0
            else HeaderValue(key=k.replace("_", "-"), value=v)
            for i, (k, v) in enumerate(headers.items())
        ]
    )


def setup(**overrides: object) -> tuple[Policy, Routing]:
    exp = parse_experiment({**DOC, **overrides})
    return Policy.compile(exp), Routing.build(exp, 1, exp.file_weights())


def test_reads_raw_and_plain_values_first_duplicate_wins() -> None:
    m = hmap(x_conversation_id="c1", x_user_id="u1")
    m.headers.append(HeaderValue(key="x-conversation-id", raw_value=b"c2"))
    got = read_headers(m, frozenset({"x-conversation-id", "x-user-id"}))
    assert got == {"x-conversation-id": b"c1", "x-user-id": b"u1"}


def test_forced_variant_and_its_refusals() -> None:
    policy, routing = setup()
    assert choose_variant(policy, routing, {"x-experiment": b"stable"}) == "stable"
    with pytest.raises(UnknownVariant) as err:
        choose_variant(policy, routing, {"x-experiment": b"\xff\xfegpt"})
    assert json.loads(err.value.body())["error"]["valid_variants"] == ["stable", "canary"]
    policy, routing = setup(forced_routing={"allow": ["canary"]})
    with pytest.raises(ForcingNotAllowed):
        choose_variant(policy, routing, {"x-experiment": b"stable"})
    policy, routing = setup(forced_routing={"enabled": False})
    assert choose_variant(policy, routing, {"x-experiment": b"stable"}) == "canary"


def test_forcing_with_a_shared_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORCE_KEY", "s3cret")
    policy, routing = setup(forced_routing={"secret_env": "FORCE_KEY"})
    assert "x-experiment-key" in policy.wanted
    ok = {"x-experiment": b"stable", "x-experiment-key": b"s3cret"}
    assert choose_variant(policy, routing, ok) == "stable"
    for bad in (b"", b"s3cre", b"s3cret ", b"\xff"):
        with pytest.raises(ForcingNotAllowed, match="valid x-experiment-key"):
            choose_variant(policy, routing, {"x-experiment": b"stable", "x-experiment-key": bad})
    # no forcing header: the secret alone changes nothing
    assert choose_variant(policy, routing, {"x-experiment-key": b"s3cret"}) == "canary"
    monkeypatch.delenv("FORCE_KEY")
    policy, routing = setup(forced_routing={"secret_env": "FORCE_KEY"})
    with pytest.raises(ForcingNotAllowed):  # the secret is unset: nobody may force
        choose_variant(policy, routing, ok)


def test_attribution_kinds() -> None:
    policy, _ = setup()
    known = ("stable", "canary")
    a = attribute(policy, "stable", {"x-llm-variant": b"canary", "x-user-id": b"u"}, known)
    assert (a.variant, a.assignment) == ("canary", Assignment.ASSIGNMENT_STICKY)
    assert a.key_hash
    assert a.key_hash != "u"
    a = attribute(policy, "stable", {"x-llm-variant": b"canary"}, known)
    assert (a.assignment, a.key_hash) == (Assignment.ASSIGNMENT_RANDOM, "")
    a = attribute(policy, "stable", {"x-llm-variant": b"stable", "x-experiment": b"stable"}, known)
    assert a.assignment == Assignment.ASSIGNMENT_FORCED
    a = attribute(policy, "stable", {}, known)  # the sidecar did not answer in time
    assert (a.variant, a.assignment) == ("stable", Assignment.ASSIGNMENT_FALLBACK)


class _NoRedis:
    """Router tests never reach Redis; LiveRouting only needs the object."""


def test_router_answers_with_prebuilt_responses_and_immediate_errors() -> None:
    exp = parse_experiment(DOC)
    router = Router(LiveRouting(exp, _NoRedis()))  # type: ignore[arg-type]
    req = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=hmap(x_user_id="u")))
    resp = router.answer(req)
    assert resp is router.responses["canary"]  # weight 100 in the file
    mutation = resp.request_headers.response.header_mutation.set_headers[0].header
    assert (mutation.key, mutation.raw_value) == ("x-llm-variant", b"canary")
    assert resp.request_headers.response.clear_route_cache
    bad = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=hmap(x_experiment="zz")))
    err = router.answer(bad).immediate_response
    assert err.status.code == 400
    assert b"valid_variants" in err.body
