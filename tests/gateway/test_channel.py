"""The agent<->gateway channel: mutual authentication, enrolment, encryption and automatic key rotation."""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

from trustcap import channel
from trustcap.agent import channel as achan
from trustcap.agent.errors import ChannelError as AgentChannelError
from trustcap.agent.identity import BootConfig, BootKey
from trustcap.agent.service import Agent
from trustcap.gateway.enrol import Enrolment
from trustcap.gateway.errors import ChannelError as GatewayChannelError
from trustcap.gateway.server import AgentSession, Rotation

BOOT_ = "0x" + "ab" * 32  # the boot digest the `pair` fixture's gateway serves


def test_quote_round_trip_through_the_gateway_is_countersigned(pair: Any) -> None:
    from trustcap.evidence import NonceRegistry, appraise_quote

    reg = NonceRegistry(60)
    nonce = reg.issue()
    signed = pair.server.relay(nonce)
    report = appraise_quote(signed, nonces=reg, expected_nonce=nonce, node_id="hpc-1",
                            agent_key=pair.agent.key.public_key(), gateway_address=pair.server.root.address,
                            now=signed.quote.issued_at, max_age_seconds=30)
    assert report.ok, report.summary()
    assert signed.quote.measurements["kernel"] == "0x" + "11" * 32


def test_keys_rotate_automatically_and_both_ends_agree(pair: Any) -> None:
    session = pair.server.wait_for_agent(1)
    seen = set()
    for _ in range(20):
        pair.server.command("ping")
        seen.add(session.chan.key_fingerprint())
    assert session.rotations >= 3, "20 requests with rekey_after=4 must rotate several times"
    assert len(seen) == session.rotations + 1 or len(seen) >= 4, "every rotation must change the keys"
    agent_chan = pair.agent.channel
    assert agent_chan is not None
    assert agent_chan.chan.epoch == session.chan.epoch
    assert agent_chan.chan.key_fingerprint() == session.chan.key_fingerprint()


def test_time_based_rotation(pair: Any) -> None:
    session = pair.server.wait_for_agent(1)
    now = [session.chan.clock()]
    session.chan.clock = lambda: now[0]
    session.chan.epoch_started = now[0]
    before = session.chan.epoch
    pair.server.command("ping")
    assert session.chan.epoch == before
    now[0] += session.rotation.seconds + 1
    pair.server.command("ping")
    assert session.chan.epoch == before + 1


def test_agent_closes_a_channel_whose_keys_never_rotate(pair: Any) -> None:
    session = pair.server.wait_for_agent(1)
    session.rotation = Rotation(requests=10_000)  # a gateway that stopped rotating
    agent_chan = pair.agent.channel
    assert agent_chan is not None
    with pytest.raises(Exception, match=r"refused|closed|failed"):
        for _ in range(200):
            pair.server.command("ping")
    for t in pair.threads:
        t.join(timeout=5)
    assert any("did not rotate keys" in str(e) for e in pair.errors), pair.errors


def test_agent_refuses_a_gateway_that_is_not_the_pinned_one(pair: Any) -> None:
    c = pair.agent.config
    impostor = BootKey().address
    with pytest.raises(AgentChannelError, match="not the pinned gateway"):
        achan.connect(c.gateway_host, c.gateway_port, signer=BootKey(), node_id="hpc-1", boot_digest=BOOT_,
                      gateway_address=impostor, token=pair.server.tokens.issue("hpc-1"))


@pytest.mark.parametrize(("token", "boot", "node", "why"), [
    pytest.param("reused", BOOT_, "hpc-1", "already used", id="reused-token"),
    pytest.param("0123456789abcdef", BOOT_, "hpc-1", "unknown", id="unknown-token"),
    pytest.param(None, BOOT_, "hpc-1", "not enrolled and no enrolment token", id="no-token"),
    pytest.param("fresh", "0x" + "cd" * 32, "hpc-1", "is not one this gateway serves", id="wrong-boot-image"),
    pytest.param("fresh", BOOT_, "hpc-2", "this gateway serves", id="wrong-node"),
])
def test_enrolment_refusals(pair: Any, token: str | None, boot: str, node: str, why: str) -> None:
    c = pair.agent.config
    tok = {"reused": pair.token, "fresh": pair.server.tokens.issue("hpc-1")}.get(token or "", token)
    with pytest.raises(AgentChannelError):
        achan.connect(c.gateway_host, c.gateway_port, signer=BootKey(), node_id=node, boot_digest=boot,
                      gateway_address=c.gateway_address, token=tok, timeout=5)
    for _ in range(50):
        if pair.server.refusals:
            break
        threading.Event().wait(0.05)
    assert any(why in r for r in pair.server.refusals), pair.server.refusals


def test_enrolled_agent_reconnects_without_a_token(pair: Any) -> None:
    agent = pair.agent
    assert agent.enrolled
    pair.serve(agent.connect())  # second handshake: same key, no token
    for _ in range(50):
        if pair.server.session is not None and pair.server.session.chan is agent.channel.chan:  # type: ignore
            break
        threading.Event().wait(0.05)
    assert pair.server.command("ping") == {"pong": True}


def _tapped_pair() -> tuple[channel.SecureChannel, channel.SecureChannel, socket.socket, socket.socket]:
    g_sock, tap_in = socket.socketpair()
    tap_out, a_sock = socket.socketpair()
    k1, k2 = b"\x01" * 32, b"\x02" * 32
    return (channel.SecureChannel(g_sock, k2, k1, role="gateway"),
            channel.SecureChannel(a_sock, k1, k2, role="agent"), tap_in, tap_out)


def _replayed(g: channel.SecureChannel, a: channel.SecureChannel, tap_out: socket.socket, frame: bytes) -> bytes:
    channel.write_frame(tap_out, frame)
    assert a.recv() == {"op": "ping", "n": 1}  # positive control: the genuine record passes, once
    return frame


def _tampered(g: channel.SecureChannel, a: channel.SecureChannel, tap_out: socket.socket, frame: bytes) -> bytes:
    return frame[:-1] + bytes([frame[-1] ^ 1])


def _old_epoch(g: channel.SecureChannel, a: channel.SecureChannel, tap_out: socket.socket, frame: bytes) -> bytes:
    gp, gpub = channel.new_ephemeral()
    ap, apub = channel.new_ephemeral()
    g.switch_keys(gp, apub)
    a.switch_keys(ap, gpub)
    assert g.key_fingerprint() == a.key_fingerprint()
    return frame[:1] + (1).to_bytes(4, "big") + frame[5:]  # relabelled with the new epoch: the new key cannot open it


@pytest.mark.parametrize(("attack", "why"), [
    pytest.param(_replayed, "sequence", id="replayed"),
    pytest.param(_tampered, "authentication", id="tampered"),
    pytest.param(_old_epoch, "authentication", id="old-epoch-under-new-keys"),
])
def test_replayed_tampered_and_old_epoch_records_are_refused(attack: Any, why: str) -> None:
    g, a, tap_in, tap_out = _tapped_pair()
    try:
        g.send({"op": "ping", "n": 1})
        channel.write_frame(tap_out, attack(g, a, tap_out, channel.read_frame(tap_in)))
        with pytest.raises(channel.ChannelError, match=why):
            a.recv()
    finally:
        for c in (g, a, tap_in, tap_out):
            c.close()


def test_a_record_layer_failure_reaches_each_end_as_its_components_error() -> None:
    """One record layer (trustcap.channel) serves both ends and raises its own ChannelError; the agent's
    serving loop and the gateway's session hand it on as their component's ChannelError, which is what
    their callers catch (Agent.serve_forever reconnects; the monitor and relay handle GatewayError)."""
    a, g = socket.socketpair()
    with pytest.raises(channel.ChannelError, match="closed by peer"):
        g.close()
        channel.SecureChannel(a, b"k" * 32, b"l" * 32, role="agent").recv()
    a.close()

    a, g = socket.socketpair()
    gateway_end = channel.SecureChannel(g, b"l" * 32, b"x" * 32, role="gateway")  # wrong receive key
    serving = achan.AgentChannel(channel.SecureChannel(a, b"k" * 32, b"l" * 32, role="agent"),
                                 {"ping": lambda _: {"pong": True}})
    ended: list[BaseException] = []

    def serve() -> None:
        try:
            serving.serve()
        except BaseException as exc:  # recorded for the assertions below
            ended.append(exc)

    served = threading.Thread(target=serve, daemon=True)
    served.start()
    try:
        session = AgentSession(gateway_end, Enrolment("hpc-1", "0x" + "02" * 33, BOOT_, 0.0), Rotation(4))
        with pytest.raises(GatewayChannelError, match="authentication"):
            session.call("ping")  # the agent answers, but under a key the gateway does not hold
    finally:
        g.close()
    served.join(timeout=5)
    assert len(ended) == 1 and isinstance(ended[0], AgentChannelError), ended
    assert "closed by peer" in str(ended[0])


def test_bad_boot_config_names_the_key() -> None:
    from trustcap.agent.errors import EnrolmentError
    from trustcap.agent.identity import parse_cmdline

    good = ("console=ttyS0 trustcap.gateway=169.254.1.1:7000 trustcap.token=abcdef0123 "
            f"trustcap.bootdigest=sha256:{'ab' * 32} trustcap.gatewayaddr=0x{'11' * 20} trustcap.node=hpc-1")
    cfg = parse_cmdline(good)
    assert isinstance(cfg, BootConfig) and cfg.gateway_port == 7000 and cfg.boot_digest == BOOT_
    for key in ("trustcap.gateway", "trustcap.token", "trustcap.bootdigest", "trustcap.gatewayaddr", "trustcap.node"):
        broken = " ".join(w for w in good.split() if not w.startswith(key + "="))
        with pytest.raises(EnrolmentError, match=key.replace(".", r"\.")):
            parse_cmdline(broken)
    with pytest.raises(EnrolmentError, match="bootdigest"):
        parse_cmdline(good.replace("sha256:", "md5:"))
    assert isinstance(Agent, type) and GatewayChannelError is not None
