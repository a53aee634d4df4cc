"""What the evaluator reads from Envoy's admin interface: whether a cluster's hosts are healthy
(before a warm-up) and how many requests are still open on it (after a rollback or a flip).

Why Envoy's admin and not the model servers: Envoy is the one place that knows, for every
variant, the requests it still waits on, whatever serves them (KServe, vLLM, Triton, a script),
and every Envoy replica must be asked: each holds its own share of the open requests. Both reads
use Envoy's plain-text formats, which have been stable across releases:

- ``GET /stats?filter=^cluster\\.(a|b)\\.upstream_rq_active$``: one ``name: value`` line per
  matching stat, e.g. ``cluster.model_canary.upstream_rq_active: 3``;
- ``GET /clusters``: one ``cluster::host:port::field::value`` line per host and field, e.g.
  ``model_canary::127.0.0.1:8001::health_flags::healthy``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import aiohttp

ACTIVE = "upstream_rq_active"
"""The gauge of requests a cluster has sent upstream and not yet finished."""


class AdminError(Exception):
    """An Envoy admin that did not answer, or answered something else than its stats."""


def stats_filter(clusters: Iterable[str]) -> str:
    """The ``/stats?filter=`` regex that selects the active-request gauge of ``clusters``."""
    names = "|".join(re.escape(c) for c in sorted(clusters))
    return rf"^cluster\.({names})\.{ACTIVE}$"


def parse_active(text: str, clusters: Iterable[str]) -> dict[str, int]:
    """Each cluster's open requests from ``/stats`` text; a cluster Envoy does not list (not
    configured there) is missing from the answer."""
    wanted = {f"cluster.{c}.{ACTIVE}": c for c in clusters}
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep and name in wanted:
            try:
                out[wanted[name]] = int(value.strip())
            except ValueError as err:
                raise AdminError(f"not a count for {name}: {value!r}") from err
    return out


def parse_health(text: str, clusters: Iterable[str]) -> dict[str, list[str]]:
    """Each cluster's hosts' health flags from ``/clusters`` text (``healthy``, or flags such
    as ``/failed_active_hc``); a cluster without hosts maps to an empty list."""
    out: dict[str, list[str]] = {c: [] for c in clusters}
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] in out and parts[2] == "health_flags":
            out[parts[0]].append(parts[3].strip())
    return out


async def _get(session: aiohttp.ClientSession, url: str, params: dict[str, str]) -> str:
    try:
        async with session.get(url, params=params) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise AdminError(f"{url}: HTTP {resp.status}")
            return text
    except (aiohttp.ClientError, TimeoutError) as err:
        raise AdminError(f"{url}: {type(err).__name__} {err}".rstrip()) from err


async def active_requests(
    session: aiohttp.ClientSession, admin: str, clusters: Iterable[str]
) -> dict[str, int]:
    """The open requests of ``clusters`` on one Envoy; raises :class:`AdminError`."""
    names = list(clusters)
    text = await _get(session, admin.rstrip("/") + "/stats", {"filter": stats_filter(names)})
    found = parse_active(text, names)
    missing = sorted(set(names) - set(found))
    if missing:
        raise AdminError(f"{admin}: no {ACTIVE} for cluster(s) {missing}")
    return found


async def healthy(session: aiohttp.ClientSession, admin: str, clusters: Iterable[str]) -> bool:
    """Whether every host of every one of ``clusters`` is healthy on one Envoy (and each has
    at least one host); raises :class:`AdminError`."""
    hosts = parse_health(await _get(session, admin.rstrip("/") + "/clusters", {}), clusters)
    return all(flags and all(f == "healthy" for f in flags) for flags in hosts.values())
