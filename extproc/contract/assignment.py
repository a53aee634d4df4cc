"""Variant assignment: a pure function of (experiment salt, sticky key, weights).

Why it is built this way:

* **Sticky without shared state.** The bucket of a conversation is a keyed BLAKE2b hash of its key,
  salted per experiment, so every sidecar replica, after any restart, puts the same conversation in
  the same bucket. Changing the salt reshuffles everything (a new experiment).
* **Monotone ramps.** The bucket space (10,000 buckets, 0.01% steps) is split into one lane per
  candidate (non-stable variant), in file order. A candidate at weight ``w`` holds the first
  ``w * 100`` buckets of its lane; the stable variant holds every bucket no candidate holds. Raising
  a candidate from 5% to 10% therefore only adds buckets to it: every conversation already on the
  candidate stays there, as in GrowthBook's and Unleash's bucketing, and no candidate's ramp moves
  another candidate's conversations. A rollback (weight 0) gives every bucket back to stable.
* **Cheap per request.** Weights compile once into a 10,000-entry table, so a request costs one
  hash and one list index.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

BUCKETS = 10_000


def salt_key(salt: str) -> bytes:
    """BLAKE2b keys are at most 64 bytes; longer salts are hashed down first."""
    raw = salt.encode()
    return raw if len(raw) <= 64 else hashlib.blake2b(raw, digest_size=64).digest()


def bucket_of(salt: bytes, key: bytes) -> int:
    """The bucket (0..9999) of a sticky key under an experiment's salt."""
    digest = hashlib.blake2b(key, digest_size=8, key=salt).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def key_hash(salt: bytes, key: bytes) -> str:
    """A stable pseudonym for a sticky key, stored in telemetry instead of the raw id."""
    return hashlib.blake2b(key, digest_size=8, key=salt, person=b"extproc-key").hexdigest()


def random_bucket() -> int:
    """Requests with no sticky key are assigned per request."""
    return random.randrange(BUCKETS)


@dataclass(frozen=True)
class BucketTable:
    """Weights compiled into bucket → variant index, with the variant names it indexes."""

    variants: tuple[str, ...]
    table: tuple[int, ...]

    def variant_for(self, bucket: int) -> str:
        return self.variants[self.table[bucket]]

    def shares(self) -> dict[str, float]:
        """The weight each variant really gets, in percent (for checks and reports)."""
        counts = [0] * len(self.variants)
        for i in self.table:
            counts[i] += 1
        return {v: 100 * c / BUCKETS for v, c in zip(self.variants, counts, strict=True)}


def lanes(candidates: Sequence[str], weights: Mapping[str, float]) -> list[tuple[str, int, int]]:
    """(candidate, first bucket, buckets held) per candidate, in file order: the one layout both
    data planes use (the sidecar's bucket table, the native plane's weighted clusters)."""
    if not candidates:
        return []
    lane = BUCKETS // len(candidates)
    return [
        (name, n * lane, min(lane, round(weights.get(name, 0.0) * BUCKETS / 100)))
        for n, name in enumerate(candidates)
    ]


def compile_table(
    variants: Sequence[str], stable: str, weights: Mapping[str, float]
) -> BucketTable:
    """Lay candidates out in their lanes; the caller has validated the weights (lanes, sum)."""
    index = {v: i for i, v in enumerate(variants)}
    table = [index[stable]] * BUCKETS
    for name, start, held in lanes([v for v in variants if v != stable], weights):
        table[start : start + held] = [index[name]] * held
    return BucketTable(variants=tuple(variants), table=tuple(table))
