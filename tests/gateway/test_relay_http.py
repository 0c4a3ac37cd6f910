"""The relay service over real loopback HTTP: a verifier's nonce goes through the gateway to a real agent
(channel, signatures, appraisal are the real code; fixtures in conftest.py), bad requests are refused by
name, load is bounded, and the node's trust status expires when checks stop. Every challenge here is
signed by a directory member (`member`); the refusals of unauthenticated ones are in test_relay_auth.py."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from trustcap.chain.keys import KeySigner
from trustcap.evidence import NonceRegistry, SignedQuote, appraise_quote, sign_challenge
from trustcap.gateway.attest_errors import RelayBusy, RelayError
from trustcap.gateway.relay import MAX_BODY, MetricsService, RelayService, trust_state
from trustcap.gateway.relay_client import request_quote, request_status
from trustcap.gateway.verifiers import StaticDirectory

MEMBER = KeySigner("0x" + "4b" * 32)  # a committee verifier's trust root (a software key is the same shape)
NODE = "hpc-1"


def _ask(url: str, nonce: bytes, **kw: Any) -> SignedQuote:
    return request_quote(url, nonce, signer=MEMBER, node=NODE, **kw)


def _signed(**override: Any) -> bytes:
    """A member's well-signed challenge body with some fields replaced after signing (to break one)."""
    doc = sign_challenge(NonceRegistry(60).issue(), NODE, MEMBER, issued_at=int(time.time()))
    doc.update(override)
    return json.dumps(doc).encode()


@pytest.fixture
def relay(pair: Any) -> Iterator[RelayService]:
    svc = RelayService(pair.server, verifiers=StaticDirectory([MEMBER.address]), max_inflight=2, max_connections=4,
                       read_timeout_s=2)
    yield svc
    svc.close()


def _appraise(pair: Any, signed: SignedQuote, nonces: NonceRegistry, nonce: bytes) -> Any:
    return appraise_quote(signed, nonces=nonces, expected_nonce=nonce, node_id="hpc-1",
                          agent_key=pair.agent.key.public_key(), gateway_address=pair.server.root.address,
                          now=time.time(), max_age_seconds=30)


def test_a_verifiers_nonce_comes_back_as_a_countersigned_quote(pair: Any, relay: RelayService) -> None:
    verifier = NonceRegistry(60)
    nonce = verifier.issue()
    signed = _ask(relay.url, nonce)
    assert signed.quote.nonce == "0x" + nonce.hex()
    assert _appraise(pair, signed, verifier, nonce).ok
    assert relay.stats["challenges"] == 1


def _post(relay: RelayService, body: bytes, path: str = "/v1/challenge",
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    host, port = relay.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers=headers or {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.mark.parametrize(("body", "path", "status", "needle"), [
    pytest.param(b"{not json", "/v1/challenge", 400, "not JSON", id="not-json"),
    pytest.param(b"{}", "/v1/challenge", 400, "'nonce'", id="nonce-missing"),
    pytest.param(_signed(nonce="0x1234"), "/v1/challenge", 400, "'nonce'", id="nonce-short"),
    pytest.param(_signed(nonce="0x" + "zz" * 32), "/v1/challenge", 400, "'nonce'", id="nonce-not-hex"),
    pytest.param(_signed(nonce="0x" + "AB" * 32), "/v1/challenge", 400, "lowercase", id="nonce-uppercase"),
    pytest.param(_signed(nonce=5), "/v1/challenge", 400, "'nonce'", id="nonce-not-string"),
    pytest.param(_signed(extra=1), "/v1/challenge", 400, "extra", id="unknown-field"),
    pytest.param(b"[]", "/v1/challenge", 400, "'nonce'", id="not-an-object"),
    pytest.param(b"x" * (MAX_BODY + 1), "/v1/challenge", 413, "over", id="body-too-large"),
    pytest.param(b"{}", "/v1/other", 404, "no such resource", id="unknown-path"),
])
def test_bad_requests_are_refused_by_name_and_reach_no_agent(
        pair: Any, relay: RelayService, body: bytes, path: str, status: int, needle: str) -> None:
    got, doc = _post(relay, body, path)
    assert got == status and needle in doc["error"], doc
    assert relay.stats["challenges"] == 0
    # the channel was never used: the agent's own counter did not move
    assert pair.server.wait_for_agent(0).chan.records_in_epoch == 0


def test_challenges_beyond_the_inflight_bound_get_503_busy(pair: Any, relay: RelayService) -> None:
    # occupy both slots as two slow challenges would
    assert relay._inflight.acquire(blocking=False) and relay._inflight.acquire(blocking=False)
    try:
        with pytest.raises(RelayBusy, match="busy"):
            _ask(relay.url, bytes(32))
    finally:
        relay._inflight.release()
        relay._inflight.release()
    assert relay.stats["refused_busy"] == 1
    _ask(relay.url, NonceRegistry(60).issue())  # and served again once a slot is free


def test_a_burst_of_verifiers_is_each_served_or_told_busy_never_reset(pair: Any) -> None:
    import threading

    svc = RelayService(pair.server, verifiers=StaticDirectory([MEMBER.address]), max_inflight=2, max_connections=32)
    nonces = NonceRegistry(60)
    outcomes: list[str] = []
    barrier = threading.Barrier(24)

    def one() -> None:
        nonce = nonces.issue()
        barrier.wait()
        try:
            _ask(svc.url, nonce)
            outcomes.append("served")
        except RelayBusy:
            outcomes.append("busy")
        except RelayError as exc:
            outcomes.append(f"error: {exc}")

    threads = [threading.Thread(target=one) for _ in range(24)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        svc.close()
    assert set(outcomes) <= {"busy", "served"}, outcomes
    assert len(outcomes) == 24 and outcomes.count("served") >= 2
    assert svc.stats["challenges"] + svc.stats["refused_busy"] == 24


def test_connections_beyond_the_bound_are_closed_at_once(relay: RelayService) -> None:
    idle = [socket.create_connection(relay.address, timeout=5) for _ in range(4)]
    try:
        time.sleep(0.2)  # let the server take all four
        extra = socket.create_connection(relay.address, timeout=5)
        try:
            assert extra.recv(1) == b""  # closed without a byte
        finally:
            extra.close()
        assert relay.refused_connections >= 1
    finally:
        for s in idle:
            s.close()


def test_stalled_clients_are_dropped_and_their_slots_come_back(relay: RelayService) -> None:
    stalled = [socket.create_connection(relay.address, timeout=10) for _ in range(4)]  # every slot
    try:
        for s in stalled:  # a header promising a body that never comes
            s.sendall(b"POST /v1/challenge HTTP/1.1\r\nContent-Length: 80\r\n\r\n{")
        for s in stalled:  # the server hangs up on each after its 2 s read timeout
            assert s.recv(1024) == b""
    finally:
        for s in stalled:
            s.close()
    time.sleep(0.1)
    assert _ask(relay.url, NonceRegistry(60).issue()).quote.node_id == "hpc-1"


def test_no_agent_gives_503_naming_the_cause(trust_root: Any) -> None:
    from trustcap.gateway.enrol import TokenBook
    from trustcap.gateway.server import AttestationServer

    server = AttestationServer(trust_root, "hpc-1", TokenBook(["0x" + "ab" * 32]))
    svc = RelayService(server, verifiers=StaticDirectory([MEMBER.address]))
    try:
        with pytest.raises(RelayError, match="503 agent unreachable"):
            _ask(svc.url, bytes(32))
        assert svc.stats["agent_failures"] == 1
    finally:
        svc.close()
        server.close()


def test_unreachable_gateway_is_a_relay_error() -> None:
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(RelayError, match="unreachable"):
        _ask(f"http://127.0.0.1:{port}", bytes(32), timeout=5)


@pytest.mark.parametrize("url", [
    pytest.param("file:///etc/passwd", id="file-scheme"),
    pytest.param("ftp://127.0.0.1/x", id="ftp-scheme"),
    pytest.param("127.0.0.1:8080", id="no-scheme"),
    pytest.param("http://", id="no-host"),
])
def test_only_http_gateway_urls_are_opened(url: str) -> None:
    with pytest.raises(RelayError, match="must be http"):
        _ask(url, bytes(32))
    with pytest.raises(RelayError, match="must be http"):
        request_status(url)


def test_metrics_count_results_and_report_trust(pair: Any, relay: RelayService) -> None:
    import urllib.request

    _ask(relay.url, NonceRegistry(60).issue())
    _post(relay, b"{}")
    metrics = MetricsService(relay.status)
    try:
        with urllib.request.urlopen(metrics.url + "/metrics", timeout=10) as resp:  # noqa: S310 - our loopback URL
            text = resp.read().decode()
    finally:
        metrics.close()
    assert 'trustcap_gateway_relay_challenges_total{result="served"}' in text
    assert 'trustcap_gateway_relay_challenges_total{result="bad_request"}' in text
    assert "trustcap_gateway_relay_challenge_seconds_count" in text
    assert 'trustcap_gateway_node_trusted{node="hpc-1"} 0.0' in text  # no monitor records: never trusted


# --- trust status and its expiry ------------------------------------------------------------------------
@dataclass
class Rec:
    at: float
    ok: bool
    failed: list[dict[str, str]] = field(default_factory=list)


@pytest.mark.parametrize(("records", "now", "trusted", "reason"), [
    pytest.param([], 100.0, False, "attestation.none", id="never-checked"),
    pytest.param([Rec(90, True)], 100.0, True, "attestation.fresh", id="fresh-pass"),
    pytest.param([Rec(10, True)], 100.0, False, "attestation.expired", id="pass-too-old"),
    pytest.param([Rec(90, True), Rec(95, False, [{"id": "agent.unreachable"}])], 100.0, False,
                 "attestation.failed: agent.unreachable", id="latest-failed"),
    pytest.param([Rec(95, False, [{"id": "policy.measurements.kernel.mismatch"}, {"id": "nonce.replayed"}]),
                  Rec(99, True)], 100.0, True, "attestation.fresh", id="recovered"),
    pytest.param([Rec(99, True), Rec(50, False, [{"id": "x"}])], 100.0, True, "attestation.fresh",
                 id="order-by-time-not-position"),
])
def test_trust_state(records: list[Rec], now: float, trusted: bool, reason: str) -> None:
    state = trust_state(records, now=now, max_age_s=30)
    assert state.trusted is trusted and state.reason.startswith(reason), state


def test_status_expires_when_checks_stop(pair: Any) -> None:
    clock = [1000.0]
    records = [Rec(1000.0, True)]
    svc = RelayService(pair.server, verifiers=StaticDirectory([]), records=lambda: records, max_age_s=30,
                       clock=lambda: clock[0])
    metrics = MetricsService(svc.status)
    try:
        doc = request_status(metrics.url)
        assert doc["trusted"] is True and doc["node"] == "hpc-1"
        clock[0] += 31  # the monitor went silent: no new record
        doc = request_status(metrics.url)
        assert doc["trusted"] is False and doc["reason"].startswith("attestation.expired"), doc
    finally:
        metrics.close()
        svc.close()
