"""The long-running parts and their configuration: `serve` (the sidecar), `evaluate`, `quality`,
`mock-model`, and `check` / `envoy-config` for the files they run from."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path

from extproc.cli.common import (
    EXIT_FAIL,
    EXIT_OK,
    EXIT_USAGE,
    EXPERIMENT_HELP,
    AddVerb,
    add_common,
    err,
    load,
    positive_int,
    redis_url,
)
from extproc.logs import LogSetup


def cmd_check(ns: argparse.Namespace) -> int:
    from extproc.evaluator.warmup import prompt_file
    from extproc.quality.watchdog import load_probes, probe_file

    exp, p = load(ns.experiment)
    for prompts in (probe_file(exp), prompt_file(exp)):
        if prompts is not None:
            load_probes(prompts)
    print(f"{p}: ok: experiment {exp.name!r}, variants {exp.file_weights()}, stable {exp.stable!r}")
    return EXIT_OK


def cmd_envoy_config(ns: argparse.Namespace) -> int:
    from extproc.envoyconf.bootstrap import render
    from extproc.envoyconf.common import EnvoyLayout, SidecarTls

    tls = None
    if ns.sidecar_ca:
        try:
            tls = SidecarTls(
                ca=ns.sidecar_ca,
                server_name=ns.sidecar_server_name,
                cert=ns.sidecar_client_cert,
                key=ns.sidecar_client_key,
            )
        except ValueError as exc:
            err(f"--sidecar-client-cert/--sidecar-client-key: {exc}")
            return EXIT_USAGE
    elif ns.sidecar_server_name or ns.sidecar_client_cert or ns.sidecar_client_key:
        err("the --sidecar-* TLS options need --sidecar-ca")
        return EXIT_USAGE
    layout = EnvoyLayout(
        listen_host=ns.listen_host,
        listen_port=ns.listen_port,
        admin_port=ns.admin_port,
        sidecar=tuple(ns.sidecar or ["127.0.0.1:50051"]),
        sidecar_tls=tls,
        inspector=ns.inspector,
    )
    if ns.gateway:
        from extproc.envoyconf.bootstrap import render_fleet
        from extproc.envoyconf.gateway import load_gateway

        text = render_fleet(load_gateway(ns.gateway), layout, Path(ns.gateway).name)
    else:
        text = render(load(ns.experiment)[0], layout)
    if ns.output:
        Path(ns.output).write_text(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_build_inspector(ns: argparse.Namespace) -> int:
    from extproc.envoyconf.inspector import InspectorError, build_module

    try:
        folder = build_module(Path(ns.out) if ns.out else None)
    except InspectorError as exc:
        err(str(exc))
        return EXIT_FAIL
    print(folder.resolve())
    return EXIT_OK


def cmd_serve(ns: argparse.Namespace) -> int:
    from extproc.dataplane import workers
    from extproc.dataplane.server import Sidecar, SidecarSettings, TlsFiles, run_sidecar

    exp = None if ns.all else load(ns.experiment)[0]
    if (ns.tls_cert is None) != (ns.tls_key is None) or (ns.tls_client_ca and not ns.tls_cert):
        err("--tls-cert and --tls-key go together (and --tls-client-ca needs them)")
        return EXIT_USAGE
    problem = workers.problem(ns.listen, ns.workers)
    if problem:
        err(problem)
        return EXIT_USAGE
    settings = SidecarSettings(
        listen=ns.listen,
        redis_url=redis_url(ns),
        instance=ns.instance,
        metrics=ns.metrics,
        tls=TlsFiles(ns.tls_cert, ns.tls_key, ns.tls_client_ca) if ns.tls_cert else None,
        max_capture_bytes=ns.capture_buffer_mb * 1024 * 1024,
        known_clusters=ns.known_clusters,
    )
    if ns.workers > 1:
        return workers.Supervisor(exp, settings, ns.workers, log_setup(ns)).run()
    run_sidecar(Sidecar(exp, settings))
    return EXIT_OK


def cmd_evaluate(ns: argparse.Namespace) -> int:
    from extproc.evaluator.takeover import SnapshotPolicy

    snapshots = SnapshotPolicy() if ns.snapshot_s is None else SnapshotPolicy(ns.snapshot_s)
    if ns.all:
        from extproc.evaluator import fleet

        admins = tuple(ns.envoy_admin or ())
        asyncio.run(
            fleet.serve(redis_url(ns), ns.instance, ns.metrics, ns.listener, admins, snapshots)
        )
        return EXIT_OK
    from extproc.evaluator import warmup
    from extproc.evaluator.service import serve

    exp, _ = load(ns.experiment)
    reach = warmup.prepare(exp, ns.listener, ns.envoy_admin or ())  # ConfigError: exit 2
    asyncio.run(serve(exp, redis_url(ns), ns.instance, ns.metrics, reach, snapshots))
    return EXIT_OK


def cmd_quality(ns: argparse.Namespace) -> int:
    """The judge, the watchdog and the feedback endpoint (extproc/quality/worker.py)."""
    from extproc.quality import feedback
    from extproc.quality import worker as quality_worker

    exp, _ = load(ns.experiment)
    settings = quality_worker.QualitySettings(
        redis_url=redis_url(ns),
        listener=ns.listener,
        feedback_listen=ns.feedback_listen,
        feedback_token=os.environ.get(feedback.TOKEN_ENV, ""),
        feedback_insecure=ns.feedback_insecure,
    )
    prepared = quality_worker.prepare(exp, settings)
    asyncio.run(quality_worker.serve(exp, settings, prepared))
    return EXIT_OK


def cmd_mock_model(ns: argparse.Namespace) -> int:
    from extproc.dev import mockmodel

    behaviour = mockmodel.behaviour_from_args(ns)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(mockmodel.serve(ns.host, ns.port, behaviour))
    return EXIT_OK


def log_setup(ns: argparse.Namespace) -> LogSetup:
    """The command line's log settings, for the sidecar's worker processes to apply."""
    return LogSetup(logging.DEBUG if ns.verbose else logging.INFO, ns.log_format)


def register(add: AddVerb) -> None:
    exp_help = EXPERIMENT_HELP
    p = add("serve", cmd_serve, "run the ext_proc sidecar in the foreground")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--experiment", help=exp_help)
    which.add_argument(
        "--all",
        action="store_true",
        help="serve every experiment in Redis, following creations and ends (fleet mode: an "
        "Envoy from `extproc envoy-config --gateway`; each request is filed under an "
        "experiment by its model, route or a header)",
    )
    p.add_argument("--listen", default="127.0.0.1:50051", help="host:port or unix:/path")
    p.add_argument("--instance", default="", help="replica name in Redis (default host-pid)")
    p.add_argument(
        "--known-clusters",
        action="store_true",
        help="with --all: serve experiments whose variants name clusters Envoy already has and "
        "give no address (on Istio, Services; else each variant needs an address, from which "
        "Envoy learns its cluster on demand)",
    )
    p.add_argument(
        "--metrics",
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus /metrics here (default: off); worker i uses PORT+i",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="processes sharing the TCP address (SO_REUSEPORT), supervised (default 1)",
    )
    p.add_argument(
        "--capture-buffer-mb",
        type=positive_int,
        default=64,
        help="captured texts kept while Redis is away, per process; then the newest are dropped",
    )
    p.add_argument("--tls-cert", metavar="PEM", help="serve gRPC over TLS with this certificate")
    p.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca", metavar="PEM", help="require client certificates signed by this CA"
    )
    add_common(p)

    p = add("check", cmd_check, "validate an experiment file; every problem is listed")
    p.add_argument("experiment", nargs="?", help=exp_help)

    p = add("envoy-config", cmd_envoy_config, "print the Envoy bootstrap for an experiment")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--experiment", help=exp_help)
    which.add_argument(
        "--gateway",
        metavar="FILE",
        help="the fleet bootstrap for this gateway file: one Envoy for every experiment in "
        "Redis, served by `extproc serve --all` (example: extproc/data/gateway.yaml)",
    )
    p.add_argument("--listen-host", default="0.0.0.0")
    p.add_argument("--listen-port", type=int, default=10000)
    p.add_argument("--admin-port", type=int, default=9901)
    p.add_argument(
        "--sidecar",
        action="append",
        help="host:port or unix:/path; repeat for several replicas (default 127.0.0.1:50051)",
    )
    p.add_argument("--sidecar-ca", metavar="PEM", help="reach the sidecar over TLS: its CA")
    p.add_argument("--sidecar-server-name", help="SNI, and a DNS name its certificate must have")
    p.add_argument("--sidecar-client-cert", metavar="PEM", help="Envoy's certificate (mTLS)")
    p.add_argument("--sidecar-client-key", metavar="PEM", help="the key of --sidecar-client-cert")
    p.add_argument(
        "--inspector",
        choices=["lua", "module"],  # envoyconf.inspector.INSPECTORS, without importing protobufs
        default="lua",
        help="what reads response bodies: inspect.lua (any Envoy), or the compiled module, "
        "which costs Envoy less but must be built for it (`extproc build-inspector`)",
    )
    p.add_argument("-o", "--output", help="write to this file instead of stdout")

    p = add(
        "build-inspector",
        cmd_build_inspector,
        "compile the inspector module for `envoy-config --inspector module`; prints the folder "
        "to give Envoy as ENVOY_DYNAMIC_MODULES_SEARCH_PATH",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="write lib<name>.so here (default: a cache folder per source version)",
    )

    from extproc.dev import mockmodel

    p = add(
        "mock-model",
        cmd_mock_model,
        "run a model stand-in (OpenAI chat, completions and Responses; Anthropic Messages)",
    )
    mockmodel.add_arguments(p)
    p = add("evaluate", cmd_evaluate, "run the evaluator (one active per experiment)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--experiment", help=exp_help)
    which.add_argument(
        "--all",
        action="store_true",
        help="evaluate every experiment in Redis, following creations and removals (a lease "
        "per experiment: several such processes share them)",
    )
    p.add_argument("--instance", default="", help="evaluator name (default host-pid)")
    p.add_argument(
        "--metrics",
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus /metrics here (default: off)",
    )
    p.add_argument(
        "--listener", help="Envoy's listener URL, for warm-up (default: lifecycle.listener)"
    )
    p.add_argument(
        "--envoy-admin",
        action="append",
        metavar="URL",
        help="an Envoy's admin URL, for health and drain; repeat for every Envoy "
        "(default: lifecycle.envoy_admin)",
    )
    p.add_argument(
        "--snapshot-s",
        type=float,
        default=None,
        metavar="S",
        help="seconds between snapshots of the stage window, which a standby that takes over "
        "loads instead of reading the whole stage (0: none; default 10)",
    )
    add_common(p)

    p = add("quality", cmd_quality, "run the judge, the watchdog and the feedback endpoint")
    p.add_argument("--experiment", help=exp_help)
    p.add_argument("--listener", help="Envoy listener URL the watchdog probes through")
    p.add_argument(
        "--feedback-listen",
        metavar="HOST:PORT",
        help="serve POST /v1/feedback here (default: off; token: $EXTPROC_FEEDBACK_TOKEN)",
    )
    p.add_argument(
        "--feedback-insecure",
        action="store_true",
        help="serve feedback without a token even when a feedback guardrail acts on it",
    )
    add_common(p)
