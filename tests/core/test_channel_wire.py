"""The channel's wire format, byte for byte: a recorded conversation that both ends must keep producing.

The digests below were recorded from the channel as it stood before its handshake moved into the core
(issue 10 item 5): an agent and a gateway with fixed keys and fixed ephemerals, the HELLO with an
enrolment token, WELCOME, FINISHED, two pings, a key rotation and a ping in the new epoch. Any change to a
field, a domain, the canonical encoding, the key schedule or the record header changes a digest here,
and an agent and a gateway of different versions would stop understanding each other.
"""

from __future__ import annotations

import hashlib
import socket

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from trustcap import channel
from trustcap.agent.identity import BootKey

AGENT = BootKey(b"\x05" * 32)
GATEWAY = BootKey(b"\x09" * 32)  # the trust root's shape: a Signer
BOOT = "0x" + "ab" * 32
TOKEN = "ab" * 16

# sha256 of each frame body, in wire order, as recorded (see the module docstring)
RECORDED = {
    "hello": "928ddfcbda4fcf9fee855e58b9c445521bfda441854130be9484d35956dc54b9",
    "welcome": "b1a11e0b90d72606a722f7bd9a9a44bdaa02b16a989bffa53bff360e49d2bcf3",
    "finished": "de77d7a6f1c3baa1a877111cbca2101cb204e020e603b6ff429026732eb480be",
    "ping-1": "0773e62d1051a54f05e3cf484ff6d00262e31d36d5116daaad08d2e976fa69bc",
    "pong-1": "ca62e16c479df502b7d8046d1c5faa3c811d76780fa991e751e02c4021f65dbc",
    "ping-2": "608e6c31ce4dfce2e60a0af5f237edee70ced1cd344fe5d414fd3e1d43b18a2f",
    "pong-2": "4d16173ea9d6f70b57db0fa4153e6baa060dbc5807d6b850dbd19efaf1385495",
    "rekey": "184a5a2612bcee518dbb6e71c77f1c2d13ebd7c5f93f03aa4bcf79ddefbe3056",
    "rekey-ack": "fd8c33260f1360e1bcbfdd8ddb17ccfe2da1bcf1fe051cfaddcca829f20f504b",
    "epoch-1-ping": "a49f70c1984a3061e7551172f73822f73175e4a3e4d629a7c52cb1692f38f3e7",
    "epoch-1-pong": "343f3cdef25199a0cb2b64842a8ac9c09be15fd7625feb8407c75631d3b45969",
}


def _eph(n: int) -> tuple[X25519PrivateKey, bytes]:
    key = X25519PrivateKey.from_private_bytes(hashlib.sha256(b"eph%d" % n).digest())
    return key, key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class _Wire:
    """Two socket pairs with the test in the middle: every frame is recorded, then passed on unchanged."""

    def __init__(self) -> None:
        self.agent, self._a_in = socket.socketpair()
        self.gateway, self._g_in = socket.socketpair()
        self.frames: dict[str, bytes] = {}

    def agent_to_gateway(self, name: str) -> None:
        self._pass(name, self._a_in, self._g_in)

    def gateway_to_agent(self, name: str) -> None:
        self._pass(name, self._g_in, self._a_in)

    def _pass(self, name: str, src: socket.socket, dst: socket.socket) -> None:
        body = channel.read_frame(src)
        self.frames[name] = body
        channel.write_frame(dst, body)

    def close(self) -> None:
        for s in (self.agent, self._a_in, self.gateway, self._g_in):
            s.close()


def _conversation() -> dict[str, str]:
    wire = _Wire()
    try:
        a_priv, a_eph = _eph(1)
        hello = channel.make_hello(AGENT, a_eph, node_id="hpc-1", boot_digest=BOOT, token=TOKEN)
        channel.write_frame(wire.agent, hello.raw)
        wire.agent_to_gateway("hello")
        got_hello = channel.read_hello(channel.read_frame(wire.gateway))
        assert got_hello == hello

        g_priv, g_eph = _eph(2)
        welcome = channel.make_welcome(GATEWAY, g_eph, got_hello)
        channel.write_frame(wire.gateway, welcome.raw)
        wire.gateway_to_agent("welcome")
        seen = channel.read_welcome(channel.read_frame(wire.agent), hello, gateway_address=GATEWAY.address)
        agent = channel.open_session(wire.agent, a_priv, hello, seen, role="agent")
        gateway = channel.open_session(wire.gateway, g_priv, got_hello, welcome, role="gateway")
        channel.send_finished(agent, AGENT, seen)
        wire.agent_to_gateway("finished")
        channel.await_finished(gateway, welcome, got_hello.agent_key)

        for n in (1, 2):
            gateway.send({"op": "ping"})
            wire.gateway_to_agent(f"ping-{n}")
            assert agent.recv() == {"op": "ping"}
            agent.send({"pong": True})
            wire.agent_to_gateway(f"pong-{n}")
            assert gateway.recv() == {"pong": True}

        g_new, g_new_pub = _eph(3)
        gateway.send({"op": "rekey", "eph": "0x" + g_new_pub.hex()})
        wire.gateway_to_agent("rekey")
        peer = channel.hex_field(agent.recv(), "eph", 32)
        a_new, a_new_pub = _eph(4)
        agent.send({"eph": "0x" + a_new_pub.hex()})
        agent.switch_keys(a_new, peer)
        wire.agent_to_gateway("rekey-ack")
        gateway.switch_keys(g_new, channel.hex_field(gateway.recv(), "eph", 32))

        gateway.send({"op": "ping"})
        wire.gateway_to_agent("epoch-1-ping")
        assert agent.recv() == {"op": "ping"}
        agent.send({"pong": True})
        wire.agent_to_gateway("epoch-1-pong")
        assert gateway.recv() == {"pong": True}
        return {name: hashlib.sha256(body).hexdigest() for name, body in wire.frames.items()}
    finally:
        wire.close()


def test_the_conversation_is_byte_for_byte_the_recorded_one() -> None:
    assert _conversation() == RECORDED


@pytest.mark.parametrize(("name", "value", "frame"), [
    pytest.param("HELLO_DOMAIN", "trustcap/channel/hello/v2", "hello", id="hello-domain"),
    pytest.param("FINISHED_DOMAIN", "trustcap/channel/finished/v2", "finished", id="finished-domain"),
    pytest.param("_INFO", b"trustcap/channel/v2", "ping-1", id="key-schedule"),
])
def test_control_the_recording_sees_a_change(monkeypatch: pytest.MonkeyPatch, name: str, value: object,
                                             frame: str) -> None:
    """Positive control: with one constant of the protocol changed, both ends still agree with each other,
    but the bytes on the wire are no longer the recorded ones."""
    monkeypatch.setattr(channel, name, value)
    assert _conversation()[frame] != RECORDED[frame]


def test_every_channel_error_is_the_cores() -> None:
    """One `except trustcap.channel.ChannelError` catches a channel failure from any layer (issue 10 item 5);
    the components' own classes still sit under their component's error for their callers."""
    from trustcap.agent.errors import AgentError
    from trustcap.agent.errors import ChannelError as AgentChannelError
    from trustcap.channel import ChannelError
    from trustcap.gateway.errors import ChannelError as GatewayChannelError
    from trustcap.gateway.errors import GatewayError

    assert issubclass(AgentChannelError, ChannelError) and issubclass(AgentChannelError, AgentError)
    assert issubclass(GatewayChannelError, ChannelError) and issubclass(GatewayChannelError, GatewayError)
