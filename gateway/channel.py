"""The agent<->gateway channel: mutually authenticated, encrypted, with automatic session-key rotation.

Seed Task 4: "Agent only communicate with RPI ... Use encryption and automatically change keys." TLS
would need a PKI on a diskless HPC and Python's ssl cannot force TLS 1.3 KeyUpdate, so the channel is a
small Noise-like protocol on the primitives of `cryptography` (decision 0042):

    agent (HPC, boot key A, pins gateway address G)            gateway (trust root G)
      | HELLO {A, eA, nA, node, bootdigest, [token]} sig_A ----> | sig_A ok? A enrolled for node, or a
      |                                                          |   one-time token + allowed boot digest
      | <---- WELCOME {eG, nG, G} sig_G(hello digest, eG, nG) -- |   (token burnt, A bound to node)
      | sig_G recovers to pinned G?                              |
      | keys = HKDF(X25519(eA, eG), salt = sha256(hello||welcome)) -> k_a2g, k_g2a (epoch 0)
      | ==== FINISHED {sig_A(welcome digest)} (first record) ===> | decrypts (eA proven) and sig_A over
      |                                                          |   nG (A live now): only then is the
      |                                                          |   session installed (a replayed HELLO
      |                                                          |   never displaces the live one)
      | <==== REQ {op, ...} (ChaCha20-Poly1305, epoch, seq) ==== |  gateway is the only requester
      | ===== RESP {...} =======================================>|
      | <==== REKEY {eG'} (every N requests or T seconds) ====== |  fresh X25519 each time:
      | ===== REKEY-ACK {eA'} ==================================>|  keys' = HKDF(X25519, salt = old keys)
      |            both switch to epoch+1; old keys dropped      |

Records: 4-byte length | type | epoch(4) | seq(8) | AEAD(ciphertext); header is the AAD, the nonce is the
sequence number, which must increase by exactly one (replays and reorders are refused). An agent that
sees more than 2N records in one epoch closes the channel: a gateway that stops rotating is caught.

The record layer below the `--- shared record layer ---` line is identical in `trustcap.agent.channel`
(components may not import each other); tests/gateway/test_channel_shared.py keeps the copies equal.
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
from trustcap.gateway.errors import ChannelError

from trustcap import canonical

__all__ = ["MAX_FRAME", "SecureChannel", "derive_keys", "new_ephemeral", "read_frame", "write_frame"]

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
