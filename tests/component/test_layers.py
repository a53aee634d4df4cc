"""The package's layers and its freedom from import cycles (``[tool.importlinter]`` in
pyproject.toml) hold, and the check that `make lint` runs would catch a module that broke them: a
copy of the package with one planted import (the data plane loading the Envoy config generator,
say, or two evaluator modules importing each other) fails it, naming that import."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

pytestmark = pytest.mark.timeout(120)


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """Run the check on the package under ``tree`` (first on the path, so not the installed one)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(tree / "pyproject.toml")],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def copy_package(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "extproc", tmp_path / "extproc", ignore=shutil.ignore_patterns("*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_package_keeps_its_layers(tmp_path: Path) -> None:
    out = lint_imports(copy_package(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 kept, 0 broken" in out.stdout


@pytest.mark.parametrize(
    ("module", "planted", "message"),
    [
        (
            "dataplane/router.py",
            "from extproc.envoyconf import bootstrap",
            "extproc.dataplane.router -> extproc.envoyconf.bootstrap",
        ),
        (
            "evaluator/service.py",
            "from extproc.ops import status",
            "extproc.evaluator.service -> extproc.ops.status",
        ),
        (
            "contract/keys.py",
            "from extproc import config",
            "extproc.contract.keys -> extproc.config",
        ),
        (
            "evaluator/clusters.py",
            "from extproc.evaluator import window",
            "No cycles are allowed in extproc.evaluator",
        ),
    ],
)
def test_a_planted_violation_fails_the_check(
    tmp_path: Path, module: str, planted: str, message: str
) -> None:
    tree = copy_package(tmp_path)
    path = tree / "extproc" / module
    path.write_text(path.read_text() + f"\n{planted}  # planted by the test\n")
    out = lint_imports(tree)
    assert out.returncode != 0
    assert re.search(r"Contracts: \d kept, [12] broken", out.stdout), out.stdout
    assert message in out.stdout
