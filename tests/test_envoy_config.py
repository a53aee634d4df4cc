"""The Envoy configs we ship or generate are what Envoy 1.40 accepts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from extproc.cli import EXAMPLE_EXPERIMENT
from extproc.config import load_experiment
from extproc.envoy_config import EnvoyLayout, render
from extproc.stack import envoy_binary

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "envoy").glob("*.yaml"))


def envoy_validate(path: Path) -> None:
    out = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_shipped_config_is_the_generated_one() -> None:
    """envoy/envoy.yaml is `extproc envoy-config` of the bundled example: regenerate, don't edit."""
    text = render(load_experiment(EXAMPLE_EXPERIMENT), EnvoyLayout())
    shipped = (ROOT / "envoy" / "envoy.yaml").read_text()
    assert shipped == text


@pytest.mark.timeout(90)
@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_validate(path: Path) -> None:
    envoy_validate(path)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "layout",
    [
        EnvoyLayout(sidecar="unix:/tmp/extproc.sock"),
        EnvoyLayout(
            sidecar="extproc:50051", upstreams={"stable": "vllm-a:8000", "canary": "vllm-b:8000"}
        ),
    ],
    ids=["unix-socket", "dns-names"],
)
def test_generated_variants_validate(tmp_path: Path, layout: EnvoyLayout) -> None:
    p = tmp_path / "envoy.yaml"
    p.write_text(render(load_experiment(EXAMPLE_EXPERIMENT), layout))
    envoy_validate(p)
