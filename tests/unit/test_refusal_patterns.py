"""The refusal patterns are compiled with a leading word boundary checked after its word
(``quality.rules.boundary_last``), which Python's ``re`` searches faster: the same matches, at the
same places, with the same groups, as the patterns as written."""

from __future__ import annotations

import random
import re
import zlib

import pytest

from extproc.config import DEFAULT_REFUSALS
from extproc.quality.rules import boundary_last

pytestmark = pytest.mark.timeout(60)

FLAGS = re.IGNORECASE | re.MULTILINE
# What the patterns look for, their near misses, and what borders a word: letters that fold to
# the patterns' (dotless i, the Kelvin sign, long s), digits, underscore, punctuation, newlines.
PIECES = [
    "I", "i", "\u0131", "\u0130", "As", "as", "a", "s", "\u017f", "\u212a", "AI", "an", " ",
    "  ", "\n", "\t", "'", "\u2019", "m", "am", "can't", "cannot", "can\u2019t", "won't", "wont",
    "unable to", "not able to", "help", "assist", "sorry", "afraid", "language model", "foo",
    "bar", "x", "xx", "_", "9", ".", ",", "-", "\u00e9", "\u4e2d", "As an AI", "I'm not able to",
    "I\u2019m not able to", "_9", "\u00e9x", "I'm sorry", "I can't help", "I am unable to", " help",
]  # fmt: skip
PATTERNS = [
    *DEFAULT_REFUSALS,
    r"\bfoo|bar",
    r"\bfo?o",
    r"\bx{2}",
    r"\bxx\b",
    r"\b_9",
    "\\b\u00e9(x)",  # a word of a letter beyond ASCII
    r"\bI(?P<rest>.*)$",
]


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(PIECES, k=rng.randint(0, 12))) for _ in range(n)]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_the_rewritten_pattern_finds_what_the_written_one_finds(pattern: str) -> None:
    written, rewritten = re.compile(pattern, FLAGS), re.compile(boundary_last(pattern), FLAGS)
    matched = 0
    for text in texts(20_000, seed=zlib.crc32(pattern.encode())):
        a, b = written.search(text), rewritten.search(text)
        assert (a and (a.span(), a.groups())) == (b and (b.span(), b.groups())), (pattern, text)
        matched += a is not None
    assert matched > 20  # the texts reach the patterns, not only their misses


@pytest.mark.parametrize(
    ("pattern", "compiled"),
    [
        (r"\bI (can)", r"I(?<!\w{2}) (can)"),
        (r"\bAs an AI( language model)?\b", r"As(?<!\w{3}) an AI( language model)?\b"),
        (r"\bfo?o", r"f(?<!\w{2})o?o"),  # a quantified character stays out of the word
        (r"\bx{2}", r"\bx{2}"),  # nothing left outside the quantifier: as written
        (r"\b(foo)", r"\b(foo)"),
        (r"^\s*(I am)", r"^\s*(I am)"),
        (r"\\bfoo", r"\\bfoo"),  # a backslash, then "bfoo": no boundary
    ],
)
def test_which_patterns_are_rewritten(pattern: str, compiled: str) -> None:
    assert boundary_last(pattern) == compiled
