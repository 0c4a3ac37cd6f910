"""The agent<->gateway channel: mutually authenticated, encrypted, with automatic session-key rotation.

Seed Task 4: "Agent only communicate with RPI ... Use encryption and automatically change keys." TLS
would need a PKI on a diskless HPC and Python's ssl cannot force TLS 1.3 KeyUpdate, so the channel is a
small Noise-like protocol on the primitives of `cryptography` (decision 0042):

    agent (HPC, boot key A, pins gateway address G)            gateway (trust root G)
      | HELLO {A, eA, nA, node, bootdigest, [token]} sig_A ----> | sig_A ok? A enrolled for node, or a
      |                                                          |   one-time token + allowed boot digest
      | <---- WELCOME {eG, nG, G} sig_G(hello digest, eG, nG) -- |   (token burnt after FINISHED)
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

Records: 4-byte length | type | epoch(4) | seq(8) | AEAD(ciphertext); the header is the AAD, the nonce is
the sequence number, which must increase by exactly one (replays and reorders are refused). An agent that
sees more than 2N records in one epoch closes the channel: a gateway that stops rotating is caught.

This module is the channel's one home: the record layer and the handshake's messages (their domains,
builders and checks), so the two ends cannot drift apart. Components may not import each other, so it
lives in the core. The ends keep only what is theirs: the agent dials and serves requests
(`trustcap.agent.channel`), the gateway accepts, enrols and asks (`trustcap.gateway.server`). Every
failure here is a `ChannelError`; each end turns it into its own component's error where it hands a
failure to its callers.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from trustcap import canonical
from trustcap.errors import TrustcapError
from trustcap.evidence.errors import EvidenceError
from trustcap.evidence.signing import Signer, address_of, recover_address
from trustcap.forms import hex_bytes

__all__ = [
    "FINISHED_DOMAIN",
    "HELLO_DOMAIN",
    "MAX_FRAME",
    "MAX_RECORDS_PER_EPOCH",
    "WELCOME_DOMAIN",
    "ChannelError",
    "Hello",
    "SecureChannel",
    "Welcome",
    "await_finished",
    "decode_msg",
    "derive_keys",
    "encode_msg",
    "hex_field",
    "make_hello",
    "make_welcome",
    "new_ephemeral",
    "open_session",
    "read_frame",
    "read_hello",
    "read_welcome",
    "send_finished",
    "write_frame",
]


class ChannelError(TrustcapError):
    """The channel failed: framing, a handshake message, authentication, decryption or key rotation."""


HELLO_DOMAIN: Final = "trustcap/channel/hello/v1"
WELCOME_DOMAIN: Final = "trustcap/channel/welcome/v1"
FINISHED_DOMAIN: Final = "trustcap/channel/finished/v1"
MAX_FRAME: Final = 1024 * 1024
#: The agent closes a channel that carries more records than this on one key (both directions counted), so
#: the gateway must rotate at most every MAX_RECORDS_PER_EPOCH // 2 requests (a request is two records).
MAX_RECORDS_PER_EPOCH: Final = 64
_HDR = struct.Struct(">BIQ")
_T_RECORD = 0x17
_INFO = b"trustcap/channel/v1"

# --- framing and messages -------------------------------------------------------------------------------


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


def hex_field(msg: dict[str, Any], field: str, n: int) -> bytes:
    """The `n` bytes a message carries as 0x-hex in `field`; a missing or malformed one names the field."""
    b = hex_bytes(msg.get(field), n)
    if b is None:
        raise ChannelError(f"field {field!r} missing or not {n} bytes of 0x-hex")
    return b


# --- keys -----------------------------------------------------------------------------------------------


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


# --- the record layer -----------------------------------------------------------------------------------


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


# --- the handshake: HELLO, WELCOME, FINISHED ------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """A HELLO as it went over the wire (`raw` salts the session keys) and what the gateway needs of it."""

    raw: bytes
    digest: bytes  # what the agent's boot key signed; WELCOME signs over it in turn
    agent_key: bytes  # 33-byte compressed secp256k1
    eph: bytes
    node_id: str
    boot_digest: str
    token: str | None


@dataclass(frozen=True)
class Welcome:
    raw: bytes
    digest: bytes  # what the trust root signed; FINISHED signs over it, binding the gateway's fresh nonce
    eph: bytes


def _hello_digest(body: dict[str, Any]) -> bytes:
    return canonical.digest({"domain": HELLO_DOMAIN, "hello": body})


def _welcome_digest(hello: Hello, body: dict[str, Any]) -> bytes:
    return canonical.digest({"domain": WELCOME_DOMAIN, "hello": hello.digest, "welcome": body})


def _signed_by(digest: bytes, sig: bytes, public_key: bytes) -> bool:
    return recover_address(digest, sig) == address_of(public_key)


def make_hello(signer: Signer, eph: bytes, *, node_id: str, boot_digest: str, token: str | None) -> Hello:
    """The agent's HELLO, signed by its boot key; `token` only on first contact (enrolment)."""
    agent_key = signer.public_key()
    body: dict[str, Any] = {"type": "hello", "v": 1, "agent_key": "0x" + agent_key.hex(), "eph": "0x" + eph.hex(),
                            "nonce": "0x" + hashlib.sha256(eph).hexdigest(), "node_id": node_id,
                            "boot_digest": boot_digest}
    if token:
        body["token"] = token
    digest = _hello_digest(body)
    raw = encode_msg({**body, "sig": "0x" + signer.sign_digest(digest).hex()})
    return Hello(raw, digest, agent_key, eph, node_id, boot_digest, token or None)


def read_hello(raw: bytes) -> Hello:
    """The gateway's reading of a HELLO: v1, well-formed, and signed by the key it presents. Whether that
    key or its token may enrol for the node is the gateway's question, not the channel's."""
    hello = decode_msg(raw)
    if hello.get("type") != "hello" or hello.get("v") != 1:
        raise ChannelError("first message is not a v1 HELLO")
    agent_key = hex_field(hello, "agent_key", 33)
    eph = hex_field(hello, "eph", 32)
    sig = hex_field(hello, "sig", 65)
    digest = _hello_digest({k: v for k, v in hello.items() if k != "sig"})
    try:
        if not _signed_by(digest, sig, agent_key):
            raise ChannelError("HELLO is not signed by the key it presents")
    except EvidenceError as exc:
        raise ChannelError(f"HELLO signature is invalid: {exc}") from exc
    token = hello.get("token")
    return Hello(raw, digest, agent_key, eph, str(hello.get("node_id", "")), str(hello.get("boot_digest", "")),
                 token if isinstance(token, str) and token else None)


def make_welcome(root: Signer, eph: bytes, hello: Hello) -> Welcome:
    """The gateway's WELCOME, signed by its trust root over the HELLO and a fresh nonce of its own."""
    nonce = hashlib.sha256(eph + hello.digest).digest()
    body = {"type": "welcome", "v": 1, "eph": "0x" + eph.hex(), "nonce": "0x" + nonce.hex(), "gateway": root.address}
    digest = _welcome_digest(hello, body)
    raw = encode_msg({**body, "sig": "0x" + root.sign_digest(digest).hex()})
    return Welcome(raw, digest, eph)


def read_welcome(raw: bytes, hello: Hello, *, gateway_address: str) -> Welcome:
    """The agent's reading of a WELCOME: it must answer our HELLO and be signed by the pinned gateway."""
    welcome = decode_msg(raw)
    if welcome.get("type") != "welcome":
        raise ChannelError("gateway did not answer with WELCOME")
    digest = _welcome_digest(hello, {k: v for k, v in welcome.items() if k != "sig"})
    try:
        who = recover_address(digest, hex_field(welcome, "sig", 65))
    except EvidenceError as exc:
        raise ChannelError(f"gateway's WELCOME signature is invalid: {exc}") from exc
    if who != gateway_address:
        raise ChannelError(f"WELCOME is signed by {who}, not the pinned gateway {gateway_address}")
    return Welcome(raw, digest, hex_field(welcome, "eph", 32))


def open_session(sock: socket.socket, private: X25519PrivateKey, hello: Hello, welcome: Welcome, *, role: str,
                 clock: Callable[[], float] = time.monotonic) -> SecureChannel:
    """Epoch 0 of the channel at `role`'s end: keys from the two ephemerals, salted with both messages as
    sent, so a change to either byte on the wire leaves the two ends with different keys."""
    if role not in ("agent", "gateway"):
        raise ValueError(f"role is 'agent' or 'gateway', not {role!r}")
    peer = welcome.eph if role == "agent" else hello.eph
    a2g, g2a = derive_keys(private, peer, hashlib.sha256(hello.raw + welcome.raw).digest())
    send_key, recv_key = (a2g, g2a) if role == "agent" else (g2a, a2g)
    return SecureChannel(sock, send_key, recv_key, role=role, clock=clock)


def _finished_digest(welcome: Welcome) -> bytes:
    return canonical.digest({"domain": FINISHED_DOMAIN, "welcome": welcome.digest})


def send_finished(chan: SecureChannel, signer: Signer, welcome: Welcome) -> None:
    """The agent's FINISHED, the first record under the new keys: its ephemeral secret (the keys) and its
    boot key over the gateway's fresh nonce prove a live handshake, not a replayed HELLO."""
    chan.send({"type": "finished", "sig": "0x" + signer.sign_digest(_finished_digest(welcome)).hex()})
    chan.records_in_epoch = 0  # the handshake's record is not a request: rotation counts requests


def await_finished(chan: SecureChannel, welcome: Welcome, agent_key: bytes) -> None:
    """The gateway's check of FINISHED; only after it may the session replace the live one."""
    finished = chan.recv()
    if finished.get("type") != "finished":
        raise ChannelError("first record after WELCOME is not FINISHED")
    sig = hex_field(finished, "sig", 65)
    try:
        if not _signed_by(_finished_digest(welcome), sig, agent_key):
            raise ChannelError("FINISHED is not signed by the agent's key")
    except EvidenceError as exc:
        raise ChannelError(f"FINISHED signature is invalid: {exc}") from exc
    chan.records_in_epoch = 0  # the handshake's record is not a request: rotation counts requests
