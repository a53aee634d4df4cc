"""The checked-in generated code matches proto/ (regenerate with `make proto`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(60)
def test_generated_telemetry_code_is_current(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}",
            f"--mypy_out={tmp_path}",
            str(ROOT / "proto/extproc/telemetry/v1/event.proto"),
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    for name in ("event_pb2.py", "event_pb2.pyi"):
        fresh = (tmp_path / "extproc/telemetry/v1" / name).read_text()
        assert fresh == (ROOT / "extproc/telemetry/v1" / name).read_text(), name


@pytest.mark.timeout(60)
def test_envoy_service_stubs_are_current(tmp_path: Path) -> None:
    """typings/ holds what `make stubs` writes from the installed xds-protos."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    subprocess.run(
        [sys.executable, str(ROOT / "typings/generate.py"), str(tmp_path)],
        check=True,
        env=env,
        capture_output=True,
    )
    fresh = {p.relative_to(tmp_path): p.read_text() for p in tmp_path.rglob("*.pyi")}
    kept = {
        p.relative_to(ROOT / "typings"): p.read_text() for p in (ROOT / "typings").rglob("*.pyi")
    }
    assert fresh.keys() == kept.keys()
    stale = sorted(str(name) for name, text in fresh.items() if kept[name] != text)
    assert not stale, f"run `make stubs`: {stale}"
