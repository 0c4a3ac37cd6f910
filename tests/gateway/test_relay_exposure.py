"""What the relay port tells a gateway on the Pi network that is not on the committee (issue 12 item 10,
decision 0114). Each attack is a directory member (or anyone) asking the executor's relay whether its node
is executing: through the counters and the trust status, which the relay no longer serves, and through an
idle quote, whose `containers` reading lists the running capsule and which a capsule gateway refuses
whether a run goes or not. Each attack has its positive control: the Pi's own metrics listener still
serves the counters and the status, and the capsule round's committee member is still served.
The relay and listeners are real, over loopback; the agent is a software key whose containers reading
follows a `running` switch, like agent/measure.py's."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import os
import ssl
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustcap.chain.keys import KeySigner
from trustcap.errors import ConfigError
from trustcap.evidence import SignedQuote, new_quote, sign_quote
from trustcap.gateway.attest_errors import RelayError
from trustcap.gateway.relay import MetricsService, RelayService
from trustcap.gateway.relay_client import request_quote, request_status
from trustcap.gateway.verifiers import StaticDirectory

NODE = "hpc-1"
MEMBER = KeySigner("0x" + "4b" * 32)  # on the round's committee
NOSY = KeySigner("0x" + "5c" * 32)  # another gateway of the directory, not on the committee
ROUND = "0x" + "3c" * 32
CAPSULE = {"taskId": "0x" + "7a" * 32, "round": ROUND, "phase": "during"}


class Executor:
    """The AttestationServer's relay surface: its quotes' `containers` reading lists the running capsule."""

    node_id = NODE

    def __init__(self) -> None:
        self.root = KeySigner("0x" + "7e" * 32)
        self.agent = KeySigner("0x" + "8f" * 32)
        self.running = False
        self.calls: list[dict[str, Any] | None] = []

    def relay(self, nonce: bytes) -> SignedQuote:
        return self.challenge(nonce)

    def challenge(self, nonce: bytes, capsule_state: dict[str, Any] | None = None) -> SignedQuote:
        self.calls.append(capsule_state)
        containers = "sha256:" + ("c0" * 32 if self.running else "00" * 32)
        state: dict[str, Any] = {"phase": "idle"} if capsule_state is None else dict(capsule_state)
        quote = new_quote(nonce=nonce, issued_at=int(time.time()), node_id=NODE, gateway=self.root.address,
                          agent_key=self.agent.public_key(), boot_image_digest=bytes(32),
                          measurements={"containers": containers}, capsule_state=state)
        return sign_quote(quote, self.agent, self.root)


def _relay(executor: Executor, *, serve_idle: bool) -> RelayService:
    return RelayService(executor, verifiers=StaticDirectory([MEMBER.address, NOSY.address]), serve_idle=serve_idle,
                        round_members={ROUND: {MEMBER.address.lower()}}.get, before_capsule_quote=lambda _c: None)


@pytest.fixture
def executor() -> Executor:
    return Executor()


def _get(url: str, path: str) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_the_relay_port_serves_no_counters_and_no_trust_status(executor: Executor) -> None:
    relay = _relay(executor, serve_idle=False)
    metrics = MetricsService(relay.status)
    try:
        request_quote(relay.url, os.urandom(32), signer=MEMBER, node=NODE, capsule=CAPSULE)  # this node is attested
        for path in ("/metrics", "/v1/status", "/metrics?x=1"):
            status, body = _get(relay.url, path)
            assert status == 404, (path, body)
            assert b"trustcap_gateway_relay" not in body and b"trusted" not in body
        with pytest.raises(RelayError, match="HTTP 404"):
            request_status(relay.url)
        # The positive control: the Pi's own listener shows exactly what the relay port no longer does.
        status, body = _get(metrics.url, "/metrics")
        assert status == 200 and b'trustcap_gateway_relay_challenges_total{result="served"}' in body
        assert request_status(metrics.url)["node"] == NODE
    finally:
        metrics.close()
        relay.close()


def _idle_answer(relay: RelayService, signer: KeySigner) -> str:
    try:
        signed = request_quote(relay.url, os.urandom(32), signer=signer, node=NODE, timeout=10)
    except RelayError as exc:
        return f"refused: {exc}"
    return str(signed.quote.measurements["containers"])


@pytest.mark.parametrize("signer", [MEMBER, NOSY], ids=["committee-member", "directory-member"])
def test_an_idle_challenge_tells_nothing_of_a_run_on_a_capsule_gateway(executor: Executor, signer: KeySigner) -> None:
    relay = _relay(executor, serve_idle=False)
    try:
        executor.running = False
        before = _idle_answer(relay, signer)
        executor.running = True  # a capsule starts
        after = _idle_answer(relay, signer)
        assert before == after and "HTTP 403" in before and "capsule round" in before, (before, after)
        assert executor.calls == []  # the agent was never asked
        # The committee of the running round is still served (its own capsule state, by name).
        signed = request_quote(relay.url, os.urandom(32), signer=MEMBER, node=NODE, capsule=CAPSULE)
        assert signed.quote.capsule_state["round"] == ROUND
        assert relay.stats["refused_idle"] == 2
    finally:
        relay.close()


def test_without_the_refusal_an_idle_quote_shows_the_run(executor: Executor) -> None:
    """The positive control of the attack above: a relay serving idle challenges leaks the bit."""
    relay = _relay(executor, serve_idle=True)
    try:
        executor.running = False
        before = _idle_answer(relay, NOSY)
        executor.running = True
        after = _idle_answer(relay, NOSY)
        assert before != after and not before.startswith("refused"), (before, after)
    finally:
        relay.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.7", "::"])  # noqa: S104 - never bound: refused first
def test_a_metrics_listener_off_loopback_without_client_certificates_is_refused(host: str) -> None:
    with pytest.raises(ConfigError, match=r"not a loopback address.*--metrics-client-ca"):
        MetricsService(lambda: {}, host=host, port=0)


# --- TLS with client certificates (the listener a Prometheus off the Pi may scrape) ------------------------
def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
          *, ca: bool = False) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer if issuer is not None else (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
               .not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
        builder = builder.add_extension(x509.SubjectAlternativeName([loopback]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("trustcap test CA", ca_key, None, ca=True)
    files = {"ca": tmp_path / "ca.pem", "server": tmp_path / "server.pem", "client": tmp_path / "client.pem",
             "stranger": tmp_path / "stranger.pem"}
    _write(files["ca"], ca)
    for who in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(files[who], _cert(who, key, (ca.subject, ca_key)), key)
    stranger_key = ec.generate_private_key(ec.SECP256R1())  # a certificate from no CA the listener trusts
    _write(files["stranger"], _cert("stranger", stranger_key, None), stranger_key)
    return files


@pytest.fixture
def tls_metrics(pki: dict[str, Path]) -> Iterator[MetricsService]:
    svc = MetricsService(lambda: {"node": NODE, "trusted": False}, certfile=str(pki["server"]),
                         keyfile=str(pki["server"].with_suffix(".key")), client_ca=str(pki["ca"]))
    yield svc
    svc.close()


def _scrape(svc: MetricsService, pki: dict[str, Path], client: str | None) -> bytes:
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    if client is not None:
        ctx.load_cert_chain(str(pki[client]), str(pki[client].with_suffix(".key")))
    with urllib.request.urlopen(svc.url + "/metrics", timeout=10, context=ctx) as resp:  # noqa: S310 - loopback
        return bytes(resp.read())


def test_a_tls_metrics_listener_answers_only_a_client_certificate_of_its_ca(tls_metrics: MetricsService,
                                                                            pki: dict[str, Path]) -> None:
    assert tls_metrics.url.startswith("https://")
    assert b"trustcap_gateway_relay" in _scrape(tls_metrics, pki, "client")  # the positive control
    for client in (None, "stranger"):
        with pytest.raises((ssl.SSLError, OSError)):
            _scrape(tls_metrics, pki, client)
    assert b"trustcap_gateway_relay" in _scrape(tls_metrics, pki, "client")  # still serving after refusals


def test_a_silent_tls_client_does_not_hold_the_listener(tls_metrics: MetricsService, pki: dict[str, Path]) -> None:
    import socket

    with socket.create_connection(tls_metrics.address, timeout=10):  # connects, never says hello
        assert b"trustcap_gateway_relay" in _scrape(tls_metrics, pki, "client")
