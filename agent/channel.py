"""The agent's end of the channel to its gateway (protocol, diagram and messages: trustcap.channel).

The agent dials its gateway (the only address it knows), presents its boot key and, on first contact,
its one-time enrolment token; it pins the gateway's trust-root address from the kernel command line, so
a machine in the middle cannot pose as the gateway. Its first record under the new keys is FINISHED, its
boot key's signature over the gateway's WELCOME (fresh nonce): the gateway installs the channel only
then, so a replayed HELLO cannot displace the live one. It then serves the gateway's requests: quotes,
key rotations, status, stop. It refuses to run more than `max_records_per_epoch` records on one key:
rotation is enforced from both ends.

The record layer and the handshake's messages are `trustcap.channel` in the core, shared with the
gateway; a failure there reaches this component's callers (`Agent.serve_forever`) as its ChannelError.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from trustcap import channel
from trustcap.agent.errors import ChannelError
from trustcap.evidence import Signer

__all__ = ["AgentChannel", "connect"]

log = logging.getLogger("trustcap.agent")


def connect(host: str, port: int, *, signer: Signer, node_id: str, boot_digest: str, gateway_address: str,
            token: str | None, timeout: float = 30,
            clock: Callable[[], float] = time.monotonic) -> channel.SecureChannel:
    """Dial the gateway and run the handshake; the gateway must prove it holds `gateway_address`'s key."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise ChannelError(f"cannot reach the gateway at {host}:{port}: {exc}") from exc
    try:
        priv, eph = channel.new_ephemeral()
        hello = channel.make_hello(signer, eph, node_id=node_id, boot_digest=boot_digest, token=token)
        channel.write_frame(sock, hello.raw)
        welcome = channel.read_welcome(channel.read_frame(sock), hello, gateway_address=gateway_address)
        chan = channel.open_session(sock, priv, hello, welcome, role="agent", clock=clock)
        channel.send_finished(chan, signer, welcome)
        sock.settimeout(None)
        return chan
    except channel.ChannelError as exc:
        sock.close()
        raise ChannelError(str(exc)) from exc
    except BaseException:
        sock.close()
        raise


class AgentChannel:
    """Serves gateway requests on an established channel until it closes. Handlers: op -> fn(params)."""

    def __init__(self, chan: channel.SecureChannel, handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]], *,
                 max_records_per_epoch: int = channel.MAX_RECORDS_PER_EPOCH) -> None:
        self.chan = chan
        self.handlers = handlers
        self.max_records = max_records_per_epoch

    def serve(self) -> None:
        try:
            self._serve()
        except channel.ChannelError as exc:
            raise ChannelError(str(exc)) from exc
        finally:
            self.chan.close()

    def _serve(self) -> None:
        while True:
            req = self.chan.recv()
            op = str(req.get("op", ""))
            if op == "rekey":
                priv, pub = channel.new_ephemeral()
                peer = channel.hex_field(req, "eph", 32)
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
