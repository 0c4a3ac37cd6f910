"""The agent's end of the channel to its gateway (protocol and diagram: trustcap.gateway.channel).

The agent dials its gateway (the only address it knows), presents its boot key and, on first contact,
its one-time enrolment token; it pins the gateway's trust-root address from the kernel command line, so
a machine in the middle cannot pose as the gateway. Its first record under the new keys is FINISHED, its
boot key's signature over the gateway's WELCOME (fresh nonce): the gateway installs the channel only
then, so a replayed HELLO cannot displace the live one. It then serves the gateway's requests: quotes,
key rotations, status, stop. It refuses to run more than `max_records_per_epoch` records on one key:
rotation is enforced from both ends.

The record layer is `trustcap.channel` in the core, shared with the gateway.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from trustcap.agent.errors import ChannelError

from trustcap import canonical, channel
from trustcap.forms import hex_bytes

__all__ = ["AgentChannel", "SecureChannel", "connect"]

log = logging.getLogger("trustcap.agent")
HELLO_DOMAIN = "trustcap/channel/hello/v1"
WELCOME_DOMAIN = "trustcap/channel/welcome/v1"
FINISHED_DOMAIN = "trustcap/channel/finished/v1"

# --- record layer: trustcap.channel (one implementation for both ends), raising this component's error ---
MAX_FRAME = channel.MAX_FRAME
new_ephemeral = channel.new_ephemeral
encode_msg = channel.encode_msg
write_frame = functools.partial(channel.write_frame, error=ChannelError)
read_frame = functools.partial(channel.read_frame, error=ChannelError)
derive_keys = functools.partial(channel.derive_keys, error=ChannelError)
decode_msg = functools.partial(channel.decode_msg, error=ChannelError)


class SecureChannel(channel.SecureChannel):
    """The shared record layer, raising this component's ChannelError."""

    def __init__(self, sock: socket.socket, send_key: bytes, recv_key: bytes, *, role: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(sock, send_key, recv_key, role=role, clock=clock, error=ChannelError)



def _hexfield(msg: dict[str, Any], field: str, n: int) -> bytes:
    b = hex_bytes(msg.get(field), n)
    if b is None:
        raise ChannelError(f"field {field!r} missing or not {n} bytes of 0x-hex")
    return b


def connect(host: str, port: int, *, signer: Any, node_id: str, boot_digest: str, gateway_address: str,
            token: str | None, timeout: float = 30, clock: Callable[[], float] = time.monotonic) -> SecureChannel:
    """Dial the gateway and run the handshake; the gateway must prove it holds `gateway_address`'s key."""
    from trustcap.evidence import recover_address
    from trustcap.evidence.errors import SignatureError

    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise ChannelError(f"cannot reach the gateway at {host}:{port}: {exc}") from exc
    try:
        priv, eph = new_ephemeral()
        body: dict[str, Any] = {"type": "hello", "v": 1, "agent_key": "0x" + signer.public_key().hex(),
                                "eph": "0x" + eph.hex(), "nonce": "0x" + hashlib.sha256(eph).hexdigest(),
                                "node_id": node_id, "boot_digest": boot_digest}
        if token:
            body["token"] = token
        hello_digest = canonical.digest({"domain": HELLO_DOMAIN, "hello": body})
        raw_hello = encode_msg({**body, "sig": "0x" + signer.sign_digest(hello_digest).hex()})
        write_frame(sock, raw_hello)
        raw_welcome = read_frame(sock)
        welcome = decode_msg(raw_welcome)
        if welcome.get("type") != "welcome":
            raise ChannelError("gateway did not answer with WELCOME")
        wbody = {k: v for k, v in welcome.items() if k != "sig"}
        wdigest = canonical.digest({"domain": WELCOME_DOMAIN, "hello": hello_digest, "welcome": wbody})
        try:
            who = recover_address(wdigest, _hexfield(welcome, "sig", 65))
        except SignatureError as exc:
            raise ChannelError(f"gateway's WELCOME signature is invalid: {exc}") from exc
        if who != gateway_address:
            raise ChannelError(f"WELCOME is signed by {who}, not the pinned gateway {gateway_address}")
        a2g, g2a = derive_keys(priv, _hexfield(welcome, "eph", 32), hashlib.sha256(raw_hello + raw_welcome).digest())
        chan = SecureChannel(sock, a2g, g2a, role="agent", clock=clock)
        # FINISHED, the first record under the new keys: proves to the gateway that this is a live handshake
        # (our ephemeral secret, our boot key over its fresh nonce), not a replayed HELLO; only then does it
        # let this channel replace the one it has.
        fdigest = canonical.digest({"domain": FINISHED_DOMAIN, "welcome": wdigest})
        chan.send({"type": "finished", "sig": "0x" + signer.sign_digest(fdigest).hex()})
        chan.records_in_epoch = 0  # the handshake's record is not a request: rotation counts requests
        sock.settimeout(None)
        return chan
    except BaseException:
        sock.close()
        raise


class AgentChannel:
    """Serves gateway requests on an established channel until it closes. Handlers: op -> fn(params)."""

    def __init__(self, chan: SecureChannel, handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]], *,
                 max_records_per_epoch: int = 64) -> None:
        self.chan = chan
        self.handlers = handlers
        self.max_records = max_records_per_epoch

    def serve(self) -> None:
        try:
            self._serve()
        finally:
            self.chan.close()

    def _serve(self) -> None:
        while True:
            req = self.chan.recv()
            op = str(req.get("op", ""))
            if op == "rekey":
                priv, pub = new_ephemeral()
                peer = _hexfield(req, "eph", 32)
                self.chan.send({"eph": "0x" + pub.hex()})
                self.chan.switch_keys(priv, peer)
                log.info("channel rotated to key epoch %s", self.chan.epoch)
                continue
            if self.chan.records_in_epoch > self.max_records:
                self.chan.close()
                raise ChannelError(f"gateway did not rotate keys within {self.max_records} records; closed")
            handler = self.handlers.get(op)
            try:
                resp = handler(req) if handler else {"error": f"unknown op {op!r}"}
            except Exception as exc:  # one failed request must not kill the agent; the gateway sees why
                log.warning("request %s failed: %s", op, exc)
                resp = {"error": f"{type(exc).__name__}: {exc}"}
            self.chan.send(resp)
