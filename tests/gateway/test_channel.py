"""The agent<->gateway channel: mutual authentication, enrolment, encryption and automatic key rotation."""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest
from trustcap.agent import channel as achan
from trustcap.agent.errors import ChannelError as AgentChannelError
from trustcap.agent.identity import BootConfig, BootKey
from trustcap.agent.service import Agent
from trustcap.gateway import channel as gchan
from trustcap.gateway.errors import ChannelError as GatewayChannelError

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
    now[0] += session.rekey_seconds + 1
    pair.server.command("ping")
    assert session.chan.epoch == before + 1


def test_agent_closes_a_channel_whose_keys_never_rotate(pair: Any) -> None:
    session = pair.server.wait_for_agent(1)
    session.rekey_after = 10_000  # a gateway that stopped rotating
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


def _tapped_pair() -> tuple[gchan.SecureChannel, achan.SecureChannel, socket.socket, socket.socket]:
    g_sock, tap_in = socket.socketpair()
    tap_out, a_sock = socket.socketpair()
    k1, k2 = b"\x01" * 32, b"\x02" * 32
    return (gchan.SecureChannel(g_sock, k2, k1, role="gateway"), achan.SecureChannel(a_sock, k1, k2, role="agent"),
            tap_in, tap_out)


def test_replayed_tampered_and_old_epoch_records_are_refused() -> None:
    g, a, tap_in, tap_out = _tapped_pair()
    g.send({"op": "ping", "n": 1})
    frame = gchan.read_frame(tap_in)
    gchan.write_frame(tap_out, frame)
    assert a.recv() == {"op": "ping", "n": 1}
    gchan.write_frame(tap_out, frame)  # replay
    with pytest.raises(AgentChannelError, match="sequence"):
        a.recv()

    for c in (g, a, tap_in, tap_out):
        c.close()
    g, a, tap_in, tap_out = _tapped_pair()
    g.send({"op": "ping"})
    frame = bytearray(gchan.read_frame(tap_in))
    frame[-1] ^= 1
    gchan.write_frame(tap_out, bytes(frame))
    with pytest.raises(AgentChannelError, match="authentication"):
        a.recv()

    for c in (g, a, tap_in, tap_out):
        c.close()
    g, a, tap_in, tap_out = _tapped_pair()
    g.send({"op": "ping"})
    old = gchan.read_frame(tap_in)
    gp, gpub = gchan.new_ephemeral()
    ap, apub = achan.new_ephemeral()
    g.switch_keys(gp, apub)
    a.switch_keys(ap, gpub)
    assert g.key_fingerprint() == a.key_fingerprint()
    # the old record, relabelled with the new epoch: the new key cannot open it
    relabelled = old[:1] + (1).to_bytes(4, "big") + old[5:]
    gchan.write_frame(tap_out, relabelled)
    with pytest.raises(AgentChannelError, match="authentication"):
        a.recv()
    for s in (tap_in, tap_out):
        s.close()
    g.close()
    a.close()


def test_both_ends_share_the_core_record_layer_and_raise_their_own_errors() -> None:
    """One record layer (trustcap.channel) serves both ends; each component still raises its own error."""
    import socket

    import trustcap.agent.channel as ac
    import trustcap.gateway.channel as gc

    from trustcap import channel

    assert issubclass(ac.SecureChannel, channel.SecureChannel)
    assert issubclass(gc.SecureChannel, channel.SecureChannel)
    a, g = socket.socketpair()
    try:
        agent_end = ac.SecureChannel(a, b"k" * 32, b"l" * 32, role="agent")
        gateway_end = gc.SecureChannel(g, b"l" * 32, b"x" * 32, role="gateway")  # wrong receive key
        agent_end.send({"op": "ping"})
        with pytest.raises(GatewayChannelError, match="authentication"):
            gateway_end.recv()
        g.close()
        with pytest.raises(AgentChannelError, match="closed by peer"):
            agent_end.recv()
    finally:
        a.close()
        g.close()


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
