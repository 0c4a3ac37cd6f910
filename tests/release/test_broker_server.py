"""The broker's HTTP server on 127.0.0.1: the valid request of test_check_release is granted over the
wire (through the gateway's own client), and what a caller can get wrong at the HTTP layer is refused
with the right status and field before the check runs. Only the chain is faked (FakeChain)."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_check_release import NOW, PLAINTEXT, B, FakeChain, World

from trustcap.chain.errors import RpcUnavailable
from trustcap.cli.broker import parse_listen
from trustcap.errors import ConfigError
from trustcap.release import ReleaseRefused, open_with_key, request_release, unwrap_key
from trustcap.release.server import MAX_BODY, BrokerServer


@pytest.fixture(scope="module")
def world() -> World:
    return World()


@pytest.fixture
def broker(world: World) -> Iterator[BrokerServer]:
    with BrokerServer(B, world.chain, read_timeout=1.0, clock=lambda: NOW) as server:
        yield server


def _post(server: BrokerServer, body: bytes, headers: dict[str, str] | None = None,
          path: str = "/v1/release") -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _raw(server: BrokerServer, data: bytes, *, wait: float = 10) -> tuple[int, dict[str, Any]]:
    """Send bytes as they are (headers we choose, a body that may be short) and read the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


def test_valid_request_is_granted_over_http(world: World, broker: BrokerServer,
                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="trustcap.broker"):
        wrapped, executor_key = request_release(broker.url, world.body(), timeout=30)
    assert executor_key == world.executor_key.public_key()
    cek = unwrap_key(wrapped, world.executor_key, capsule_id=world.cid, task_id=world.tid, input_name="names-b")
    assert open_with_key(world.envelope, cek, owner=B.public_key(), capsule_id=world.cid,
                         manifest_digest=world.binding) == PLAINTEXT
    granted = [r.getMessage() for r in caplog.records if r.getMessage().startswith("granted")]
    assert len(granted) == 1
    assert "input='names-b'" in granted[0] and f"executor={world.executor.addr}" in granted[0]
    assert f"task=0x{world.tid.hex()}" in granted[0]
    assert cek.hex() not in caplog.text and base64.b64encode(wrapped).decode() not in caplog.text


def test_answer_shape(world: World, broker: BrokerServer) -> None:
    status, doc = _post(broker, json.dumps(world.body()).encode())
    assert status == 200 and set(doc) == {"wrappedKey", "executorKey"}
    assert doc["executorKey"] == "0x" + world.executor_key.public_key().hex()
    assert len(base64.b64decode(doc["wrappedKey"], validate=True)) == 82


def test_refusal_carries_the_checks_status_and_field(world: World, broker: BrokerServer,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="trustcap.broker"), pytest.raises(ReleaseRefused) as info:
        request_release(broker.url, world.body(input="names-c"), timeout=30)
    assert (info.value.status, info.value.field) == (403, "input")
    assert "owned by" in str(info.value)
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(refused) == 1 and "field=input" in refused[0] and "input='names-c'" in refused[0]


def test_the_brokers_own_clock_decides_what_is_too_old(world: World) -> None:
    """The same request, granted at NOW (control), is refused by a broker whose clock reads 400 s later:
    the server hands its clock to the check, not the caller's word."""
    now = [float(NOW)]
    with BrokerServer(B, world.chain, clock=lambda: now[0]) as server:
        request_release(server.url, world.body(), timeout=30)
        now[0] += 400
        with pytest.raises(ReleaseRefused) as info:
            request_release(server.url, world.body(), timeout=30)
    assert (info.value.status, info.value.field) == (403, "verdicts")
    assert "old; keys are released on evidence of the last 300 s only" in str(info.value)


@pytest.mark.parametrize(("body", "status", "field"), [
    pytest.param(b"{not json", 400, "body", id="malformed-json"),
    pytest.param(b"\xff\xfe\x00", 400, "body", id="not-utf8"),
    pytest.param(b"[1, 2]", 400, "body", id="not-an-object"),
    pytest.param(b'{"capsule": {}, "capsule": {}}', 400, "capsule", id="duplicate-key"),
    pytest.param(b"[" * 100_000, 400, "body", id="deeply-nested"),
])
def test_malformed_bodies(broker: BrokerServer, body: bytes, status: int, field: str) -> None:
    got, doc = _post(broker, body)
    assert (got, doc["field"]) == (status, field), doc
    assert doc["error"]


def test_unknown_field(world: World, broker: BrokerServer) -> None:
    status, doc = _post(broker, json.dumps(world.body(extra=1)).encode())
    assert (status, doc["field"]) == (400, "extra")


def test_oversize_body_is_refused_unread(broker: BrokerServer) -> None:
    head = (f"POST /v1/release HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {MAX_BODY + 1}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as sock:
        start = time.monotonic()
        sock.sendall(head)  # no body sent: the answer comes from the declared length alone
        first = b""
        while b"}" not in first and (chunk := sock.recv(65536)):
            first += chunk
        assert time.monotonic() - start < 0.9  # before the read timeout: nothing of the body was awaited
    assert first.startswith(b"HTTP/1.0 413 ") and b'"field":"body"' in first


def test_oversize_body_sent_whole_is_refused(world: World, broker: BrokerServer) -> None:
    body = world.body()
    body["capsule"]["pad"] = "x" * MAX_BODY
    status, doc = _post(broker, json.dumps(body).encode())
    assert (status, doc["field"]) == (413, "body")


def test_a_body_at_the_limit_reaches_the_check(broker: BrokerServer) -> None:
    body = json.dumps({"capsule": "x" * (MAX_BODY - 20)}).encode()
    assert len(body) <= MAX_BODY
    status, doc = _post(broker, body)
    assert (status, doc["field"]) == (400, "manifest")  # past the HTTP layer: the check names a missing field


def test_slow_body_times_out(broker: BrokerServer) -> None:
    head = b"POST /v1/release HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    start = time.monotonic()
    status, doc = _raw(broker, head)
    assert (status, doc["field"]) == (408, "body")
    assert 0.9 < time.monotonic() - start < 5


@pytest.mark.parametrize(("headers", "status"), [
    pytest.param("Transfer-Encoding: chunked\r\n", 411, id="chunked"),
    pytest.param("", 411, id="no-length"),
    pytest.param("Content-Length: -1\r\n", 400, id="negative-length"),
    pytest.param("Content-Length: 2\r\nContent-Type: text/plain\r\n", 415, id="not-json-type"),
])
def test_framing(broker: BrokerServer, headers: str, status: int) -> None:
    got, doc = _raw(broker, f"POST /v1/release HTTP/1.1\r\nHost: x\r\n{headers}\r\n{{}}".encode())
    assert (got, doc["field"]) == (status, "body")


def test_healthz_and_other_paths(broker: BrokerServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", broker.port, timeout=10)
    conn.request("GET", "/healthz")
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read()) == {"ok": True, "owner": "0x" + B.public_key().hex()}
    conn.close()
    for method, path, status, field in (("GET", "/v1/release", 405, "method"), ("GET", "/", 404, "path"),
                                        ("POST", "/v1/other", 404, "path")):
        conn = http.client.HTTPConnection("127.0.0.1", broker.port, timeout=10)
        conn.request(method, path, body=b"{}" if method == "POST" else None)
        resp = conn.getresponse()
        assert (resp.status, json.loads(resp.read())["field"]) == (status, field)
        conn.close()


class _DownChain(FakeChain):
    def task(self, task_id: bytes) -> Any:
        raise RpcUnavailable("the RPC endpoint http://127.0.0.1:1 did not answer")


def test_chain_that_cannot_be_read_is_503_never_a_release(world: World) -> None:
    down = _DownChain(world.chain.tasks, world.chain.blocks, world.chain.commitments, world.chain.nodes,
                      world.chain.domain())
    with BrokerServer(B, down, clock=lambda: NOW) as server:
        status, doc = _post(server, json.dumps(world.body()).encode())
    assert (status, doc["field"]) == (503, "chain") and "retry later" in doc["error"]
    assert "wrappedKey" not in doc


def test_port_in_use_is_a_clear_error(world: World, broker: BrokerServer) -> None:
    with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{broker.port}"):
        BrokerServer(B, world.chain, port=broker.port)


@pytest.mark.parametrize(("text", "want"), [
    pytest.param("127.0.0.1:8481", ("127.0.0.1", 8481), id="v4"),
    pytest.param("[::1]:0", ("::1", 0), id="v6"),
])
def test_parse_listen(text: str, want: tuple[str, int]) -> None:
    assert parse_listen(text) == want


@pytest.mark.parametrize("text", ["8481", "127.0.0.1:", ":8481", "127.0.0.1:http", "127.0.0.1:70000"])
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="not HOST:PORT"):
        parse_listen(text)


def test_a_caller_cannot_forge_a_log_line(world: World, broker: BrokerServer,
                                          caplog: pytest.LogCaptureFixture) -> None:
    forged = "x\ngranted peer=10.0.0.1 input='names-b'"
    with caplog.at_level(logging.INFO, logger="trustcap.broker"):
        body = world.body()
        body[forged] = 1
        status, doc = _post(broker, json.dumps(body).encode())
        _post(broker, json.dumps({"capsule": {}, forged: 1, "z": 2}).replace('"z"', json.dumps(forged)).encode())
    assert (status, doc["field"]) == (400, forged)  # the answer names it as it was sent
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and all("\n" not in m and m.startswith("refused") for m in messages)
