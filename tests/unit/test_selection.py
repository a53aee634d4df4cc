"""Filing requests under experiments (``match``) and pinning classes of them (``overrides``)."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.config import EXAMPLE_EXPERIMENT, ConfigError, load_experiment, parse_experiment
from extproc.contract.selection import HeaderValues, RequestTraits, Selector, Selectors

pytestmark = pytest.mark.timeout(10)


def test_a_header_beats_the_route_which_beats_the_model() -> None:
    sel, problems = Selector.build(
        {
            "by-model": Selectors(models=["m"]),
            "by-route": Selectors(routes=["r"]),
            "by-header": Selectors(headers=[HeaderValues(name="x-app", values=["a"])]),
            "rest": None,
        }
    )
    assert problems == []
    assert sel.pick(RequestTraits("m", "r", {"x-app": b"a"})) == "by-header"
    assert sel.pick(RequestTraits("m", "r", {"x-app": b"other"})) == "by-route"
    assert sel.pick(RequestTraits("m", None, {})) == "by-model"
    assert sel.pick(RequestTraits("other", "other", {})) == "rest"
    assert sel.header_names == {"x-app"}


def test_without_a_default_an_unknown_request_matches_nothing() -> None:
    sel, _ = Selector.build({"chat": Selectors(models=["chat-1"])})
    assert sel.pick(RequestTraits("embed-3")) is None
    assert sel.pick(RequestTraits()) is None


def test_claims_on_one_trait_and_two_defaults_are_reported() -> None:
    _, problems = Selector.build(
        {
            "a": Selectors(models=["m", "n"]),
            "b": Selectors(models=["n"]),
            "c": None,
            "d": None,
        }
    )
    assert problems == [
        "b and a both match model 'n'",
        "d and c both match every request (no `match`)",
    ]


def _with(**changes: Any) -> dict[str, Any]:
    doc = load_experiment(EXAMPLE_EXPERIMENT).spec.model_dump(mode="json")
    return {**doc, **changes}


def test_every_problem_of_match_and_overrides_is_listed_with_its_path() -> None:
    doc = _with(
        match={},
        overrides=[
            {"variant": "nope", "models": ["alias"]},
            {"variant": "stable"},
            {"variant": "stable", "headers": [{"name": "X-Bad", "values": ["v"]}]},
            {"variant": "stable", "models": ["alias"]},
        ],
    )
    with pytest.raises(ConfigError) as err:
        parse_experiment(doc)
    problems = err.value.problems
    assert "match: names no model, route or header (leave it out to take every request)" in (
        problems
    )
    assert "overrides.0.variant: 'nope' is not one of the variants" in problems
    assert "overrides.1: names no model, route or header to match" in problems
    assert any(p.startswith("overrides.2.headers.0.name") for p in problems)
    assert "overrides.3 and overrides.0 both match model 'alias'" in problems


def test_a_valid_match_and_override_parse() -> None:
    exp = parse_experiment(
        _with(
            match={"models": ["chat-1"], "routes": ["chat"]},
            overrides=[{"variant": "stable", "routes": ["legacy"]}],
        )
    )
    assert exp.spec.match is not None
    assert exp.spec.match.traits() == [("model", "chat-1"), ("route", "chat")]
    assert exp.spec.overrides[0].variant == "stable"
