"""The gateway's agent port stays available under a hostile link (issue 4, defects 2 and 7).

Real loopback TCP, a real software trust root and the real agent code. The claims: a handshake has a
total deadline (a byte-a-second sender is cut off, not kept alive by each byte); concurrent handshakes
are bounded and the one past the bound is refused by name; a silent connection does not stop the genuine
agent from reconnecting; close() ends the accept loop and every pending handshake instead of leaving
threads blocked for the join timeout. Deadlines here are liveness bounds far above a handshake's
milliseconds, not speed claims.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from trustcap.agent.identity import BootConfig, BootKey
from trustcap.agent.service import Agent
from trustcap.gateway.enrol import TokenBook
from trustcap.gateway.server import AttestationServer

BOOT = "0x" + "ab" * 32


def _wait(pred: Any, what: str, limit: float = 10) -> None:
    deadline = time.monotonic() + limit
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def server(trust_root: Any) -> Iterator[AttestationServer]:
    srv = AttestationServer(trust_root, "hpc-1", TokenBook([BOOT]), handshake_seconds=1.0, max_handshakes=2)
    yield srv
    srv.close()


def _agent(srv: AttestationServer, trust_root: Any) -> Agent:
    config = BootConfig(str(srv.address[0]), int(srv.address[1]), srv.tokens.issue("hpc-1"), BOOT,
                        trust_root.address, "hpc-1")
    agent = Agent(config, key=BootKey())
    agent._measure = lambda: {"kernel": "0x" + "11" * 32}
    return agent


def _serve(agent: Agent) -> threading.Thread:
    chan = agent.connect()

    def run() -> None:
        with contextlib.suppress(Exception):  # the channel ends when the server closes: expected here
            chan.serve()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_the_handshake_deadline_is_total_not_per_byte(server: AttestationServer) -> None:
    """Each byte arrives well inside the per-read timeout; the whole handshake still ends at the deadline."""
    with socket.create_connection(server.address, timeout=5) as s:
        s.sendall(b"\x00\x00\x00\x40")  # announces a 64-byte HELLO, then dribbles it
        cut = False
        for _ in range(60):  # 60 x 0.2 s = 12 s of dribbling against a 1 s deadline
            try:
                s.sendall(b"{")
            except OSError:
                cut = True
                break
            time.sleep(0.2)
        assert cut or s.recv(1) == b"", "the gateway kept a dribbling handshake open"
    _wait(lambda: any("not completed within 1 s" in r for r in server.refusals), "the deadline refusal")


def test_handshakes_are_bounded_and_the_next_one_is_refused_by_name(server: AttestationServer,
                                                                     trust_root: Any) -> None:
    silent = [socket.create_connection(server.address, timeout=5) for _ in range(2)]
    try:
        _wait(lambda: len(server._pending) == 2, "two pending handshakes")
        with socket.create_connection(server.address, timeout=5) as third:
            assert third.recv(1) == b""
        assert any("too many handshakes in progress (2)" in r for r in server.refusals)
    finally:
        for s in silent:
            s.close()
    _wait(lambda: not server._pending, "the silent handshakes to end")
    t = _serve(_agent(server, trust_root))  # the bound frees itself: the agent gets in
    assert server.wait_for_agent(10).call("ping") == {"pong": True}
    server.close()
    t.join(timeout=5)


def test_a_silent_connection_does_not_delay_a_fresh_enrolment(server: AttestationServer, trust_root: Any) -> None:
    with socket.create_connection(server.address, timeout=5):
        _wait(lambda: len(server._pending) == 1, "the silent handshake")
        t = _serve(_agent(server, trust_root))
        assert server.wait_for_agent(0.9).call("ping") == {"pong": True}, "enrolled while the silent one waits"
    server.close()
    t.join(timeout=5)


def test_close_ends_the_accept_loop_and_every_pending_handshake(trust_root: Any) -> None:
    srv = AttestationServer(trust_root, "hpc-1", TokenBook([BOOT]), handshake_seconds=60)
    silent = socket.create_connection(srv.address, timeout=5)
    try:
        _wait(lambda: len(srv._pending) == 1, "the pending handshake")
        threads = [srv._thread, *srv._pending.values()]
        srv.close()
        alive = [t.name for t in threads if t.is_alive()]
        assert not alive, f"threads still blocked after close(): {alive}"
        assert silent.recv(1) == b""
    finally:
        silent.close()
        srv.close()
