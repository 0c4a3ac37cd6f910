"""Enrolment commits only after the channel's FINISHED (issue 12 item 16), over real loopback TCP.

The attacker holds a valid enrolment token it was never meant to have (the node's next-boot token, say)
and a boot key of its own, and sends one HELLO. Enrolling at HELLO time burnt the token and made the
gateway forget the genuine agent's key before anything proved the handshake live, so a probe that never
finished still cut the genuine agent off. The token is now checked at HELLO and burnt only once FINISHED
verifies. Control: the same token in a handshake that does finish enrols the new key and retires the
old one, as a real reboot must.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from trustcap import canonical, channel
from trustcap.agent.identity import BootConfig, BootKey
from trustcap.agent.service import Agent
from trustcap.gateway.enrol import TokenBook
from trustcap.gateway.errors import GatewayError
from trustcap.gateway.server import AttestationServer

BOOT = "0x" + "ab" * 32
NODE = "hpc-1"


def _serve_quietly(chan: Any) -> None:
    try:
        chan.serve()
    except Exception:  # noqa: S110 -- the channel closes when the test ends
        pass


def _hello(key: BootKey, token: str) -> bytes:
    """A well-formed, correctly signed HELLO of `key` presenting `token` (what any holder of both sends)."""
    eph = hashlib.sha256(b"attacker-eph" + token.encode()).digest()
    body: dict[str, Any] = {"type": "hello", "v": 1, "agent_key": "0x" + key.public_key().hex(),
                            "eph": "0x" + eph.hex(), "nonce": "0x" + hashlib.sha256(eph).hexdigest(),
                            "node_id": NODE, "boot_digest": BOOT, "token": token}
    digest = canonical.digest({"domain": channel.HELLO_DOMAIN, "hello": body})
    return channel.encode_msg({**body, "sig": "0x" + key.sign_digest(digest).hex()})


@pytest.fixture
def gateway(trust_root: Any) -> Iterator[tuple[AttestationServer, TokenBook, Agent]]:
    tokens = TokenBook([BOOT])
    server = AttestationServer(trust_root, NODE, tokens, rekey_after=4)
    agent = Agent(BootConfig(*server.address, tokens.issue(NODE), BOOT, trust_root.address, NODE), key=BootKey())
    agent._measure = lambda: {"kernel": "0x" + "11" * 32}
    t = threading.Thread(target=_serve_quietly, args=(agent.connect(),), daemon=True)
    t.start()
    server.wait_for_agent(10)
    yield server, tokens, agent
    server.close()
    t.join(timeout=5)


def _wait_refused(server: AttestationServer, before: int) -> None:
    deadline = time.monotonic() + 10  # liveness bound: a refusal is logged in milliseconds
    while len(server.refusals) <= before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(server.refusals) > before, "the unfinished handshake was never refused"


def _boot_with(server: AttestationServer, agent: Agent, token: str) -> str:
    """A fresh boot (new key) of the node enrolling with `token`; its key, once it holds the session."""
    boot = Agent(BootConfig(*server.address, token, BOOT, agent.config.gateway_address, NODE), key=BootKey())
    boot._measure = lambda: {"kernel": "0x" + "22" * 32}
    threading.Thread(target=_serve_quietly, args=(boot.connect(),), daemon=True).start()
    new_key = "0x" + boot.key.public_key().hex()
    deadline = time.monotonic() + 10  # liveness bound: a handshake takes milliseconds
    while server.wait_for_agent(0).enrolment.agent_key != new_key and time.monotonic() < deadline:
        time.sleep(0.02)
    return new_key


def test_a_hello_with_a_stolen_token_that_never_finishes_changes_nothing(
        gateway: tuple[AttestationServer, TokenBook, Agent]) -> None:
    server, tokens, agent = gateway
    genuine_key = "0x" + agent.key.public_key().hex()
    stolen = tokens.issue(NODE)  # the node's next-boot token, in the attacker's hands
    before = len(server.refusals)
    with socket.create_connection(server.address, timeout=5) as s:
        channel.write_frame(s, _hello(BootKey(), stolen))
        assert channel.decode_msg(channel.read_frame(s))["type"] == "welcome"
    # the attacker hangs up instead of proving the handshake with FINISHED
    _wait_refused(server, before)
    assert tokens.lookup(genuine_key, NODE) is not None, "one HELLO made the gateway forget the genuine key"
    assert server.wait_for_agent(0).enrolment.agent_key == genuine_key
    assert server.relay(b"\x01" * 32) is not None  # the genuine agent still answers
    # the token was not burnt by the HELLO: the real next boot can still enrol with it
    assert tokens.lookup(_boot_with(server, agent, stolen), NODE) is not None


def test_control_a_finished_handshake_with_the_token_enrols_and_retires_the_old_key(
        gateway: tuple[AttestationServer, TokenBook, Agent]) -> None:
    server, tokens, agent = gateway
    genuine_key = "0x" + agent.key.public_key().hex()
    token = tokens.issue(NODE)
    new_key = _boot_with(server, agent, token)
    assert tokens.lookup(new_key, NODE) is not None
    assert tokens.lookup(genuine_key, NODE) is None, "a finished enrolment retires the node's earlier boot key"
    with pytest.raises(GatewayError, match="already used"):
        tokens.enrol(token, NODE, "0x" + "02" * 33, BOOT)
