"""Property-based tests of every parser of untrusted input, through the fuzz targets.

The targets (``fuzz/targets.py``) assert their own invariants; here hypothesis feeds them
generated and structured inputs on every CI run. Inputs that caused trouble are pinned as
examples.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from extproc.config import EXAMPLE_EXPERIMENT
from fuzz import targets

pytestmark = pytest.mark.timeout(120)
FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.binary(max_size=2000))
@example(b"\x05canary\x00\x03\xff\xfe\x00\x01" + b"x" * 100_000)  # huge value, invalid UTF-8
def test_headers_target(data: bytes) -> None:
    targets.headers(data)


@FAST
@given(st.lists(st.tuples(st.integers(1, 255), st.binary(max_size=300)), max_size=40))
def test_duplicate_and_noisy_headers_keep_the_sticky_decision(
    parts: list[tuple[int, bytes]],
) -> None:
    """Noise in other headers (and repeats) never changes where a conversation goes.

    A part is a key byte (never 0, the targets' separator) and a value without separators."""
    # The key byte is an index modulo the key count; one count up, it is never the separator 0.
    key = targets._KEYS.index("x-conversation-id") + len(targets._KEYS)
    sticky = b"\x00".join(bytes([key]) + b"conv-1" for _ in "a")
    noise = b"\x00".join(
        bytes([k]) + v.replace(b"\0", b"")
        for k, v in parts
        if targets._KEYS[k % len(targets._KEYS)] not in ("x-conversation-id", "x-experiment")
    )
    assert targets.headers(sticky + b"\x00" + noise) == targets.headers(sticky)


@FAST
@given(st.binary(max_size=3000))
@example(b'\x10data: {"choices":[{"delta":{"content":"\xff"}}]}\n\ndata: [DONE]\n\n')
@example(b"\x00data: " + b"x" * 70_000)  # one event far beyond the size limit, never ended
def test_sse_and_json_target(data: bytes) -> None:
    targets.sse(data)


@FAST
@given(st.binary(max_size=1000))
def test_config_target_on_bytes(data: bytes) -> None:
    targets.config(data)


BASE: dict[str, Any] = yaml.safe_load(EXAMPLE_EXPERIMENT.read_text())
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.lists(st.integers(-5, 200), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*prefix, i))
    return out


PATHS = paths(BASE)


@FAST
@given(st.lists(st.tuples(st.sampled_from(PATHS), VALUES, st.booleans()), min_size=1, max_size=4))
def test_mutated_experiment_files_are_parsed_or_refused_with_paths(
    edits: list[tuple[tuple[Any, ...], Any, bool]],
) -> None:
    doc = copy.deepcopy(BASE)
    for path, value, delete in edits:
        parent: Any = doc
        for p in path[:-1]:
            inside = (isinstance(parent, dict) and p in parent) or (
                isinstance(parent, list) and isinstance(p, int) and p < len(parent)
            )
            if inside:
                parent = parent[p]
            else:
                parent = None
                break
        last = path[-1]
        if isinstance(parent, dict):
            if delete:
                parent.pop(last, None)
            else:
                parent[last] = value
        elif isinstance(parent, list) and isinstance(last, int) and last < len(parent):
            parent[last] = value
    roots = set(BASE) | {"(top level)"}
    for problem in targets.config_problems(doc):
        where = problem.split(":", 1)[0]
        assert where.split(".", 1)[0].split(" ", 1)[0] in roots, problem
