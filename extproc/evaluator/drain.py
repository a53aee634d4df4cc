"""Drain: after a rollback or a completion, how long the variant taken out of routing still had
requests open, read from every Envoy's ``upstream_rq_active`` of its cluster.

Why it matters: a serving layer that unloads a model at once (``hooks.on_rollback``) cuts the
answers still streaming from it; one that waits for ``hooks.on_drained`` unloads it when Envoy
holds no request for it any more. The new routing reaches every sidecar well under a second
after the decision, so the first look is one ``poll_s`` after it: a request routed by the old
weights in that gap is still seen. The drain time is measured at the look that finds no
request open, so it is exact to one ``poll_s``. Clock and sleep are injected.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from extproc.config import Drain, Experiment
from extproc.contract.envoy import lane_cluster
from extproc.evaluator import envoy_admin
from extproc.supervise import raise_if_cancelled

ACTIONS = ("drained", "drain_timeout")
"""The audit log's drain records: lifecycle, not decisions; each follows a rollback, an abort or
a completion by a drain's time."""

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
Look = Callable[[int | None], Awaitable[None]]


@dataclass(frozen=True)
class DrainReport:
    """``drained`` after ``seconds``; ``first`` the open requests at the first look that every
    Envoy answered, ``active`` at the last one (None: no such look), and ``error`` the last
    failure to read an Envoy, if the drain could not be confirmed."""

    drained: bool
    seconds: float
    polls: int
    first: int | None = None
    active: int | None = None
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "drained": self.drained,
            "seconds": round(self.seconds, 3),
            "polls": self.polls,
            "first": self.first,
            "active": self.active,
            "error": self.error,
        }

    def reason(self, variants: Sequence[str]) -> str:
        which = ", ".join(variants)
        if self.drained:
            return (
                f"{which} drained after {self.seconds:.1f} s "
                f"({self.first} requests open at the first look)"
            )
        left = "unknown" if self.active is None else str(self.active)
        why = f"; {self.error}" if self.error else ""
        return f"{which} not drained after {self.seconds:.1f} s: {left} requests open{why}"


def clusters_of(experiment: Experiment, variants: Sequence[str]) -> list[str]:
    """The Envoy clusters that carry ``variants``' requests: each one's own, and for stable on
    the native plane with several candidates also its lane clusters (stable under other names,
    ``contract.envoy.lane_cluster``; the last candidate's lane is filled by stable's own)."""
    spec = experiment.spec
    out = [spec.variants[v].cluster for v in variants]
    if spec.stable in variants and spec.dataplane == "native":
        stable = spec.variants[spec.stable].cluster
        out += [lane_cluster(stable, c) for c in experiment.candidates[:-1]]
    return out


async def open_requests(
    session: aiohttp.ClientSession, admins: Sequence[str], clusters: Sequence[str]
) -> int:
    """The requests open on ``clusters``, summed over every Envoy; raises AdminError."""
    total = 0
    for admin in admins:
        total += sum((await envoy_admin.active_requests(session, admin, clusters)).values())
    return total


async def watch(
    session: aiohttp.ClientSession,
    admins: Sequence[str],
    clusters: Sequence[str],
    settings: Drain,
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
    on_look: Look | None = None,
) -> DrainReport:
    """Look every ``poll_s`` until no request is open on ``clusters`` on any Envoy, or
    ``timeout_s`` passed; ``on_look`` gets each look's count (None: an Envoy did not answer),
    for the status while the drain goes on."""
    started = clock()
    polls = 0
    first: int | None = None
    active: int | None = None
    while True:
        await sleep(settings.poll_s)
        polls += 1
        error = ""
        try:
            active = await open_requests(session, admins, clusters)
        except envoy_admin.AdminError as err:
            error = str(err)
        if on_look is not None:
            await on_look(None if error else active)
            # A cancel redis-py swallowed in the look's write would otherwise leave the drain
            # polling Envoy until its timeout, and the process waiting for it at exit.
            raise_if_cancelled()
        if not error:
            first = active if first is None else first
            if active == 0:
                return DrainReport(True, clock() - started, polls, first, 0)
        if clock() - started >= settings.timeout_s:
            return DrainReport(False, clock() - started, polls, first, active, error)
