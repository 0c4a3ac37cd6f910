"""The agent's end of the channel to its gateway (protocol and diagram: trustcap.gateway.channel).

The agent dials its gateway (the only address it knows), presents its boot key and, on first contact,
its one-time enrolment token; it pins the gateway's trust-root address from the kernel command line, so
a machine in the middle cannot pose as the gateway. Its first record under the new keys is FINISHED, its
boot key's signature over the gateway's WELCOME (fresh nonce): the gateway installs the channel only
then, so a replayed HELLO cannot displace the live one. It then serves the gateway's requests: quotes,
key rotations, status, stop. It refuses to run more than `max_records_per_epoch` records on one key:
rotation is enforced from both ends.

The record layer below the `--- shared record layer ---` line is identical to the gateway's copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from trustcap.agent.errors import ChannelError

from trustcap import canonical

__all__ = ["AgentChannel", "SecureChannel", "connect"]

log = logging.getLogger("trustcap.agent")
HELLO_DOMAIN = "trustcap/channel/hello/v1"
WELCOME_DOMAIN = "trustcap/channel/welcome/v1"
FINISHED_DOMAIN = "trustcap/channel/finished/v1"

# --- shared record layer (keep identical to agent/channel.py) ---
MAX_FRAME = 1024 * 1024
_HDR = struct.Struct(">BIQ")
_T_RECORD = 0x17
_INFO = b"trustcap/channel/v1"


def write_frame(sock: socket.socket, body: bytes) -> None:
    if len(body) > MAX_FRAME:
        raise ChannelError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    try:
        sock.sendall(struct.pack(">I", len(body)) + body)
    except OSError as exc:
        raise ChannelError(f"channel write failed: {exc}") from exc


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except OSError as exc:
            raise ChannelError(f"channel read failed: {exc}") from exc
        if not chunk:
            raise ChannelError("channel closed by peer")
        buf += chunk
    return bytes(buf)


def read_frame(sock: socket.socket) -> bytes:
    (n,) = struct.unpack(">I", _read_exact(sock, 4))
    if n > MAX_FRAME:
        raise ChannelError(f"peer announced a {n}-byte frame (limit {MAX_FRAME})")
    return _read_exact(sock, n)


def new_ephemeral() -> tuple[X25519PrivateKey, bytes]:
    key = X25519PrivateKey.generate()
    return key, key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def derive_keys(private: X25519PrivateKey, peer_public: bytes, salt: bytes) -> tuple[bytes, bytes]:
    """(agent->gateway key, gateway->agent key) from one X25519 exchange and a salt binding the context."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise ChannelError(f"peer's ephemeral key is not a valid X25519 key: {exc}") from exc
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=salt, info=_INFO).derive(shared)
    return okm[:32], okm[32:]


def encode_msg(obj: Any) -> bytes:
    return canonical.encode(obj)


def decode_msg(data: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ChannelError(f"channel message is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ChannelError("channel message must be a JSON object")
    return obj


class SecureChannel:
    """AEAD records over a socket, one key per direction, strict sequence numbers, explicit epochs."""

    def __init__(self, sock: socket.socket, send_key: bytes, recv_key: bytes, *, role: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sock = sock
        self.role = role
        self.clock = clock
        self.epoch = 0
        self._send, self._recv = ChaCha20Poly1305(send_key), ChaCha20Poly1305(recv_key)
        self._key_material = self._material(send_key, recv_key)
        self._send_seq = 0
        self._recv_seq = 0
        self.records_in_epoch = 0
        self.epoch_started = clock()

    def send(self, obj: dict[str, Any]) -> None:
        hdr = _HDR.pack(_T_RECORD, self.epoch, self._send_seq)
        nonce = b"\0\0\0\0" + struct.pack(">Q", self._send_seq)
        write_frame(self.sock, hdr + self._send.encrypt(nonce, encode_msg(obj), hdr))
        self._send_seq += 1
        self.records_in_epoch += 1

    def recv(self) -> dict[str, Any]:
        frame = read_frame(self.sock)
        if len(frame) < _HDR.size + 16:
            raise ChannelError("record too short")
        rtype, epoch, seq = _HDR.unpack(frame[:_HDR.size])
        if rtype != _T_RECORD:
            raise ChannelError(f"unexpected record type {rtype:#x}")
        if epoch != self.epoch:
            raise ChannelError(f"record from key epoch {epoch}, channel is at epoch {self.epoch}")
        if seq != self._recv_seq:
            raise ChannelError(f"record sequence {seq}, expected {self._recv_seq} (replayed, dropped or reordered)")
        nonce = b"\0\0\0\0" + struct.pack(">Q", seq)
        try:
            plain = self._recv.decrypt(nonce, frame[_HDR.size:], frame[:_HDR.size])
        except InvalidTag as exc:
            raise ChannelError("record failed authentication (tampered, or wrong key)") from exc
        self._recv_seq += 1
        self.records_in_epoch += 1
        return decode_msg(plain)

    def switch_keys(self, private: X25519PrivateKey, peer_public: bytes) -> None:
        """Move to the next epoch with keys from a fresh X25519 exchange, salted with the old keys."""
        a2g, g2a = derive_keys(private, peer_public, self._key_material + struct.pack(">I", self.epoch + 1))
        send_key, recv_key = (a2g, g2a) if self.role == "agent" else (g2a, a2g)
        self._send, self._recv = ChaCha20Poly1305(send_key), ChaCha20Poly1305(recv_key)
        self._key_material = self._material(send_key, recv_key)
        self.epoch += 1
        self._send_seq = self._recv_seq = 0
        self.records_in_epoch = 0
        self.epoch_started = self.clock()

    def _material(self, send_key: bytes, recv_key: bytes) -> bytes:
        """Both ends must derive the same chaining value: order the keys agent->gateway first."""
        a2g, g2a = (send_key, recv_key) if self.role == "agent" else (recv_key, send_key)
        return hashlib.sha256(a2g + g2a).digest()

    def key_fingerprint(self) -> str:
        """A digest of the current keys (never the keys): lets tests see that rotation changed them."""
        return hashlib.sha256(b"fp" + self._key_material).hexdigest()[:16]

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _hexfield(msg: dict[str, Any], field: str, n: int) -> bytes:
    v = msg.get(field)
    if not isinstance(v, str) or not v.startswith("0x") or len(v) != 2 + 2 * n:
        raise ChannelError(f"field {field!r} missing or not {n} bytes of 0x-hex")
    try:
        return bytes.fromhex(v[2:])
    except ValueError as exc:
        raise ChannelError(f"field {field!r} is not hex") from exc


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
