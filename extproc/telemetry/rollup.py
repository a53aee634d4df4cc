"""Per-variant aggregates per time bucket, written as events arrive, so reads cost the same at
1 request a second and at 1,000.

Why: every operator surface used to decode the newest raw events on each refresh. That costs
seconds under load and still covers only the newest few seconds of a busy rollout, so no chart
could show a rollout whole. The writer now also adds each batch into rollups: for every bucket
of time, and for every kind of traffic and variant, the counts, sums and latency sketches the
figures are made of. A refresh reads a few dozen small hashes, whatever the traffic.

What is exact and what is not: counts, sums, rates and means are exact (integers, and float
sums of the output speed). Quantiles come from a log-bucketed sketch (the DDSketch layout):
every latency is kept as the index of the bucket ``(gamma^(i-1), gamma^i]`` it falls in, so a
quantile read back is within ``ALPHA`` (2%) of the true sample quantile's value, whatever the
distribution, and sketches of many buckets merge by adding counts. The evaluator does not judge
from rollups: its tests need exact ranks, and it keeps reading the events of its stage.

Requests still open are not a sum: a request noticed open (its in-flight notice) stops being
open when its final event comes. The writer keeps them in one sorted set per kind of traffic and
variant (member: the request id, score: its start), adding on the notice and removing on the
final event, in the same script; a reader counts members. A request whose final event never
comes (its sidecar died) stops counting after :data:`OPEN_FOR_AT_MOST_MS`.

Layout in Redis (one hash per bucket, all under the experiment's hash tag): field
``<traffic>|<variant>|<name>``; a sketch bin is ``<name>:<index>``; ``refused`` counts the
requests turned away before any variant was chosen. Buckets are written at two widths
(:data:`WIDTHS_S`) so that a range of minutes and one of hours both read a few dozen hashes:
:func:`read_span` covers a span's whole 5 min buckets with coarse hashes and only its ragged ends
with fine ones. Cost is not stored: a price is linear in tokens, so the priced token sums give it
back at read time at the variant's current price.
"""

from __future__ import annotations

import functools
import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, TypeAlias

import redis.asyncio as aioredis

from extproc.contract import keys
from extproc.telemetry import outcome
from extproc.telemetry.v1.event_pb2 import TelemetryEvent

Redis: TypeAlias = aioredis.Redis | aioredis.RedisCluster

WIDTHS_S: Final = (10, 300)
"""Bucket widths written (seconds): 10 s buckets for ranges of minutes, 5 min ones for hours."""
FINE_S, COARSE_S = WIDTHS_S
FINE_KEPT_S: Final = 6 * 3600
"""How long a fine bucket is kept (at most: the retention may be shorter). A fine bucket of a
busy experiment takes about 6 KiB of Redis; kept as long as the coarse ones (30 days by default)
they would take over a GiB per experiment. Spans that reach further back read coarse buckets
there (:func:`span_starts`), and a chart of more than a few hours steps by 5 minutes or more."""

ALPHA: Final = 0.02
"""Relative accuracy of a sketch's quantiles."""

_GAMMA: Final = (1 + ALPHA) / (1 - ALPHA)
_LOG_GAMMA: Final = math.log(_GAMMA)
OPEN_FOR_AT_MOST_MS: Final = 3_600_000
"""A request noticed open longer than this is taken as lost (its final event never came)."""

REFUSED: Final = "refused"
"""The field counting a bucket's refused requests (no variant: turned away before routing)."""
_REFUSED_FIELD: Final = REFUSED.encode()

_ZERO: Final = "z"  # the sketch bin of values <= 0 (a request answered within the clock's tick)
_ZERO_BIN: Final = -(2**31)  # its index in memory: below every other bin


@dataclass
class Sketch:
    """A mergeable quantile sketch of positive values (milliseconds), relative accuracy ALPHA."""

    bins: Counter[int] = field(default_factory=Counter)

    def add(self, x: float) -> None:
        self.bins[_ZERO_BIN if x <= 0 else math.ceil(math.log(x) / _LOG_GAMMA)] += 1

    def merge(self, other: Sketch) -> None:
        self.bins.update(other.bins)

    @property
    def count(self) -> int:
        return sum(self.bins.values())

    def quantile(self, q: float) -> float | None:
        """The value at rank ``q * (n - 1)`` (the lower one, as a sample has it), within ALPHA
        of it; None for an empty sketch."""
        return self.quantiles((q,))[0]

    def quantiles(self, qs: tuple[float, ...]) -> list[float | None]:
        """:meth:`quantile` of each of ``qs`` (ascending), in one pass over the sorted bins."""
        n = self.count
        if n == 0:
            return [None] * len(qs)
        out: list[float | None] = []
        ranks = iter(q * (n - 1) for q in qs)
        rank = next(ranks)
        seen = 0
        for b in sorted(self.bins):
            seen += self.bins[b]
            while seen > rank:
                out.append(0.0 if b == _ZERO_BIN else 2 * _GAMMA**b / (_GAMMA + 1))
                rank = next(ranks, math.inf)
            if len(out) == len(qs):
                return out
        raise AssertionError("unreachable: the ranks are covered")  # pragma: no cover

    def fields(self, name: str) -> dict[str, int]:
        """The sketch as hash fields ``<name>:<bin>``."""
        return {f"{name}:{_ZERO if b == _ZERO_BIN else b}": n for b, n in self.bins.items()}


# Counters of a tally, each an integer.
_COUNTS: Final = (
    "requests",
    "errors",
    "client_errors",
    "timeouts",
    "successes",
    "tool_calls",
    "prompt_tokens",
    "completion_tokens",
    "priced",
    "priced_prompt_tokens",
    "priced_completion_tokens",
    "cached_reported",
    "cached_prompt_tokens",
    "tps_n",
    "answered",
    "refusals",
    "answer_chars",
    "inspected",
    "empty",
    "json_checked",
    "json_invalid",
)
_SUMS: Final = ("tps_sum",)
_SKETCHES: Final = ("latency", "ttft")
_LATENCY_QS: Final = (0.5, 0.95, 0.99)


@dataclass
class Tally:
    """One variant's aggregates over one kind of traffic: what its figures are made of.

    The rules are :mod:`extproc.telemetry.outcome`'s, as for the evaluator's window: errors are
    server errors; timings, tokens per answer and answer signals count complete answers only.
    """

    counts: Counter[str] = field(default_factory=Counter)
    sums: dict[str, float] = field(default_factory=dict)
    sketches: dict[str, Sketch] = field(default_factory=dict)

    def add(self, ev: TelemetryEvent) -> None:
        c = self.counts
        c["requests"] += 1
        if ev.error in outcome.SERVER_ERRORS:
            c["errors"] += 1
            c["timeouts"] += outcome.is_timeout(ev)
        elif ev.error in outcome.CLIENT_ERRORS:
            c["client_errors"] += 1
        c["prompt_tokens"] += ev.prompt_tokens
        c["completion_tokens"] += ev.completion_tokens
        if not outcome.is_success(ev):
            return
        c["successes"] += 1
        if ev.HasField("prompt_tokens") or ev.HasField("completion_tokens"):
            c["priced"] += 1
            c["priced_prompt_tokens"] += ev.prompt_tokens
            c["priced_completion_tokens"] += ev.completion_tokens
        if (cached := outcome.cached_prompt_tokens(ev)) is not None:
            c["cached_reported"] += 1
            c["cached_prompt_tokens"] += cached
        c["tool_calls"] += outcome.called_tool(ev)
        if ev.HasField("duration_ms"):
            self._sketch("latency").add(ev.duration_ms)
        if ev.HasField("first_token_ms"):
            self._sketch("ttft").add(ev.first_token_ms)
        if (tps := outcome.output_tokens_per_s(ev)) is not None:
            c["tps_n"] += 1
            self.sums["tps_sum"] = self.sums.get("tps_sum", 0.0) + tps
        if ev.HasField("refusal"):
            c["answered"] += 1
            c["refusals"] += ev.refusal
            c["answer_chars"] += ev.answer_chars
        if ev.HasField("empty_answer"):
            c["inspected"] += 1
            c["empty"] += ev.empty_answer
        if ev.HasField("json_valid"):
            c["json_checked"] += 1
            c["json_invalid"] += not ev.json_valid

    def _sketch(self, name: str) -> Sketch:
        s = self.sketches.get(name)
        if s is None:
            s = self.sketches[name] = Sketch()
        return s

    def merge(self, other: Tally) -> None:
        self.counts.update(other.counts)
        for k, v in other.sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        for k, s in other.sketches.items():
            self._sketch(k).merge(s)

    def figures(self, price: outcome.TokenPrice | None = None) -> dict[str, object]:
        """The variant's figures, named and rounded as `extproc status` shows them; cost per
        request at ``price`` (None without one)."""
        c = self.counts
        n, answered = c["requests"], c["answered"]
        latency, ttft = self._sketch("latency"), self._sketch("ttft")
        cost = None
        if price is not None and c["priced"]:
            total = price.cost(c["priced_prompt_tokens"], c["priced_completion_tokens"])
            cost = round(total / c["priced"], 8)
        return {
            "window_requests": n,
            "errors": c["errors"],
            "error_rate": _rate(c["errors"], n),
            "client_errors": c["client_errors"],
            "client_error_rate": _rate(c["client_errors"], n),
            "timeout_rate": _rate(c["timeouts"], n),
            "latency_ms": dict(
                zip(("p50", "p95", "p99"), map(_round, latency.quantiles(_LATENCY_QS)), strict=True)
            ),
            "ttft_ms": {"p50": _round(ttft.quantile(0.5))},
            "prompt_tokens": c["prompt_tokens"],
            "completion_tokens": c["completion_tokens"],
            "cached_prompt_tokens": _ratio(c["cached_prompt_tokens"], c["cached_reported"], 2),
            "output_tokens_per_s": _ratio(self.sums.get("tps_sum", 0.0), c["tps_n"], 2),
            "cost_per_request": cost,
            "refusal_rate": _rate(c["refusals"], answered),
            "answer_chars_mean": _ratio(c["answer_chars"], answered, 1),
            "tool_call_rate": _rate(c["tool_calls"], c["successes"]),
            "empty_answer_rate": _rate(c["empty"], c["inspected"]),
            "json_invalid_rate": _rate(c["json_invalid"], c["json_checked"]),
        }

    def fields(self) -> tuple[dict[str, int], dict[str, float]]:
        """The tally as hash fields: integer increments, and float ones (HINCRBYFLOAT)."""
        ints = {k: v for k, v in self.counts.items() if v}
        for name, s in self.sketches.items():
            ints.update(s.fields(name))
        return ints, {k: v for k, v in self.sums.items() if v}


def _rate(k: int, n: int) -> float | None:
    return round(k / n, 4) if n else None


def _ratio(total: float, n: int, places: int) -> float | None:
    return round(total / n, places) if n else None


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def tally(events: Iterable[TelemetryEvent]) -> dict[tuple[str, str], Tally]:
    """Final events by (traffic, variant); in-flight notices and unrouted requests are not
    requests of a variant and are left out."""
    span = Bucket()
    for ev in events:
        span.add(ev)
    return span.tallies


def buckets(events: Iterable[TelemetryEvent], width_s: int) -> dict[int, Bucket]:
    """A batch of events tallied into the buckets of ``width_s`` they started in, by bucket
    start (unix seconds). Each event is tallied here once: wider buckets are merged from these
    (:func:`coarser`), not counted again."""
    out: dict[int, Bucket] = {}
    for ev in events:
        start = outcome.started_ms(ev) // 1000
        start -= start % width_s
        b = out.get(start)
        if b is None:
            b = out[start] = Bucket()
        b.add(ev)
    return out


def coarser(fine: Mapping[int, Bucket], width_s: int) -> dict[int, Bucket]:
    """The same buckets at ``width_s``, a multiple of their width: merged, so a coarse bucket is
    exactly the sum of the fine ones it spans."""
    out: dict[int, Bucket] = {}
    for start, b in fine.items():
        key = start - start % width_s
        wide = out.get(key)
        if wide is None:
            wide = out[key] = Bucket()
        wide.merge(b)
    return out


def bucket_fields(
    events: Iterable[TelemetryEvent], width_s: int
) -> dict[int, tuple[dict[str, int], dict[str, float]]]:
    """A batch of events as increments of the buckets of ``width_s`` they started in: bucket
    start (unix seconds) -> (integer fields, float fields)."""
    return fields_of(buckets(events, width_s))


def fields_of(
    tallied: Mapping[int, Bucket],
) -> dict[int, tuple[dict[str, int], dict[str, float]]]:
    """Buckets as the hash fields the writer adds to (the inverse of :func:`parse`); a bucket
    with nothing to add (only in-flight notices) is left out."""
    out: dict[int, tuple[dict[str, int], dict[str, float]]] = {}
    for start, b in tallied.items():
        ints: dict[str, int] = {REFUSED: b.refused} if b.refused else {}
        floats: dict[str, float] = {}
        for (kind, variant), t in b.tallies.items():
            i, f = t.fields()
            ints.update({f"{kind}|{variant}|{k}": v for k, v in i.items()})
            floats.update({f"{kind}|{variant}|{k}": v for k, v in f.items()})
        if ints or floats:
            out[start] = (ints, floats)
    return out


@functools.lru_cache(maxsize=1 << 16)
def _field(raw: bytes) -> tuple[tuple[str, str], str, str, int] | None:
    """What a hash field holds: ((traffic, variant), where, name, bin), where is ``"count"``,
    ``"sum"`` or ``"bin"`` (then name is the sketch's, bin the index). None for a field this
    version does not know (a newer writer's), which a reader leaves out. Cached: every bucket
    repeats the names, and a refresh reads tens of thousands of fields."""
    kind, _, rest = raw.decode(errors="replace").partition("|")
    variant, _, name = rest.rpartition("|")
    if not variant or kind not in outcome.TRAFFIC:
        return None
    sketch, _, b = name.partition(":")
    if b and sketch in _SKETCHES:
        if b == _ZERO:
            return (kind, variant), "bin", sketch, _ZERO_BIN
        try:
            return (kind, variant), "bin", sketch, int(b)
        except ValueError:
            return None
    if name in _COUNTS:
        return (kind, variant), "count", name, 0
    if name in _SUMS:
        return (kind, variant), "sum", name, 0
    return None


@dataclass
class Bucket:
    """A bucket's (or a span's) tallies by (traffic, variant), and its refused requests."""

    tallies: dict[tuple[str, str], Tally] = field(default_factory=dict)
    refused: int = 0

    def tally(self, key: tuple[str, str]) -> Tally:
        t = self.tallies.get(key)
        if t is None:
            t = self.tallies[key] = Tally()
        return t

    def add(self, ev: TelemetryEvent) -> None:
        """One event: a final one into its variant's tally, a refused one counted apart; an
        in-flight notice is no request."""
        if ev.in_flight:
            return
        if not ev.variant:
            self.refused += 1
            return
        self.tally((outcome.traffic(ev), ev.variant)).add(ev)

    def merge(self, other: Bucket) -> None:
        for key, t in other.tallies.items():
            self.tally(key).merge(t)
        self.refused += other.refused

    @property
    def events(self) -> int:
        """Every request of the span: each variant's, of every kind of traffic, and refused."""
        return self.refused + sum(t.counts["requests"] for t in self.tallies.values())

    def add_fields(self, fields: Mapping[bytes, bytes]) -> None:
        """Add one bucket's hash, as the writer made it (:func:`bucket_fields`). Straight into
        this bucket's tallies, with no bucket of its own: a chart adds up tens of thousands of
        fields per refresh."""
        tallies = self.tallies
        for raw, value in fields.items():
            f = _field(raw)
            if f is None:
                if raw == _REFUSED_FIELD:
                    self.refused += int(value)
                continue
            key, where, name, b = f
            t = tallies.get(key)
            if t is None:
                t = tallies[key] = Tally()
            if where == "count":
                t.counts[name] += int(value)
            elif where == "sum":
                t.sums[name] = t.sums.get(name, 0.0) + float(value)
            else:
                t._sketch(name).bins[b] += int(value)


def parse(fields: Mapping[bytes, bytes]) -> Bucket:
    """One bucket's hash, read back: the inverse of the writer's :func:`bucket_fields`."""
    out = Bucket()
    out.add_fields(fields)
    return out


# Adds up groups of hashes on the server: a refresh then gets one hash per step (or span) to
# decode instead of one per bucket, which halves a chart's fields and cuts a status span's
# sixty hashes to one. Read-only; all keys of one experiment share its hash tag (one Cluster
# slot). KEYS: the hashes; ARGV: how many keys each group takes, in order. Values are sent back
# as %.17g text, exact for the integer counts and round-tripping the float sums.
_ADD_UP = """
local out, k = {}, 1
for g = 1, #ARGV do
  local sum, order = {}, {}
  for _ = 1, tonumber(ARGV[g]) do
    local flat = redis.call('HGETALL', KEYS[k])
    k = k + 1
    for i = 1, #flat, 2 do
      local f, v = flat[i], tonumber(flat[i + 1])
      local had = sum[f]
      if had == nil then
        order[#order + 1] = f
        sum[f] = v
      else
        sum[f] = had + v
      end
    end
  end
  local reply = {}
  for _, f in ipairs(order) do
    reply[#reply + 1] = f
    reply[#reply + 1] = string.format('%.17g', sum[f])
  end
  out[g] = reply
end
return out
"""


async def _added_up(r: Redis, experiment: str, groups: list[list[tuple[int, int]]]) -> list[Bucket]:
    """Each group of (width, start) buckets added up into one, in one round trip."""
    names = [keys.rollup(experiment, w, start) for group in groups for w, start in group]
    if not names:
        return [Bucket() for _ in groups]
    replies = await r.register_script(_ADD_UP)(keys=names, args=[len(g) for g in groups])
    out = []
    for flat in replies:
        bucket = Bucket()
        bucket.add_fields(dict(zip(flat[::2], flat[1::2], strict=True)))
        out.append(bucket)
    return out


async def read(
    r: Redis, experiment: str, width_s: int, since_s: int, until_s: int, step_s: int | None = None
) -> list[tuple[int, Bucket]]:
    """The buckets of ``width_s`` that start in ``[since_s, until_s)``, oldest first; a bucket
    no event started in reads as empty. With ``step_s`` (a multiple of the width), the buckets
    of each step are added up on the server, one per step. One round trip."""
    step = step_s or width_s
    first = since_s - since_s % step
    steps = list(range(first, until_s, step))
    groups = [
        [(width_s, start) for start in range(at, min(at + step, until_s), width_s)] for at in steps
    ]
    return list(zip(steps, await _added_up(r, experiment, groups), strict=True))


def merged(buckets: Iterable[tuple[int, Bucket]]) -> Bucket:
    """The buckets added together: the figures of their whole span."""
    out = Bucket()
    for _, b in buckets:
        out.merge(b)
    return out


def span_starts(
    since_s: int, until_s: int, fine_from_s: int | None = None
) -> list[tuple[int, int]]:
    """The (width, start) buckets that tile ``[since_s, until_s)`` once rounded out to whole
    fine buckets: the coarse buckets that fit whole, fine ones at the two ragged ends. A ragged
    end older than ``fine_from_s`` (where fine buckets may have expired) is rounded out to a
    whole coarse bucket instead."""
    lo = since_s - since_s % FINE_S
    hi = until_s + (-until_s) % FINE_S
    if fine_from_s is not None:
        if lo < fine_from_s:
            lo -= lo % COARSE_S
        if hi - hi % COARSE_S < fine_from_s:
            hi += (-hi) % COARSE_S
    c_lo = lo + (-lo) % COARSE_S
    c_hi = hi - hi % COARSE_S
    if c_lo >= c_hi:
        return [(FINE_S, s) for s in range(lo, hi, FINE_S)]
    return [
        *((FINE_S, s) for s in range(lo, c_lo, FINE_S)),
        *((COARSE_S, s) for s in range(c_lo, c_hi, COARSE_S)),
        *((FINE_S, s) for s in range(c_hi, hi, FINE_S)),
    ]


async def read_span(
    r: Redis, experiment: str, since_s: int, until_s: int, now_s: float | None = None
) -> Bucket:
    """Everything that started in ``[since_s, until_s)`` (rounded out to whole 10 s buckets,
    or 5 min ones older than the fine buckets are kept before ``now_s``), added up on the server
    from at most ``(until - since) / 300 + 58`` small hashes: one round trip, one hash to
    decode."""
    tiles = span_starts(since_s, until_s, fine_from(now_s))
    (span,) = await _added_up(r, experiment, [tiles])
    return span


def fine_from(now_s: float | None = None) -> int:
    """The oldest fine bucket sure to be kept at ``now_s`` (default: now)."""
    now = time.time() if now_s is None else now_s
    return int(now) - FINE_KEPT_S + FINE_S


OpenChanges = dict[tuple[str, str], tuple[list[tuple[int, str]], list[str]]]


def open_changes(events: Iterable[TelemetryEvent], notice_ms: float) -> OpenChanges:
    """What a batch changes in the open-request sets, by (traffic, variant): the requests noticed
    open (start ms, request id) and the requests that ended and may have been noticed (those
    that lasted ``notice_ms`` or more: a shorter one was never noticed)."""
    out: OpenChanges = {}
    for ev in events:
        if not ev.variant or not ev.request_id:
            continue
        if ev.in_flight:
            entry = out.setdefault((outcome.traffic(ev), ev.variant), ([], []))
            entry[0].append((outcome.started_ms(ev), ev.request_id))
        elif not ev.HasField("duration_ms") or ev.duration_ms >= notice_ms:
            entry = out.setdefault((outcome.traffic(ev), ev.variant), ([], []))
            entry[1].append(ev.request_id)
    return out


async def open_counts(
    r: Redis,
    experiment: str,
    pairs: Iterable[tuple[str, str]],
    now_ms: int,
) -> dict[tuple[str, str], int]:
    """Requests still open, by (traffic, variant), for the pairs asked; one round trip."""
    asked = list(pairs)
    async with r.pipeline(transaction=False) as pipe:
        for kind, variant in asked:
            pipe.zcount(
                keys.open_requests(experiment, kind, variant),
                now_ms - OPEN_FOR_AT_MOST_MS,
                "+inf",
            )
        counts = await pipe.execute()
    return {pair: int(n) for pair, n in zip(asked, counts, strict=True)}
