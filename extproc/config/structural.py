"""Pydantic's errors as ``path: message`` lines, in the words of the file's author.

Pydantic names a location by its tuple and a problem in its own terms, and reports a bad
``rollout.stages`` entry once per form the entry could take; these lines name the path in the
file and the form the file used. Other documents validated by pydantic (the watchdog's prompt
sets) report their problems the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


_STAGE_FORMS = ("float", "Stage")
"""Pydantic's names for the two forms of a ``rollout.stages`` entry, in an error's location."""


def _stage_error_kept(loc: tuple[int | str, ...], raw: Mapping[str, Any]) -> bool:
    """Whether an error of one form of a ``rollout.stages`` entry applies to what was written.

    Pydantic reports a bad entry against both forms (a share and an object); only the form the
    file used is the user's problem, and a plain value that is no share is reported once, by
    the semantic check. The form's name is dropped from the path by the caller.
    """
    rollout = raw.get("rollout")
    stages = rollout.get("stages") if isinstance(rollout, Mapping) else None
    index = loc[2]
    if not isinstance(stages, list) or not isinstance(index, int) or index >= len(stages):
        return True
    return loc[3] == "Stage" and isinstance(stages[index], Mapping)


def structural_problems(err: ValidationError, raw: Mapping[str, Any] | None = None) -> list[str]:
    """Pydantic's errors as ``path: message``; ``raw``, the experiment document, tells which
    form of a ``rollout.stages`` entry the file used (other documents have no stages)."""
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        stage_form = len(loc) > 3 and loc[:2] == ("rollout", "stages") and loc[3] in _STAGE_FORMS
        if raw is not None and stage_form:
            if not _stage_error_kept(loc, raw):
                continue
            e["loc"] = loc[:3] + loc[4:]
        msg = e["msg"]
        if e["type"] in ("greater_than_equal", "less_than_equal") and e["loc"][-1] == "weight":
            msg = "must be 0..100"
        elif e["type"] == "string_pattern_mismatch":
            msg = f"{e['input']!r} is not a valid name (pattern {e['ctx']['pattern']})"
        out.append(f"{_loc(e['loc'])}: {msg}")
    return out
