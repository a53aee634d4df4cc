"""The container image's HEALTHCHECK: probe what this container's `extproc` verb serves.

One image runs every part, so the check reads the verb and its options from the command line of
the container's main process (PID 1, or the PID given as the only argument) with the real CLI
parser, and asks the part itself:

- ``serve``: the gRPC health service (overall status), SERVING only once the live routing was
  read from Redis and not while draining; a TCP connect when it serves TLS (the check holds no
  client certificate);
- ``dashboard``, ``mock-model``, ``quality --feedback-listen``: ``GET /healthz``;
- ``evaluate --metrics``: ``GET /metrics`` (served on the evaluator's own event loop);
- anything else, or a part without an endpoint: healthy, as there is nothing to ask.

Exit 0 when healthy, 1 otherwise (Docker's contract). Kubernetes ignores HEALTHCHECK: the
manifests in deploy/ declare their own probes on the same endpoints.

It runs every few seconds in every container, so it reads only the options it needs with a small
parser of its own instead of importing the package's CLI (which loads Redis, pydantic and the rest:
about a second of CPU per check). tests/component/test_deploy_healthcheck.py checks that its options
and defaults are those of the real CLI.
"""

from __future__ import annotations

import argparse
import socket
import sys
import urllib.request
from pathlib import Path

TIMEOUT_S = 2.0
VERBS = ("serve", "dashboard", "mock-model", "quality", "evaluate")


def command_line(pid: int) -> list[str]:
    """The extproc arguments of a process: what follows the `extproc` script or module."""
    raw = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    argv = [a.decode() for a in raw]
    for i, arg in enumerate(argv):
        if Path(arg).name == "extproc" or (arg == "-m" and argv[i + 1 : i + 2] == ["extproc"]):
            return argv[i + (2 if arg == "-m" else 1) :]
    raise SystemExit(f"process {pid} is not extproc: {argv}")


def local(host: str) -> str:
    """Where to reach a listener from inside its container: a wildcard means loopback."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "[::]") else host


def http_ok(host: str, port: int, path: str) -> bool:
    url = f"http://{local(host)}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def grpc_serving(target: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def healthy(ns: argparse.Namespace) -> bool:
    verb = ns.verb
    if verb == "serve":
        if ns.listen.startswith("unix:"):
            return grpc_serving(ns.listen)
        host, port = split(ns.listen)
        if ns.tls_cert:
            try:
                socket.create_connection((local(host), port), TIMEOUT_S).close()
            except OSError:
                return False
            return True
        return grpc_serving(f"{local(host)}:{port}")
    if verb in ("dashboard", "mock-model"):
        return http_ok(ns.host, ns.port, "/healthz")
    if verb == "quality" and ns.feedback_listen:
        return http_ok(*split(ns.feedback_listen), "/healthz")
    if verb == "evaluate" and ns.metrics:
        return http_ok(*split(ns.metrics), "/metrics")
    return True


def parser() -> argparse.ArgumentParser:
    """The options of each verb this check reads, with the CLI's defaults."""
    p = argparse.ArgumentParser(add_help=False)
    sub = p.add_subparsers(dest="verb")
    serve = sub.add_parser("serve", add_help=False)
    serve.add_argument("--listen", default="127.0.0.1:50051")
    serve.add_argument("--tls-cert")
    for verb, port in (("dashboard", 8080), ("mock-model", 8000)):
        web = sub.add_parser(verb, add_help=False)
        web.add_argument("--host", default="127.0.0.1")
        web.add_argument("--port", type=int, default=port)
    quality = sub.add_parser("quality", add_help=False)
    quality.add_argument("--feedback-listen")
    evaluate = sub.add_parser("evaluate", add_help=False)
    evaluate.add_argument("--metrics")
    return p


def main(argv: list[str]) -> int:
    pid = int(argv[0]) if argv else 1
    args = command_line(pid)
    # Global options (-v) come before the verb.
    verb_at = next((i for i, a in enumerate(args) if not a.startswith("-")), len(args))
    if verb_at == len(args) or args[verb_at] not in VERBS:
        return 0  # a verb that serves nothing to ask
    ns, _ = parser().parse_known_args(args[verb_at:])
    return 0 if healthy(ns) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
