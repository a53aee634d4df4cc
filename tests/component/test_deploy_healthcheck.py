"""The containers' health checks, run for real against real processes.

- The image's HEALTHCHECK (deploy/docker/healthcheck.py) reads the verb of the container's main
  process and asks that part: a sidecar is healthy only when its gRPC health service says
  SERVING (a TCP connect, the old compose check, passes a sidecar that never read its routing),
  a stand-in when /healthz answers, an evaluator when /metrics answers.
- Compose's Envoy check (bash, as the official image has no curl) asks the admin API's /ready on
  the container's loopback.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from extproc.cli.main import build_parser
from extproc.config import EXAMPLE_EXPERIMENT
from extproc.dev import stack
from tests.component.test_deploy import (
    DEPLOY,
    OVERLAYS,
    ROOT,
    compose,
    compose_argv,
    containers,
    envoy_binary,
    extproc_services,
)

pytestmark = pytest.mark.timeout(90)

SCRIPT = DEPLOY / "docker" / "healthcheck.py"
EXTPROC = str(Path(sys.executable).parent / "extproc")


def image_check(pid: int) -> int:
    """The image's health check against one process, as Docker runs it against PID 1: its exit
    code, from a verdict (a crash of the check itself fails the test)."""
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(pid)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.stderr == "", out.stderr
    return out.returncode


def check_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("healthcheck", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_check_reads_options_as_the_cli_does() -> None:
    """The check parses the options it needs itself (importing the CLI would cost about a second
    of CPU per check): each such option has the real CLI's default, and every command line the
    repository runs (compose, every overlay) reads the same with both parsers."""
    check = check_module()
    real = build_parser()
    (real_verbs,) = [a.choices for a in real._actions if isinstance(a, argparse._SubParsersAction)]
    (own_verbs,) = [
        a.choices for a in check.parser()._actions if isinstance(a, argparse._SubParsersAction)
    ]
    assert set(own_verbs) == set(check.VERBS)
    dests = {}
    for verb, own in own_verbs.items():
        real_defaults = {a.dest: a.default for a in real_verbs[verb]._actions}
        dests[verb] = [a.dest for a in own._actions]
        for action in own._actions:
            assert action.dest in real_defaults, f"{verb}: the CLI has no {action.dest}"
            assert action.default == real_defaults[action.dest], f"{verb} {action.dest}"
    argvs = [compose_argv(n) for n in extproc_services()]
    argvs += [
        c["args"] for o in OVERLAYS for _, c in containers(o) if c["image"].startswith("extproc")
    ]
    seen = set()
    for argv in argvs:
        if argv[0] not in check.VERBS:
            continue
        seen.add(argv[0])
        ours, _ = check.parser().parse_known_args(argv)
        theirs = real.parse_args(argv)
        for dest in dests[argv[0]]:
            assert getattr(ours, dest) == getattr(theirs, dest), (argv, dest)
    assert seen == set(check.VERBS)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[stack.Stack]:
    st = stack.Stack(tmp_path / "state")
    try:
        yield st
    finally:
        st.stop_all()


def pid_of(st: stack.Stack, name: str) -> int:
    return int(st.state["processes"][name]["pid"])


def test_image_check_asks_a_stand_in_its_healthz(procs: stack.Stack) -> None:
    port = stack.free_port()
    argv = [EXTPROC, "mock-model", "--host", "0.0.0.0", "--port", str(port), "--name", "x"]
    procs.spawn("model", argv)
    stack.wait_until(stack.http_ok(f"http://127.0.0.1:{port}/healthz"), "stand-in", 30)
    assert image_check(pid_of(procs, "model")) == 0


def test_image_check_asks_the_sidecar_for_serving(procs: stack.Stack, redis_url: str) -> None:
    """A sidecar that reads its routing from Redis is SERVING: healthy. One whose Redis never
    answers accepts TCP on its port but stays NOT_SERVING (it only knows the file's weights,
    which could undo a rollback): unhealthy."""
    good, bad = stack.free_port(), stack.free_port()
    common = ["serve", "--experiment", str(EXAMPLE_EXPERIMENT)]
    procs.spawn(
        "good",
        [EXTPROC, *common, "--listen", f"0.0.0.0:{good}"],
        env={"REDIS_URL": redis_url, "EXTPROC_STATE_DIR": str(procs.dir / "none")},
    )
    nowhere = f"redis://127.0.0.1:{stack.free_port()}/0"
    procs.spawn(
        "bad",
        [EXTPROC, *common, "--listen", f"0.0.0.0:{bad}"],
        env={"REDIS_URL": nowhere, "EXTPROC_STATE_DIR": str(procs.dir / "none")},
    )
    stack.wait_until(lambda: image_check(pid_of(procs, "good")) == 0, "a SERVING sidecar", 30)
    stack.wait_until(stack.tcp_ok("127.0.0.1", bad), "the sidecar without Redis listening", 30)
    assert image_check(pid_of(procs, "bad")) == 1


def test_image_check_asks_the_evaluator_its_metrics(procs: stack.Stack, redis_url: str) -> None:
    port = stack.free_port()
    argv = [EXTPROC, "evaluate", "--experiment", str(EXAMPLE_EXPERIMENT)]
    procs.spawn(
        "evaluator",
        [*argv, "--metrics", f"0.0.0.0:{port}"],
        env={"REDIS_URL": redis_url, "EXTPROC_STATE_DIR": str(procs.dir / "none")},
    )
    stack.wait_until(lambda: image_check(pid_of(procs, "evaluator")) == 0, "evaluator", 30)


def test_compose_envoy_check_asks_admin_ready(tmp_path: Path, procs: stack.Stack) -> None:
    """Compose's Envoy health check, with the config compose mounts (ports moved to free ones):
    it fails while nothing answers on the admin port and passes once Envoy is ready."""
    boot = yaml.safe_load((ROOT / "envoy" / "envoy-compose.yaml").read_text())
    for listener in boot["static_resources"]["listeners"]:
        listener["address"]["socket_address"]["port_value"] = stack.free_port()
    admin = boot["admin"]["address"]["socket_address"]
    compose_port, admin["port_value"] = admin["port_value"], stack.free_port()
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(boot))
    test = compose()["services"]["envoy"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "bash", "-c"]
    script = test[3].replace(f"/{compose_port} ", f"/{admin['port_value']} ")
    assert script != test[3]

    def check() -> int:
        return subprocess.run(
            ["bash", "-c", script], capture_output=True, timeout=10, check=False
        ).returncode

    assert check() != 0
    procs.spawn("envoy", [envoy_binary(), "-c", str(config), "--disable-hot-restart"])
    stack.wait_until(lambda: check() == 0, "the compose health check of Envoy", 30)
