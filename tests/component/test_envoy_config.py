"""The Envoy configs we ship or generate are what Envoy 1.40 accepts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from extproc.config import EXAMPLE_EXPERIMENT, load_experiment
from extproc.dev.stack import envoy_binary
from extproc.envoyconf.bootstrap import render, render_fleet
from extproc.envoyconf.common import EnvoyLayout
from extproc.envoyconf.gateway import EXAMPLE_GATEWAY, load_gateway
from extproc.envoyconf.inspector import SEARCH_PATH_ENV

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "envoy").glob("*.yaml"))


def envoy_validate(path: Path, env: dict[str, str] | None = None) -> None:
    out = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
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


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dataplane", ["ext_proc", "native"])
def test_configs_with_the_compiled_inspector_validate(
    tmp_path: Path, dataplane: str, inspector_module: Path
) -> None:
    """Envoy loads the module while validating: the build, its exports and the filter config
    are checked together."""
    from extproc.config import parse_experiment

    doc = yaml.safe_load(EXAMPLE_EXPERIMENT.read_text())
    doc["dataplane"] = dataplane
    p = tmp_path / "envoy.yaml"
    p.write_text(render(parse_experiment(doc), EnvoyLayout(inspector="module")))
    assert "extproc_inspect" in p.read_text()
    envoy_validate(p, {SEARCH_PATH_ENV: str(inspector_module)})
    gateway = tmp_path / "fleet.yaml"
    layout = EnvoyLayout(inspector="module")
    gateway.write_text(render_fleet(load_gateway(EXAMPLE_GATEWAY), layout, "gateway.yaml"))
    envoy_validate(gateway, {SEARCH_PATH_ENV: str(inspector_module)})


def test_forcing_headers_never_reach_a_model_server() -> None:
    import yaml

    from extproc.config import parse_experiment

    doc = yaml.safe_load(EXAMPLE_EXPERIMENT.read_text())
    doc["forced_routing"] = {"secret_env": "FORCE_KEY"}
    doc["shadow"] = {"variant": "canary", "share": 10}
    config = yaml.safe_load(render(parse_experiment(doc), EnvoyLayout()))
    routes = [
        route
        for listener in config["static_resources"]["listeners"]
        for chain in listener["filter_chains"]
        for f in chain["filters"]
        for vhost in f["typed_config"]["route_config"]["virtual_hosts"]
        for route in vhost["routes"]
    ]
    assert len(routes) >= 4  # two variants, the fallback, the shadow listener's
    for route in routes:
        assert {"x-experiment", "x-experiment-key"} <= set(route["request_headers_to_remove"])


@pytest.mark.parametrize("dataplane", ["ext_proc", "native"])
def test_a_fractional_upstream_timeout_is_kept(dataplane: str) -> None:
    """``request_timeout_s: 0.5`` is half a second on every route, not 0 (no timeout)."""
    import yaml

    from extproc.config import parse_experiment

    doc = yaml.safe_load(EXAMPLE_EXPERIMENT.read_text())
    doc.update(dataplane=dataplane, envoy={"request_timeout_s": 0.5}, inflight={"notice_ms": 250})
    config = yaml.safe_load(render(parse_experiment(doc), EnvoyLayout()))
    timeouts = {
        route["route"].get("timeout")
        for listener in config["static_resources"]["listeners"]
        for chain in listener["filter_chains"]
        for f in chain["filters"]
        for vhost in f["typed_config"]["route_config"]["virtual_hosts"]
        for route in vhost["routes"]
        if "route" in route
    }
    assert timeouts == {"0.500s"}


def test_several_sidecars_over_tls_from_the_cli(tmp_path: Path) -> None:
    """Replicas share streams by least request and are health-checked; TLS checks the name."""
    import yaml

    from extproc.cli.main import main

    out = tmp_path / "envoy.yaml"
    argv = ["envoy-config", "--sidecar", "10.0.0.5:50051", "--sidecar", "10.0.0.6:50051"]
    argv += ["--sidecar-ca", "/etc/extproc/ca.pem", "--sidecar-server-name", "extproc-sidecar"]
    assert main([*argv, "-o", str(out)]) == 0
    cluster = yaml.safe_load(out.read_text())["static_resources"]["clusters"][0]
    assert cluster["lb_policy"] == "LEAST_REQUEST"
    assert len(cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2
    check = cluster["health_checks"][0]["grpc_health_check"]
    assert check["service_name"] == "envoy.service.ext_proc.v3.ExternalProcessor"
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["sni"] == "extproc-sidecar"
    assert tls["common_tls_context"]["alpn_protocols"] == ["h2"]
    san = tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
    assert san == [{"san_type": "DNS", "matcher": {"exact": "extproc-sidecar"}}]
    # One replica: nothing to balance or to fail over to.
    assert main(["envoy-config", "-o", str(out)]) == 0
    single = yaml.safe_load(out.read_text())["static_resources"]["clusters"][0]
    assert "health_checks" not in single
    assert "transport_socket" not in single
    # Unusable combinations are refused with a usage error.
    assert main(["envoy-config", "--sidecar-server-name", "x", "-o", str(out)]) == 2
    with pytest.raises(ValueError, match="cannot share a cluster"):
        render(
            load_experiment(EXAMPLE_EXPERIMENT),
            EnvoyLayout(sidecar=("unix:/run/extproc.sock", "extproc:50051")),
        )


@pytest.mark.timeout(90)
@pytest.mark.parametrize("dataplane", ["ext_proc", "native"])
def test_the_primary_listener_drops_what_only_envoy_may_say_and_the_shadow_listener_marks(
    tmp_path: Path, dataplane: str
) -> None:
    """Client-sent routing, shadow and request-id headers never get past the primary listener's
    first step; the shadow listener marks each copy and keeps the id it carries."""
    import yaml

    from extproc.config import parse_experiment

    doc = yaml.safe_load(EXAMPLE_EXPERIMENT.read_text())
    doc["shadow"] = {"variant": "canary", "share": 100}
    doc["dataplane"] = dataplane
    text = render(parse_experiment(doc), EnvoyLayout())
    (tmp_path / "envoy.yaml").write_text(text)
    envoy_validate(tmp_path / "envoy.yaml")
    early = {
        listener["name"]: listener["filter_chains"][0]["filters"][0]["typed_config"][
            "early_header_mutation_extensions"
        ][0]["typed_config"]["mutations"]
        for listener in yaml.safe_load(text)["static_resources"]["listeners"]
    }
    assert early["llm"] == [
        {"remove": h}
        for h in (
            "x-llm-variant",
            "x-llm-shadow",
            "x-llm-shadow-copy",
            "x-llm-forced",
            "x-request-id",
        )
    ]
    assert early["llm_shadow"] == [
        {"remove": "x-llm-variant"},
        {"remove": "x-llm-shadow"},
        {
            "append": {
                "header": {"key": "x-llm-shadow-copy", "value": "1"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        },
    ]


def test_shipped_fleet_config_is_the_generated_one() -> None:
    """envoy/envoy-fleet.yaml is `extproc envoy-config --gateway` of the bundled example."""
    text = render_fleet(load_gateway(EXAMPLE_GATEWAY), EnvoyLayout(), EXAMPLE_GATEWAY.name)
    assert (ROOT / "envoy" / "envoy-fleet.yaml").read_text() == text
