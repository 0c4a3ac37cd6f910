"""The record layer of the agent<->gateway channel: framing, X25519 key agreement and AEAD records.

The protocol that runs over it (HELLO, WELCOME, FINISHED, requests, rekeying) and its sequence diagram
are in `trustcap.gateway.channel`. Both ends use this one implementation; components may not import each
other, so it lives in the core. Every failure raises the error class the caller passes (`error=`), so
each component keeps its own `ChannelError` in its own hierarchy.

Records: 4-byte length | type | epoch(4) | seq(8) | AEAD(ciphertext); the header is the AAD, the nonce is
the sequence number, which must increase by exactly one (replays and reorders are refused).
"""

from __future__ import annotations

import hashlib
import json
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

from trustcap import canonical
from trustcap.errors import TrustcapError

__all__ = [
    "MAX_FRAME",
    "ChannelError",
    "SecureChannel",
    "decode_msg",
    "derive_keys",
    "encode_msg",
    "new_ephemeral",
    "read_frame",
    "write_frame",
]


class ChannelError(TrustcapError):
    """The channel failed: framing, authentication, decryption or key rotation."""


ErrorType = type[Exception]

MAX_FRAME = 1024 * 1024
_HDR = struct.Struct(">BIQ")
_T_RECORD = 0x17
_INFO = b"trustcap/channel/v1"


def write_frame(sock: socket.socket, body: bytes, *, error: ErrorType = ChannelError) -> None:
    if len(body) > MAX_FRAME:
        raise error(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    try:
        sock.sendall(struct.pack(">I", len(body)) + body)
    except OSError as exc:
        raise error(f"channel write failed: {exc}") from exc


def _read_exact(sock: socket.socket, n: int, error: ErrorType) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except OSError as exc:
            raise error(f"channel read failed: {exc}") from exc
        if not chunk:
            raise error("channel closed by peer")
        buf += chunk
    return bytes(buf)


def read_frame(sock: socket.socket, *, error: ErrorType = ChannelError) -> bytes:
    (n,) = struct.unpack(">I", _read_exact(sock, 4, error))
    if n > MAX_FRAME:
        raise error(f"peer announced a {n}-byte frame (limit {MAX_FRAME})")
    return _read_exact(sock, n, error)


def new_ephemeral() -> tuple[X25519PrivateKey, bytes]:
    key = X25519PrivateKey.generate()
    return key, key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def derive_keys(private: X25519PrivateKey, peer_public: bytes, salt: bytes, *, error: ErrorType = ChannelError
                ) -> tuple[bytes, bytes]:
    """(agent->gateway key, gateway->agent key) from one X25519 exchange and a salt binding the context."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise error(f"peer's ephemeral key is not a valid X25519 key: {exc}") from exc
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=salt, info=_INFO).derive(shared)
    return okm[:32], okm[32:]


def encode_msg(obj: Any) -> bytes:
    return canonical.encode(obj)


def decode_msg(data: bytes, *, error: ErrorType = ChannelError) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(f"channel message is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise error("channel message must be a JSON object")
    return obj


class SecureChannel:
    """AEAD records over a socket, one key per direction, strict sequence numbers, explicit epochs."""

    def __init__(self, sock: socket.socket, send_key: bytes, recv_key: bytes, *, role: str,
                 clock: Callable[[], float] = time.monotonic, error: ErrorType = ChannelError) -> None:
        self.sock = sock
        self.error = error
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
        write_frame(self.sock, hdr + self._send.encrypt(nonce, encode_msg(obj), hdr), error=self.error)
        self._send_seq += 1
        self.records_in_epoch += 1

    def recv(self) -> dict[str, Any]:
        frame = read_frame(self.sock, error=self.error)
        if len(frame) < _HDR.size + 16:
            raise self.error("record too short")
        rtype, epoch, seq = _HDR.unpack(frame[:_HDR.size])
        if rtype != _T_RECORD:
            raise self.error(f"unexpected record type {rtype:#x}")
        if epoch != self.epoch:
            raise self.error(f"record from key epoch {epoch}, channel is at epoch {self.epoch}")
        if seq != self._recv_seq:
            raise self.error(f"record sequence {seq}, expected {self._recv_seq} (replayed, dropped or reordered)")
        nonce = b"\0\0\0\0" + struct.pack(">Q", seq)
        try:
            plain = self._recv.decrypt(nonce, frame[_HDR.size:], frame[:_HDR.size])
        except InvalidTag as exc:
            raise self.error("record failed authentication (tampered, or wrong key)") from exc
        self._recv_seq += 1
        self.records_in_epoch += 1
        return decode_msg(plain, error=self.error)

    def switch_keys(self, private: X25519PrivateKey, peer_public: bytes) -> None:
        """Move to the next epoch with keys from a fresh X25519 exchange, salted with the old keys."""
        a2g, g2a = derive_keys(private, peer_public, self._key_material + struct.pack(">I", self.epoch + 1),
                               error=self.error)
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
