"""Which conversation each counted request and sample of a variant's window came from.

Why: the tests treat requests as independent, but assignment is per conversation (the sticky
key), and agent sessions of a hundred requests with a common slowness or refusal habit break
that (docs/STATISTICS.md, "Conversations as the unit"). The judge needs, per conversation, the
counts behind each rate and the samples behind each quantile and mean, to measure the design
effect (``extproc.stats.clustered``) and the number of distinct conversations.

Fed by one call at the end of ``VariantWindow.add`` (and ``add_hung``): what the window just
counted is attributed to the request's conversation by difference, so the window's own rules
(what counts as an error, when a column gets a sample) are not repeated here.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from extproc.stats.clustered import column_design_effect, design_effect

# The window's counters behind every request-level rate (guardrail_metrics.METRICS), and its
# sample columns with the name ``VariantWindow.samples`` knows them by.
COUNTERS = (
    "requests",
    "errors",
    "timeouts",
    "successes",
    "answered",
    "refusals",
    "tool_calls",
    "empty_answers",
    "json_checked",
    "json_invalid",
)
COLUMNS = {
    "latency": "latency_ms",
    "ttft": "ttft_ms",
    "completion_tokens": "completion_tokens",
    "response_bytes": "response_bytes",
    "answer_chars": "answer_chars",
    "output_tokens_per_s": "output_tokens_per_s",
    "cost": "cost",
    "cached_prompt_tokens": "cached_prompt_tokens",
}


def _ids() -> array[int]:
    return array("q")


@dataclass
class Clusters:
    """Per conversation (sticky key; an unkeyed request is its own): each counter's total, and
    the conversation of every sample of every column, in the column's order."""

    index: dict[str, int] = field(default_factory=dict)
    size: int = 0  # conversations so far
    totals: dict[str, array[int]] = field(
        default_factory=lambda: {name: array("q") for name in COUNTERS}
    )
    ids: dict[str, array[int]] = field(default_factory=lambda: {s: _ids() for s in COLUMNS})
    seen: dict[str, int] = field(default_factory=dict)

    def add(self, window: object, key_hash: str) -> None:
        """Attribute to ``key_hash`` whatever ``window`` (a ``VariantWindow``, read by the counter
        and column names above, so the two modules do not import each other) counted since the
        last call."""
        cid = self.index.get(key_hash) if key_hash else None
        if cid is None:
            cid = self.size
            self.size += 1
            if key_hash:
                self.index[key_hash] = cid
            for column in self.totals.values():
                column.append(0)
        seen = self.seen
        for name, column in self.totals.items():
            now = getattr(window, name)
            grew = now - seen.get(name, 0)
            if grew:
                column[cid] += grew
                seen[name] = now
        for source, attr in COLUMNS.items():
            now = len(getattr(window, attr))
            grew = now - seen.get(attr, 0)
            if grew:
                self.ids[source].extend([cid] * grew)
                seen[attr] = now

    def rate_design_effect(self, events: str, trials: str) -> float:
        """Design effect of ``events / trials`` (counter names); 1 for counters not kept here
        (quality signals, which are not per request)."""
        if events not in self.totals or trials not in self.totals:
            return 1.0
        y = np.frombuffer(self.totals[events], dtype=np.int64).astype(np.float64)
        m = np.frombuffer(self.totals[trials], dtype=np.int64).astype(np.float64)
        return design_effect(y, m, y)

    def column_ids(self, source: str) -> NDArray[np.int64]:
        """The conversation of each sample of ``source`` (aligned with ``samples(source)``)."""
        return np.frombuffer(self.ids[source], dtype=np.int64).copy()

    def sample_design_effect(self, source: str, values: NDArray[np.float64]) -> float:
        """Design effect of the mean of ``values``, one per sample of ``source`` (the samples
        themselves, or an indicator such as "beyond the threshold")."""
        ids = self.column_ids(source)
        if ids.size != values.size:  # samples appended outside ``add``: nothing to attribute
            return 1.0
        return column_design_effect(values, ids)
