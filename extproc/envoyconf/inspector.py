"""The filter that reads each response body for telemetry, in one of two builds.

``lua`` runs ``extproc/data/inspect.lua`` in Envoy's Lua filter: it needs nothing but Envoy, so
it is what generated configs use unless told otherwise, and what a stock Envoy or Istio proxy
image can run. ``module`` runs the same reading compiled (``extproc/data/inspect.c``) as an
Envoy dynamic module: the Lua filter's coroutine per response costs Envoy about as much as the
rest of the native data plane together (docs/PERFORMANCE.md), the module a function call per
frame. The module must be built for the machine Envoy runs on and found by Envoy through
``ENVOY_DYNAMIC_MODULES_SEARCH_PATH``; ``extproc build-inspector`` does the first and prints the
second. Both write the same metadata keys, and the sidecar cannot tell them apart.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Literal

from envoy.config.core.v3.base_pb2 import DataSource
from envoy.extensions.dynamic_modules.v3.dynamic_modules_pb2 import DynamicModuleConfig
from envoy.extensions.filters.http.dynamic_modules.v3.dynamic_modules_pb2 import (
    DynamicModuleFilter,
)
from envoy.extensions.filters.http.lua.v3.lua_pb2 import Lua
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)

from extproc.contract.clusters import typed

Inspector = Literal["lua", "module"]
INSPECTORS: tuple[Inspector, ...] = ("lua", "module")

MODULE_NAME = "extproc_inspect"  # Envoy loads lib<name>.so; the module answers to this name only
SEARCH_PATH_ENV = "ENVOY_DYNAMIC_MODULES_SEARCH_PATH"
CHOICE_ENV = "EXTPROC_INSPECTOR"  # auto | lua | module, for the Envoys extproc starts itself

_DATA = Path(__file__).parent.parent / "data"
LUA_SOURCE = _DATA / "inspect.lua"
MODULE_SOURCE = _DATA / "inspect.c"


class InspectorError(Exception):
    """The module could not be built: no C compiler, or the compiler refused the source."""


def inspect_filter(inspector: Inspector) -> hcm.HttpFilter:
    if inspector == "module":
        module = DynamicModuleFilter(
            dynamic_module_config=DynamicModuleConfig(name=MODULE_NAME),
            filter_name=MODULE_NAME,
        )
        return hcm.HttpFilter(name="envoy.filters.http.dynamic_modules", typed_config=typed(module))
    return hcm.HttpFilter(
        name="envoy.filters.http.lua",
        typed_config=typed(
            Lua(default_source_code=DataSource(inline_string=LUA_SOURCE.read_text()))
        ),
    )


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "extproc" / "inspector"


def _compiler() -> str:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return candidate
    raise InspectorError(
        "no C compiler found (tried $CC, cc, gcc, clang): install one (Debian: apt-get install "
        "gcc) or use the Lua inspector"
    )


def build_module(out_dir: Path | None = None) -> Path:
    """Compiles the module unless this source's build is already there; returns the directory
    to give Envoy as ``ENVOY_DYNAMIC_MODULES_SEARCH_PATH``. Without ``out_dir`` the build is
    cached per source under ``$XDG_CACHE_HOME/extproc/inspector``."""
    source = MODULE_SOURCE.read_bytes()
    if out_dir is None:
        out_dir = _cache_root() / hashlib.sha256(source).hexdigest()[:16]
        if (out_dir / f"lib{MODULE_NAME}.so").exists():
            return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    compiler = _compiler()
    # Compiled next to its target and renamed: an Envoy starting meanwhile never loads half a file.
    fd, partial = tempfile.mkstemp(dir=out_dir, suffix=".so.partial")
    os.close(fd)
    argv = [
        compiler, "-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall",
        "-o", partial, str(MODULE_SOURCE),
    ]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        Path(partial).unlink(missing_ok=True)
        raise InspectorError(f"{' '.join(argv)} failed:\n{result.stderr.strip()}")
    os.replace(partial, out_dir / f"lib{MODULE_NAME}.so")
    return out_dir


def for_local_envoy() -> tuple[Inspector, dict[str, str], str | None]:
    """The inspector for an Envoy extproc starts itself (the local stack, benchmarks, tests),
    with the environment Envoy needs for it and, when ``auto`` fell back to Lua, why.
    ``EXTPROC_INSPECTOR`` picks: ``auto`` (the default) builds the module and falls back to
    Lua without a compiler; ``module`` fails instead; ``lua`` never builds."""
    choice = os.environ.get(CHOICE_ENV, "auto")
    if choice not in ("auto", *INSPECTORS):
        raise InspectorError(f"{CHOICE_ENV}={choice!r}: expected auto, lua or module")
    if choice == "lua":
        return "lua", {}, None
    try:
        directory = build_module()
    except InspectorError as e:
        if choice == "module":
            raise
        return "lua", {}, str(e)
    return "module", {SEARCH_PATH_ENV: str(directory)}, None
