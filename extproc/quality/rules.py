"""Per-response quality signals and the redaction of captured texts.

A regressed model answers worse, not louder: refusals, empty answers and a change in length are
visible in every response without any judge, so they are computed for every response (on the
first ``SIGNAL_CHARS`` characters, where a refusal shows itself) and go into telemetry.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from extproc.config import ExperimentSpec
from extproc.contract.assignment import BUCKETS

SIGNAL_CHARS = 600
"""Answer text kept for signals when the request is not captured."""

REDACTED = "[REDACTED]"

CAPTURE_LOOKAHEAD = 2
"""Texts are kept up to this many times ``capture.max_bytes`` for redaction to see past the cut."""


@dataclass(frozen=True)
class QualityRules:
    """The experiment's patterns, each compiled on its own.

    Not one alternation of them all: a pattern that opens with its own global flags (``(?s)``)
    is valid alone, and passes ``extproc check``, but not inside an alternation, where the
    sidecar failed to start on it; group numbers and names would also clash across patterns.
    Searching them one after the other is no slower (a 600-character answer: 37 against 39 us).
    """

    refusals: tuple[re.Pattern[str], ...]
    redact: tuple[re.Pattern[str], ...]
    capture_share: float
    capture_bytes: int

    @classmethod
    def compile(cls, spec: ExperimentSpec) -> QualityRules:
        refusal_flags = re.IGNORECASE | re.MULTILINE
        return cls(
            refusals=tuple(
                re.compile(boundary_last(p), refusal_flags) for p in spec.quality.refusal_patterns
            ),
            redact=tuple(re.compile(p) for p in spec.capture.redact),
            capture_share=spec.capture.sample,
            capture_bytes=spec.capture.max_bytes,
        )

    def is_refusal(self, text: str) -> bool:
        head = text[:SIGNAL_CHARS]
        return any(p.search(head) is not None for p in self.refusals)

    def captured(self, text: str) -> str:
        """``text`` as stored: redacted first, then cut to ``capture_bytes`` of UTF-8.

        Redacting what was already cut would miss a secret straddling the cut and store its
        first part (``ann@exa``). So the patterns run over the whole text the caller kept (more
        than the limit: see ``CAPTURE_LOOKAHEAD``), and a match that starts before the cut is
        replaced whole. Only a match longer than the lookahead could still be cut unseen. Where
        matches of different patterns overlap, everything any of them covers is replaced, once.
        """
        end = _chars_within(text, self.capture_bytes)
        spans = sorted(
            (m.start(), m.end()) for p in self.redact for m in p.finditer(text) if m.start() < end
        )
        out: list[str] = []
        pos = 0
        for start, stop in spans:
            if start < pos:  # inside what an earlier match already replaced
                pos = max(pos, stop)
                continue
            out += (text[pos:start], REDACTED)
            pos = stop
        out.append(text[pos:end])
        return "".join(out)

    def captures(self, request_id: str) -> bool:
        """Whether this request's texts are kept: a pure function of the request id, so the
        primary and its mirrored copy (same ``x-request-id``) agree without talking."""
        if self.capture_share <= 0 or not request_id:
            return False
        digest = hashlib.blake2b(request_id.encode(), digest_size=8, person=b"extproc-cap").digest()
        return int.from_bytes(digest, "big") % BUCKETS < self.capture_share * BUCKETS / 100


_LEADING_WORD = re.compile(r"\\b(\w+)")
_QUANTIFIERS = frozenset("?*+{")


def boundary_last(pattern: str) -> str:
    """``pattern`` with a leading word boundary checked after the word it guards: ``\\bI ...``
    becomes ``I(?<!\\w{2}) ...``, which matches the same strings at the same places.

    Why: the refusal patterns run over the first 600 characters of every answer, and Python's
    ``re`` tries a pattern opening with ``\\b`` at every position; one opening with a literal
    skips ahead to where that literal is. The default patterns cost a third less
    (docs/PERFORMANCE.md). The same: ``\\b`` before a word character holds where the character
    before it is no word character (or there is none), which is what the lookbehind checks once
    the word's k characters, all word characters, are matched: not k + 1 word characters in a
    row. A character a quantifier applies to stays out of the word, and a pattern that does not
    open with ``\\b`` and a word is left as it is.
    """
    m = _LEADING_WORD.match(pattern)
    if m is None:
        return pattern
    word = m.group(1)
    if pattern[m.end() : m.end() + 1] in _QUANTIFIERS:
        word = word[:-1]
    if not word:
        return pattern
    return f"{word}(?<!\\w{{{len(word) + 1}}}){pattern[2 + len(word) :]}"


def _chars_within(text: str, limit: int) -> int:
    """How many leading characters of ``text`` fit in ``limit`` bytes of UTF-8."""
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return len(text)
    cut = limit
    while cut > 0 and raw[cut] & 0xC0 == 0x80:  # a continuation byte: that character straddles
        cut -= 1
    return len(raw[:cut].decode("utf-8", "surrogatepass"))
