"""The operator writes `Gateway.status.lastSeen` only from evidence it checks (issue 12 item 13, decision
0114): the Gateway's own key signed the operator's fresh nonce at the Gateway's endpoint. The relay is the
real one (gateway/relay.py `RelayService`, a software key) over loopback HTTP; the attacks are an endpoint
answering with another key, an endpoint replaying an answer it once got, a dead endpoint, and a lagging
watch that would double the writes. Each has its passing control beside it."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from trustcap.chain.keys import KeySigner
from trustcap.evidence import liveness
from trustcap.forms import parse_rfc3339
from trustcap.gateway import relay as relay_module
from trustcap.gateway.relay import RelayService
from trustcap.gateway.verifiers import StaticDirectory
from trustcap.operator import gateway as operator_gateway
from trustcap.operator.gateway import (
    SEEN_INTERVAL_S,
    probe_liveness,
    record_seen,
)

GATEWAY = KeySigner("0x" + "5a" * 32)  # the Gateway's trust root
IMPOSTOR = KeySigner("0x" + "6b" * 32)  # a key that is not the Gateway's
NOW = 1_800_000_000.0


class _NoAgent:
    node_id = "hpc-1"

    def relay(self, nonce: bytes) -> Any:
        raise AssertionError("Must not be called: a liveness probe never reaches the agent")

    def challenge(self, nonce: bytes, capsule_state: dict[str, Any] | None = None) -> Any:
        raise AssertionError("Must not be called: a liveness probe never reaches the agent")


class Patch:
    def __init__(self) -> None:
        self.status: dict[str, Any] = {}


def _relay(signer: KeySigner, interval_s: float = 0.0) -> RelayService:
    return RelayService(_NoAgent(), verifiers=StaticDirectory([]), liveness=signer, liveness_interval_s=interval_s)


@pytest.fixture
def relay() -> Iterator[RelayService]:
    svc = _relay(GATEWAY)
    yield svc
    svc.close()


def _endpoint(svc: RelayService) -> str:
    host, port = svc.address
    return f"{host}:{port}"


def _spec(endpoint: str, address: str = GATEWAY.address) -> dict[str, str]:
    return {"endpoint": endpoint, "address": address.lower()}  # Gateway objects may hold lowercase addresses


def test_the_operator_and_the_relay_sign_the_same_statement() -> None:
    """Both take the one digest of trustcap/evidence/liveness.py, under its own domain."""
    assert operator_gateway.liveness_digest is relay_module.liveness_digest is liveness.liveness_digest
    nonce = bytes(range(32))
    assert liveness.liveness_digest(nonce, GATEWAY.address) != liveness.liveness_digest(bytes(32), GATEWAY.address)
    assert liveness.LIVENESS_DOMAIN == "trustcap.gateway-liveness.v1"


def test_a_gateway_whose_key_answers_is_seen(relay: RelayService) -> None:  # the positive control
    patch = Patch()
    assert record_seen(_spec(_endpoint(relay)), {}, patch, now=NOW) is None
    assert parse_rfc3339(patch.status["lastSeen"]) == NOW


def test_an_endpoint_answering_with_another_key_is_not_seen() -> None:
    impostor = _relay(IMPOSTOR)  # a relay up at the Gateway's endpoint, but not holding its key
    try:
        patch = Patch()
        why = record_seen(_spec(_endpoint(impostor)), {}, patch, now=NOW)
    finally:
        impostor.close()
    assert "lastSeen" not in patch.status
    assert why is not None and IMPOSTOR.address in why and GATEWAY.address in why


class _Replayer:
    """An endpoint that answers every probe with one answer the real Gateway once gave (another nonce)."""

    def __init__(self, answer: bytes) -> None:
        body = answer

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        host, port = self.http.server_address[:2]
        return f"{host!s}:{port}"

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def test_a_replayed_answer_of_the_real_gateway_is_not_seen(relay: RelayService) -> None:
    status, captured = relay.liveness_answer(json.dumps({"nonce": "0x" + "11" * 32}).encode())
    assert status == 200 and json.loads(captured)["gateway"] == GATEWAY.address  # a genuine, signed answer
    replayer = _Replayer(captured)
    try:
        patch = Patch()
        why = record_seen(_spec(replayer.endpoint), {}, patch, now=NOW)
    finally:
        replayer.close()
    assert "lastSeen" not in patch.status
    assert why is not None and "over this probe's nonce" in why  # signed over another nonce


def test_a_busy_trust_root_is_asked_again_not_called_unseen() -> None:
    """Two Gateway objects on one endpoint are probed together; the relay signs at most one answer per
    interval and tells the second 503 + Retry-After. Busy is not down: the probe waits and asks once more."""
    busy = _relay(GATEWAY, interval_s=0.4)
    answered: list[int] = []
    real = busy.liveness_answer

    def counted(body: bytes) -> tuple[int, bytes]:
        status, doc = real(body)
        answered.append(status)
        return status, doc

    busy.liveness_answer = counted  # type: ignore[method-assign]
    try:
        assert probe_liveness(_endpoint(busy), GATEWAY.address) is None  # takes this interval's answer
        assert probe_liveness(_endpoint(busy), GATEWAY.address) is None  # 503 first, then signed after the wait
    finally:
        busy.close()
    assert answered == [200, 503, 200]


def test_a_relay_that_stays_busy_is_not_seen() -> None:
    """The control of the retry: it is one retry, bounded, so a relay that always answers 503 is unseen."""
    stuck = _relay(GATEWAY, interval_s=3600.0)
    try:
        assert probe_liveness(_endpoint(stuck), GATEWAY.address) is None
        why = probe_liveness(_endpoint(stuck), GATEWAY.address)
    finally:
        stuck.close()
    assert why is not None and "HTTP 503" in why


@pytest.mark.parametrize(("header", "wait"), [("1", 1.0), ("0.2", 0.2), ("-5", 0.05), ("nan", 1.0),
                                              ("Wed, 21 Oct 2026 07:28:00 GMT", 1.0), (None, 1.0), ("1e9", 1.0)])
def test_retry_after_is_clamped(header: str | None, wait: float) -> None:
    assert operator_gateway._retry_after(header) == wait


def test_a_dead_endpoint_is_not_seen(relay: RelayService) -> None:
    endpoint = _endpoint(relay)
    relay.close()
    patch = Patch()
    why = probe_liveness(endpoint, GATEWAY.address, timeout_s=2)
    assert why is not None and "unreachable" in why
    assert record_seen(_spec(endpoint), {}, patch, now=NOW) is not None and "lastSeen" not in patch.status


@pytest.mark.parametrize(("endpoint", "needle"), [
    pytest.param("127.0.0.1:1/../x", "not host:port", id="path-in-endpoint"),
    pytest.param("user@127.0.0.1:1", "not host:port", id="userinfo"),
    pytest.param(None, "not host:port", id="missing"),
])
def test_an_endpoint_that_is_not_host_port_is_never_fetched(endpoint: Any, needle: str) -> None:
    why = probe_liveness(endpoint, GATEWAY.address)
    assert why is not None and needle in why


class Probe:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, endpoint: Any, address: Any) -> str | None:
        self.calls += 1
        return None


def test_at_most_one_write_per_interval_even_when_the_watch_lags() -> None:
    probe, spec = Probe(), _spec("127.0.0.1:1")
    first = Patch()
    assert record_seen(spec, {}, first, now=NOW, probe=probe) is None and probe.calls == 1
    # The watch has not delivered the write yet (status still empty), but this process wrote 30 s ago.
    lagged = Patch()
    record_seen(spec, {}, lagged, now=NOW + 30, written_at=NOW, probe=probe)
    assert probe.calls == 1 and lagged.status == {}
    # The status shows a fresh lastSeen: not due either.
    fresh = Patch()
    record_seen(spec, {"lastSeen": first.status["lastSeen"]}, fresh, now=NOW + SEEN_INTERVAL_S - 1, probe=probe)
    assert probe.calls == 1 and fresh.status == {}
    # Due again after the interval (the positive control of the two above).
    due = Patch()
    record_seen(spec, {"lastSeen": first.status["lastSeen"]}, due, now=NOW + SEEN_INTERVAL_S, written_at=NOW,
                probe=probe)
    assert probe.calls == 2 and parse_rfc3339(due.status["lastSeen"]) == NOW + SEEN_INTERVAL_S


def test_liveness_answers_are_rate_bounded_and_need_exactly_a_nonce() -> None:
    svc = RelayService(_NoAgent(), verifiers=StaticDirectory([]), liveness=GATEWAY, liveness_interval_s=60)
    try:
        body = json.dumps({"nonce": "0x" + "22" * 32}).encode()
        assert svc.liveness_answer(body)[0] == 200
        assert svc.liveness_answer(body)[0] == 503  # a slow trust root is not a signing oracle on demand
        assert svc.liveness_answer(json.dumps({"nonce": "0x" + "22" * 32, "x": 1}).encode())[0] == 400
        assert svc.liveness_answer(b'{"nonce": "0x12"}')[0] == 400
    finally:
        svc.close()
    bare = RelayService(_NoAgent(), verifiers=StaticDirectory([]))
    try:
        assert bare.liveness_answer(body)[0] == 404  # no trust root given: no liveness
    finally:
        bare.close()


def test_an_endpoint_claiming_the_gateways_address_with_another_key_is_not_seen() -> None:
    class Liar(KeySigner):
        @property
        def address(self) -> str:
            return GATEWAY.address  # says it is the Gateway; signs with its own key

    liar = _relay(Liar("0x" + "6b" * 32))
    try:
        patch = Patch()
        why = record_seen(_spec(_endpoint(liar)), {}, patch, now=NOW)
    finally:
        liar.close()
    assert "lastSeen" not in patch.status
    assert why is not None and "not signed by the Gateway's key" in why


def test_the_timer_keeps_its_bookkeeping_in_kopfs_memo() -> None:
    """Operator-wide state lives in memo (issue 10 item 4): two operators' memos never share a book. The
    probe goes to a closed port on loopback and is refused."""
    import kopf

    from trustcap.operator.gateway import gateway_seen

    one, two = kopf.Memo(), kopf.Memo()
    patch = kopf.Patch()
    gateway_seen(spec={"endpoint": "127.0.0.1:9", "address": GATEWAY.address}, status={}, meta={"name": "gw-a"},
                 patch=patch, memo=one)
    assert "unreachable" in str(one["gateway_seen"].unseen["gw-a"]) and "gateway_seen" not in two
    assert "lastSeen" not in patch.status
