"""Fuzz targets for the parts that read untrusted input, for atheris and for the test suite.

Each target takes arbitrary bytes and either succeeds or raises the one error type its caller
handles (a ``RoutingError`` becomes a 4xx, a ``ConfigError`` a listed problem); anything else is
a bug. The test suite drives the same targets with hypothesis (``tests/unit/test_fuzz.py``), so CI
runs them on every commit; for a long coverage-guided run:

    .venv/bin/pip install atheris
    .venv/bin/python fuzz/targets.py headers -max_total_time=300
    .venv/bin/python fuzz/targets.py sse -max_total_time=300
    .venv/bin/python fuzz/targets.py config -max_total_time=300
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import yaml
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue

from extproc.config import EXAMPLE_EXPERIMENT, ConfigError, parse_experiment
from extproc.contract.errors import RoutingError
from extproc.routing.decide import (
    Policy,
    attribute,
    forced_variant,
    hashed_variant,
    read_headers,
)
from extproc.routing.live import Routing
from extproc.telemetry.inspect import ResponseInspector

_EXPERIMENT = parse_experiment(yaml.safe_load(EXAMPLE_EXPERIMENT.read_text()))
_POLICY = Policy.compile(_EXPERIMENT)
_ROUTING = Routing.build(_EXPERIMENT, 1, _EXPERIMENT.file_weights())
_KNOWN = tuple(_EXPERIMENT.variant_names)
_KEYS = [*sorted(_POLICY.wanted), "x-other"]


def header_map(data: bytes) -> HeaderMap:
    """Split bytes into header entries: a key chosen by one byte, a value up to the next NUL."""
    hm = HeaderMap()
    for part in data.split(b"\0"):
        if part:
            key = _KEYS[part[0] % len(_KEYS)]
            hm.headers.append(HeaderValue(key=key, raw_value=part[1:]))
    return hm


def headers(data: bytes) -> str | None:
    """The blocking routing decision and the observer's attribution of the same request."""
    hdrs = read_headers(header_map(data), _POLICY.wanted)
    try:
        forced = forced_variant(_POLICY, _ROUTING, hdrs)
        variant: str | None = forced or hashed_variant(_POLICY, _ROUTING, hdrs)
    except RoutingError as err:
        json.loads(err.body())  # the 4xx body is always valid JSON
        variant = None
    assert variant is None or variant in _KNOWN
    a = attribute(_POLICY, _EXPERIMENT.stable, hdrs, _KNOWN)
    assert a.variant in _KNOWN
    assert b"\0" not in a.key_hash.encode()
    return variant


def sse(data: bytes) -> None:
    """A response body cut in two at a place the first byte picks, as SSE and as JSON."""
    if not data:
        return
    body, cut = data[1:], data[0] % (len(data))
    for content_type in ("text/event-stream", "application/json"):
        inspector = ResponseInspector(content_type, max_capture_bytes=64)
        inspector.feed(body[:cut], 1)
        inspector.feed(body[cut:], 2)
        summary = inspector.finish()
        assert summary.response_bytes == len(body)


def config(data: bytes) -> None:
    """Any document: parsed, or refused with every problem as ``path: message``."""
    try:
        raw = yaml.safe_load(data)
    except yaml.YAMLError:
        return
    problems = config_problems(raw)
    assert all(isinstance(p, str) and ": " in p for p in problems)


def config_problems(raw: object) -> list[str]:
    """The problems ``parse_experiment`` lists for a document; [] when it is valid."""
    try:
        parse_experiment(raw)
    except ConfigError as err:
        problems = err.problems
    else:
        return []
    assert problems, "a refusal must name its problems"
    return problems


TARGETS: dict[str, Callable[[bytes], object]] = {"headers": headers, "sse": sse, "config": config}


def main() -> None:
    import atheris  # type: ignore[import-not-found]

    target = TARGETS[sys.argv.pop(1)]
    atheris.instrument_all()  # coverage feedback from every loaded module, the project's included
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
