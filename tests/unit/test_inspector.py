"""Choosing and building the inspector: the local stack's choice (``EXTPROC_INSPECTOR``), a
missing or failing compiler reported with what to do, and the filter each choice puts in
Envoy's chain. That the module reads bodies as inspect.lua does is
tests/integration/test_inspector_live.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from envoy.extensions.filters.http.dynamic_modules.v3.dynamic_modules_pb2 import (
    DynamicModuleFilter,
)
from envoy.extensions.filters.http.lua.v3.lua_pb2 import Lua

from extproc.envoyconf import inspector
from extproc.envoyconf.inspector import CHOICE_ENV, InspectorError


@pytest.fixture
def no_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_lua_is_chosen_without_building(monkeypatch: pytest.MonkeyPatch, no_compiler: None) -> None:
    monkeypatch.setenv(CHOICE_ENV, "lua")
    assert inspector.for_local_envoy() == ("lua", {}, None)


def test_auto_falls_back_to_lua_and_says_why(
    monkeypatch: pytest.MonkeyPatch, no_compiler: None
) -> None:
    monkeypatch.delenv(CHOICE_ENV, raising=False)
    kind, env, why = inspector.for_local_envoy()
    assert (kind, env) == ("lua", {})
    assert why is not None
    assert "no C compiler" in why
    assert "apt-get install gcc" in why


def test_module_demanded_without_a_compiler_fails(
    monkeypatch: pytest.MonkeyPatch, no_compiler: None
) -> None:
    monkeypatch.setenv(CHOICE_ENV, "module")
    with pytest.raises(InspectorError, match="no C compiler"):
        inspector.for_local_envoy()


def test_an_unknown_choice_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CHOICE_ENV, "wasm")
    with pytest.raises(InspectorError, match="EXTPROC_INSPECTOR='wasm': expected auto, lua or"):
        inspector.for_local_envoy()


def test_a_failing_compiler_leaves_no_module_behind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CC", "false")  # exits 1: a compiler refusing the source
    with pytest.raises(InspectorError, match="failed"):
        inspector.build_module(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_each_choice_puts_its_filter_in_the_chain() -> None:
    lua, module = inspector.inspect_filter("lua"), inspector.inspect_filter("module")
    script = Lua()
    assert lua.typed_config.Unpack(script)
    assert "function envoy_on_response" in script.default_source_code.inline_string
    config = DynamicModuleFilter()
    assert module.typed_config.Unpack(config)
    assert config.dynamic_module_config.name == config.filter_name == inspector.MODULE_NAME
