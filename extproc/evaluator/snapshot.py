"""The format of a stage-window snapshot: what is taken from a window, how it is stored, checked
and restored (``takeover.py`` writes and loads it).

Why: the active evaluator holds the current stage's window in memory; a standby that wins the
lease had to rebuild it from the whole event stream (~11 s at a stage of a million events), while
no one judged the canary. With the active evaluator's snapshot and the stream ids it covers, a
new leader reads only the events after it.

Exactness: the snapshot holds every field of the window (``freeze`` and ``restore`` go by the
dataclass fields, and a test fails when a field has no place here): counters and small dicts in
a JSON ``meta``; sample columns and per-conversation arrays as machine numbers, in the narrowest
integer type that holds every value bit for bit, else as doubles; string collections one a line
in their order (JSON when a string holds a newline). So a window restored and fed the tail
equals, field by field, the one built from the whole stream. Fields that come from the
experiment file (stable, strategy, hang bound, prices) are not stored: the new leader builds them
from its own file, and a snapshot taken under another (``Identity.config``) is not used.

Never the wrong window: a snapshot names its stage (attempt, stage index, stage start, attempt
start) and its format version; one of another stage, attempt, configuration or version, or one
that fails its CRC-32s, lengths or shape checks, raises SnapshotError with the reason, and the
new leader reads the whole stage instead.

Two steps, so the evaluator's loop does little: ``freeze`` (on the loop) copies what changes in
place and notes the length of each append-only array; ``Frozen.pack`` (in a thread) turns that
into bytes; ``encode`` adds checksums and optional zlib. Format version 1: Redis hash fields
``meta`` (JSON) and ``p:<part>`` (bytes), see ``encode``.
"""

from __future__ import annotations

import json
import zlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from functools import partial
from itertools import compress
from typing import Any

import numpy as np

from extproc.evaluator.clusters import COLUMNS, Clusters
from extproc.evaluator.window import Notice, OpenRequests, StageWindow, VariantWindow

FORMAT = 1
META = b"meta"
PART = b"p:"

# The window's fields, by where a snapshot keeps them. Typed fields are found by their
# annotation, so a new counter or column is carried without a change here;
# tests/unit/test_window_snapshot.py fails when a field of another kind is added.
VARIANT_COUNTS = tuple(f.name for f in fields(VariantWindow) if f.type == "int")
VARIANT_COLUMNS = tuple(f.name for f in fields(VariantWindow) if f.type == "array[float]")
VARIANT_OTHER = ("keys", "feedback", "clusters")
VARIANT_CONFIG = ("price",)  # from the experiment file
STAGE_IDENTITY = ("started_ms", "attempt_started_ms")
STAGE_CONFIG = ("shadow_as_candidate", "stable", "notice_ms", "hang_multiple", "prices")
STAGE_COUNTS = tuple(
    f.name for f in fields(StageWindow) if f.type == "int" and f.name not in STAGE_IDENTITY
)
STAGE_OTHER = ("open", "variants", "by_request", "request_order", "by_key")


class SnapshotError(Exception):
    """Why a snapshot cannot be used (the caller reads the whole stage instead)."""


@dataclass(frozen=True)
class Identity:
    """Which window a snapshot is of: one stage of one attempt, under one configuration."""

    attempt: int
    stage: int
    started_ms: int
    attempt_started_ms: int
    config: str  # fingerprint of the window's fields that come from the experiment file

    @classmethod
    def of(cls, attempt: int, stage: int, window: StageWindow) -> Identity:
        prices = {v: p.model_dump() for v, p in sorted(window.prices.items())}
        config = [window.shadow_as_candidate, window.stable, window.notice_ms]
        config += [window.hang_multiple, prices]
        return cls(
            attempt=attempt,
            stage=stage,
            started_ms=window.started_ms,
            attempt_started_ms=window.attempt_started_ms,
            config=json.dumps(config, sort_keys=True),
        )


@dataclass
class Captured:
    """A window's state at one stream position, detached from the window (which goes on
    growing): ``meta`` is JSON-able, ``parts`` are bytes."""

    meta: dict[str, Any]
    parts: dict[str, bytes]

    @property
    def raw_bytes(self) -> int:
        return sum(len(b) for b in self.parts.values())


@dataclass
class Frozen:
    """What the evaluator's loop takes of a window, as little as keeps it exact: copies of
    what changes in place (counters, per-conversation totals, the string collections) and, of
    the append-only arrays (sample columns, conversation ids), only their length. ``pack``, in a
    thread, turns that into bytes: a slice of an array is one C call under the GIL, so it is
    never torn by an append, and an append-only array's first n items do not change."""

    meta: dict[str, Any]
    jobs: dict[str, bytes | Callable[[], bytes]]

    def pack(self) -> Captured:
        return Captured(
            self.meta, {n: j if isinstance(j, bytes) else j() for n, j in self.jobs.items()}
        )


@dataclass(frozen=True)
class Restored:
    window: StageWindow
    events_seen: str
    signals_seen: str
    written_ms: int


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _strings(items: Iterable[str]) -> bytes:
    """Strings, in their order: one a line (``L``), several times faster both ways than JSON,
    or JSON (``J``) when a string holds a newline, or there are none."""
    listed = list(items)
    text = "\n".join(listed)
    if listed and text.count("\n") == len(listed) - 1:
        return b"L" + text.encode()
    return b"J" + _json(listed)


def _unstrings(raw: bytes) -> list[str]:
    if raw[:1] == b"L":
        return raw[1:].decode().split("\n")
    if raw[:1] == b"J":
        listed = json.loads(raw[1:])
        if isinstance(listed, list) and all(isinstance(x, str) for x in listed):
            return listed
    raise ValueError("a list of strings was expected")


def _key_set(keys_: set[str], index: dict[str, int]) -> bytes:
    """A variant's conversation keys: every one is also in its conversation index (a request
    counted as a unit is counted in its conversation), so they are stored as one flag per
    index entry (``F``): a takeover then builds the set from the index's strings instead of
    making and hashing ~200,000 more. Strings (``_strings``) if that ever does not hold."""
    if all(k in index for k in keys_):
        return b"F" + bytes(k in keys_ for k in index)
    return _strings(keys_)


def _unkey_set(raw: bytes, indexed: list[str]) -> set[str]:
    if raw[:1] != b"F":
        return set(_unstrings(raw))
    if len(raw) - 1 != len(indexed):
        raise ValueError("key flags do not match the conversation index")
    return set(compress(indexed, memoryview(raw)[1:]))


def _numbers(column: array[Any], n: int) -> bytes:
    """The first ``n`` numbers of an ``array("d")`` or ``array("q")``, in the narrowest integer
    type that holds every one exactly (a tag byte names it: ``b``, ``h``, ``i``), else as they
    are (``d``, ``q``). Conversation ids and counts, and the integral columns (tokens, bytes,
    characters) need 1 to 4 bytes, not 8: a snapshot shrinks by about 45%, and its size is most
    of what a takeover waits for (Redis sends ~300 MB/s)."""
    raw = column[:n].tobytes()
    wide = np.frombuffer(raw, dtype=np.float64 if column.typecode == "d" else np.int64)
    if wide.size:
        low, high = wide.min(), wide.max()
        for narrow in (np.int8, np.int16, np.int32):
            bounds = np.iinfo(narrow)
            if bounds.min <= low and high <= bounds.max:  # False for NaN
                packed = wide.astype(narrow)
                if column.typecode == "q" or packed.astype(np.float64).tobytes() == raw:
                    return np.dtype(narrow).char.encode() + packed.tobytes()
                break
    return column.typecode.encode() + raw


def _unnumbers(raw: bytes, typecode: str) -> array[Any]:
    tag, body = raw[:1].decode(), memoryview(raw)[1:]
    if tag in ("b", "h", "i"):
        wide = np.float64 if typecode == "d" else np.int64
        body = memoryview(np.frombuffer(body, dtype=tag).astype(wide).tobytes())
    elif tag != typecode:
        raise ValueError(f"numbers tagged {tag!r} where {typecode!r} was expected")
    out = array(typecode)
    out.frombytes(body)
    return out


def _appended(column: array[Any]) -> Callable[[], bytes]:
    """An append-only array's numbers up to now, packed later (see ``Frozen``)."""
    return partial(_numbers, column, len(column))


def _index_ids(index: dict[str, int]) -> bytes:
    ids = array("q", index.values())
    return _numbers(ids, len(ids))


def freeze(
    window: StageWindow, identity: Identity, events_seen: str, signals_seen: str, now_ms: int
) -> Frozen:
    """Take ``window``'s state on the evaluator's loop (the cheap part of a snapshot)."""
    jobs: dict[str, bytes | Callable[[], bytes]] = {}
    variants = []
    for i, (name, w) in enumerate(list(window.variants.items())):
        for col in VARIANT_COLUMNS:
            jobs[f"v{i}/col/{col}"] = _appended(getattr(w, col))
        c = w.clusters
        for counter, totals in c.totals.items():
            copied = totals[:]  # changes in place: copied now (a memcpy)
            jobs[f"v{i}/totals/{counter}"] = partial(_numbers, copied, len(copied))
        for source, ids in c.ids.items():
            jobs[f"v{i}/ids/{source}"] = _appended(ids)
        index = c.index.copy()
        jobs[f"v{i}/keys"] = partial(_key_set, w.keys.copy(), index)
        jobs[f"v{i}/index/keys"] = partial(_strings, index)
        jobs[f"v{i}/index/ids"] = partial(_index_ids, index)
        variants.append(
            {
                "name": name,
                "counts": {n: getattr(w, n) for n in VARIANT_COUNTS},
                "feedback": dict(w.feedback),
                "clusters": {"size": c.size, "seen": dict(c.seen)},
            }
        )
    by_request = window.by_request.copy()  # its order is ``request_order``'s
    jobs["by_request/keys"] = partial(_strings, by_request)
    jobs["by_request/variants"] = partial(_strings, by_request.values())
    by_key = window.by_key.copy()
    jobs["by_key/keys"] = partial(_strings, by_key)
    jobs["by_key/variants"] = partial(_strings, by_key.values())
    op = window.open
    jobs["open/pending"] = _json(
        {rid: [n.variant, n.key_hash, n.started_ms] for rid, n in op.pending.items()}
    )
    jobs["open/hung"] = _strings(op.hung)
    meta = {
        "format": FORMAT,
        "identity": asdict(identity),
        "events_seen": events_seen,
        "signals_seen": signals_seen,
        "written_ms": now_ms,
        "counts": {n: getattr(window, n) for n in STAGE_COUNTS},
        "stable_p99_ms": op.stable_p99_ms,
        "variants": variants,
    }
    return Frozen(meta, jobs)


def capture(
    window: StageWindow, identity: Identity, events_seen: str, signals_seen: str, now_ms: int
) -> Captured:
    """``freeze`` and ``pack`` at once (for callers that own the window meanwhile)."""
    return freeze(window, identity, events_seen, signals_seen, now_ms).pack()


def encode(captured: Captured, level: int) -> dict[bytes, bytes]:
    """The Redis hash of a snapshot: each part compressed with zlib at ``level`` when that
    saves a tenth or more (0: never), and its length and CRC-32 recorded in ``meta``."""
    out: dict[bytes, bytes] = {}
    index: dict[str, list[Any]] = {}
    for name, raw in captured.parts.items():
        codec, data = "raw", raw
        if level > 0 and raw:
            packed = zlib.compress(raw, level)
            if len(packed) <= 0.9 * len(raw):
                codec, data = "zlib", packed
        index[name] = [codec, len(raw), zlib.crc32(raw)]
        out[PART + name.encode()] = data
    out[META] = _json({**captured.meta, "parts": index})
    return out


def decode(fields_: Mapping[bytes, bytes]) -> Captured:
    """The inverse of ``encode``; raises SnapshotError on anything that does not check out."""
    try:
        meta = json.loads(fields_[META])
    except (KeyError, ValueError) as err:
        raise SnapshotError(f"no readable meta ({err!r})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise SnapshotError(f"format {found!r}, this evaluator reads format {FORMAT}")
    parts: dict[str, bytes] = {}
    try:
        for name, (codec, length, crc) in meta.pop("parts").items():
            data = fields_[PART + name.encode()]
            raw = zlib.decompress(data) if codec == "zlib" else data
            if codec not in ("raw", "zlib") or len(raw) != length or zlib.crc32(raw) != crc:
                raise SnapshotError(f"part {name} is corrupt (codec, length or checksum)")
            parts[name] = raw
    except (KeyError, TypeError, ValueError, zlib.error) as err:
        raise SnapshotError(f"parts unreadable ({err!r})") from err
    return Captured(meta, parts)


def restore(captured: Captured, identity: Identity, fresh: StageWindow) -> Restored:
    """Fill ``fresh`` (the new leader's empty window of the same stage, built from its own
    experiment file) with the captured state; raises SnapshotError if the snapshot is of another
    stage, attempt or configuration, or its parts do not fit together."""
    meta, parts = captured.meta, captured.parts
    theirs = meta.get("identity")
    if theirs != asdict(identity):
        raise SnapshotError(f"of another stage or configuration: {theirs} != {asdict(identity)}")
    try:
        for n in STAGE_COUNTS:
            setattr(fresh, n, int(meta["counts"][n]))
        for i, v in enumerate(meta["variants"]):
            w = fresh.variants[v["name"]] = VariantWindow(price=fresh.prices.get(v["name"]))
            for n in VARIANT_COUNTS:
                setattr(w, n, int(v["counts"][n]))
            for col in VARIANT_COLUMNS:
                setattr(w, col, _unnumbers(parts[f"v{i}/col/{col}"], "d"))
            indexed = _unstrings(parts[f"v{i}/index/keys"])
            w.keys = _unkey_set(parts[f"v{i}/keys"], indexed)
            w.feedback = {str(k): int(n) for k, n in v["feedback"].items()}
            size = int(v["clusters"]["size"])
            w.clusters = Clusters(
                index=dict(zip(indexed, _unnumbers(parts[f"v{i}/index/ids"], "q"), strict=True)),
                size=size,
                totals={c: _unnumbers(parts[f"v{i}/totals/{c}"], "q") for c in w.clusters.totals},
                ids={s: _unnumbers(parts[f"v{i}/ids/{s}"], "q") for s in w.clusters.ids},
                seen={str(k): int(n) for k, n in v["clusters"]["seen"].items()},
            )
            _check_shapes(v["name"], w)
        pending = json.loads(parts["open/pending"])
        fresh.open = OpenRequests(
            pending={rid: Notice(str(a), str(k), int(s)) for rid, (a, k, s) in pending.items()},
            hung=OrderedDict.fromkeys(_unstrings(parts["open/hung"])),
            stable_p99_ms=meta["stable_p99_ms"],
        )
        fresh.by_request = dict(_pairs(parts, "by_request"))
        fresh.request_order = deque(fresh.by_request)
        fresh.by_key = dict(_pairs(parts, "by_key"))
        return Restored(
            fresh, str(meta["events_seen"]), str(meta["signals_seen"]), int(meta["written_ms"])
        )
    except (KeyError, TypeError, ValueError) as err:  # ValueError: JSON and array lengths
        raise SnapshotError(f"incomplete or malformed ({err!r})") from err


def _pairs(parts: dict[str, bytes], name: str) -> zip[tuple[str, str]]:
    keys_, values = _unstrings(parts[f"{name}/keys"]), _unstrings(parts[f"{name}/variants"])
    return zip(keys_, values, strict=True)


def _check_shapes(variant: str, w: VariantWindow) -> None:
    """The invariants ``Clusters.add`` keeps: one total per conversation, one conversation per
    sample of each column."""
    c = w.clusters
    problems = [f"totals/{n}" for n, a in c.totals.items() if len(a) != c.size]
    problems += [
        f"ids/{s}" for s, attr in COLUMNS.items() if len(c.ids[s]) != len(getattr(w, attr))
    ]
    if problems:
        raise SnapshotError(f"{variant}: {', '.join(problems)} do not fit the window")
