"""Which requests an experiment takes (``match``), and which it pins to a variant (``overrides``).

A gateway in front of many models runs one rollout per model. A fleet sidecar (one that serves
every experiment in Redis) files each request under at most one experiment, by what the request
says about itself: the body's ``model`` (as AI gateways route; Envoy's JSON-to-metadata filter
reads it, so the sidecar never buffers a body), the gateway route it matched, or a header. An
experiment without ``match`` takes every request no other experiment takes.

Overrides send a class of requests to a fixed variant before the hash (coding requests to the
model that is good at code, a deprecated model alias to stable). Their events carry their own
assignment kind and stay out of the comparison: a class picked by a rule is not a random sample.

The same three selectors serve both, so they are one model; what they match is decided by
:class:`Selector`, shared by the sidecar and ``extproc experiment create``'s conflict check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")
HEADER_NAME = r"^[a-z0-9!#$%&'*+.^_`|~-]+$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HeaderValues(_Strict):
    name: str = Field(pattern=HEADER_NAME, description="a lower-case header name")
    values: list[str] = Field(min_length=1, description="any of these values matches")


class Selectors(_Strict):
    """Request traits; a request matches when any one of them does."""

    models: list[str] = Field(default_factory=list, description="the request body's model")
    routes: list[str] = Field(default_factory=list, description="the gateway route's name")
    headers: list[HeaderValues] = Field(default_factory=list)

    def traits(self) -> list[tuple[str, str]]:
        """Every (trait, value) this matches: ``model``, ``route`` or ``header:<name>``."""
        out = [("model", m) for m in self.models] + [("route", r) for r in self.routes]
        out += [(f"header:{hv.name}", v) for hv in self.headers for v in hv.values]
        return out


class Override(Selectors):
    """Requests with any of these traits go to ``variant``, whatever the weights."""

    variant: str


@dataclass(frozen=True)
class RequestTraits:
    """What a request says about itself, as the sidecar read it."""

    model: str | None = None
    route: str | None = None
    headers: Mapping[str, bytes] | None = None

    def lookups(self, header_names: frozenset[str]) -> list[tuple[str, str]]:
        """The (trait, value) keys to look up, most specific first: a header, the route, the
        model. A header names a class of traffic on purpose; a route is the gateway's own
        split; a model is what every request of that model says."""
        out: list[tuple[str, str]] = []
        if self.headers:
            for name in sorted(header_names):
                value = self.headers.get(name)
                if value:
                    out.append((f"header:{name}", value.decode("utf-8", "replace")))
        if self.route:
            out.append(("route", self.route))
        if self.model:
            out.append(("model", self.model))
        return out


@dataclass(frozen=True)
class Selector(Generic[T]):
    """An index from request traits to one of several targets (experiments, or a variant)."""

    by_key: Mapping[tuple[str, str], T]
    header_names: frozenset[str]
    default: T | None = None

    @classmethod
    def build(cls, targets: Mapping[T, Selectors | None]) -> tuple[Selector[T], list[str]]:
        """The index, and every conflict (two targets claiming the same trait, two defaults);
        a conflicting key keeps its first claimant, in the mapping's order."""
        by_key: dict[tuple[str, str], T] = {}
        default: T | None = None
        problems: list[str] = []
        for target, sel in targets.items():
            if sel is None:
                if default is not None:
                    problems.append(
                        f"{target!s} and {default!s} both match every request (no `match`)"
                    )
                else:
                    default = target
                continue
            for key in sel.traits():
                if key in by_key and by_key[key] != target:
                    problems.append(
                        f"{target!s} and {by_key[key]!s} both match {key[0]} {key[1]!r}"
                    )
                by_key.setdefault(key, target)
        headers = frozenset(k.partition(":")[2] for k, _ in by_key if k.startswith("header:"))
        return cls(by_key, headers, default), problems

    def pick(self, traits: RequestTraits) -> T | None:
        for key in traits.lookups(self.header_names):
            found = self.by_key.get(key)
            if found is not None:
                return found
        return self.default
