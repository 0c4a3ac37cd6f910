"""The sealed data envelope: data sealed by its owner to several recipients, bound to one capsule.

Why this construction (docs/decisions/0021-sealed-envelope.md): every key in trustcap is secp256k1 (trust
root, chain, the Capsule CRD's owner and recipient keys), so the envelope is ECIES over secp256k1 built
from `cryptography` as HPKE base mode builds it: per recipient an ephemeral key, ECDH, HKDF-SHA256
(bound to the ephemeral and recipient keys and to the capsule) wrapping one random content key; the data
under AES-256-GCM in chunks (STREAM: nonce = prefix || counter || last-flag), so 100 MiB streams from
file to file in constant memory, and a dropped, reordered or truncated chunk fails. The owner signs the
whole envelope (recoverable secp256k1, the same shape a contract can ecrecover).

Layout (all lengths big-endian):

    "TCENV\\0" | version u8 = 1 | header length u32 | header (RFC 8785 JSON) |
    chunk_0 .. chunk_n (each plaintext chunk + 16-byte tag; at least one, the last may be short) |
    owner signature (65 bytes) over sha256("trustcap/envelope/v1/signature" || everything before it)

    header = {capsuleId, manifestDigest, suite, chunkSize, plaintextLength, noncePrefix, owner,
              recipients: [{enc, wrapped}]}

Associated data: every chunk authenticates sha256(preamble || header), which holds the capsule id and
the manifest digest, and each recipient's wrapping key is derived with them as salt.

    owner (seal)                                              recipient (open)
      | cek = random(32); for each recipient R:                   |
      |   e = ephemeral; kek = HKDF(ECDH(e, R), capsule, e, R)   |
      |   wrapped = AES-GCM(kek, cek)                             |
      | chunks = AES-GCM(cek, nonce_i, chunk_i, aad=H(header))    |
      | sig = owner.sign(sha256(all bytes))                       |
      |------------------ envelope ------------------------------>| parse header strictly; check length
      |                                                           | verify sig (Tampered); owner, capsule,
      |                                                           | manifest as expected (Replayed);
      |                                                           | unwrap cek with own key (NotARecipient);
      |                                                           | decrypt chunks in order (Tampered)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

import coincurve
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from trustcap import canonical
from trustcap.capsule.errors import (
    EnvelopeError,
    EnvelopeReplayed,
    EnvelopeTampered,
    EnvelopeTruncated,
    NotARecipient,
)
from trustcap.trustroot import _secp256k1

__all__ = ["DEFAULT_CHUNK", "SUITE", "Header", "open_bytes", "open_stream", "open_with_key", "read_header",
           "seal_bytes", "seal_stream", "unwrap_cek"]

MAGIC = b"TCENV\x00"
VERSION = 1
SUITE = "secp256k1-hkdf-sha256-aes256gcm-stream64k"
DEFAULT_CHUNK = 64 * 1024
TAG = 16
SIG_LEN = 65
MAX_HEADER = 16 * 1024
MAX_RECIPIENTS = 16
MAX_PLAINTEXT = 1 << 40
_PREAMBLE = len(MAGIC) + 1 + 4
_SIG_DOMAIN = b"trustcap/envelope/v1/signature"
_WRAP_INFO = b"trustcap/envelope/v1/wrap"
_CEK_AAD = b"trustcap/envelope/v1/cek"
_ZERO_NONCE = bytes(12)
_SPOOL_IN_MEMORY = 8 << 20


class Signer(Protocol):
    def public_key(self) -> bytes: ...
    def sign_digest(self, digest32: bytes) -> bytes: ...


class Opener(Protocol):
    def public_key(self) -> bytes: ...
    def ecdh(self, peer_public_key: bytes) -> bytes: ...


@dataclass(frozen=True)
class Header:
    capsule_id: bytes
    manifest_digest: bytes
    chunk_size: int
    plaintext_length: int
    nonce_prefix: bytes
    owner: bytes
    recipients: tuple[tuple[bytes, bytes], ...]  # (enc, wrapped)

    def to_json(self) -> dict[str, Any]:
        return {
            "capsuleId": self.capsule_id, "manifestDigest": self.manifest_digest, "suite": SUITE,
            "chunkSize": self.chunk_size, "plaintextLength": self.plaintext_length,
            "noncePrefix": self.nonce_prefix, "owner": self.owner,
            "recipients": [{"enc": e, "wrapped": w} for e, w in self.recipients],
        }

    @property
    def chunk_count(self) -> int:
        return max(1, -(-self.plaintext_length // self.chunk_size))

    @property
    def body_length(self) -> int:
        return self.plaintext_length + self.chunk_count * TAG


def _hex(doc: dict[str, Any], key: str, length: int) -> bytes:
    value = doc.get(key)
    if not isinstance(value, str) or not value.startswith("0x") or len(value) != 2 + 2 * length:
        raise EnvelopeError(f"envelope header field {key!r} must be 0x-hex of {length} bytes")
    try:
        return bytes.fromhex(value[2:])
    except ValueError as exc:
        raise EnvelopeError(f"envelope header field {key!r} is not hex") from exc


def _int(doc: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = doc.get(key)
    if type(value) is not int or not lo <= value <= hi:
        raise EnvelopeError(f"envelope header field {key!r} must be an integer in [{lo}, {hi}]")
    return value


def _parse_header(raw: bytes) -> Header:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise EnvelopeError("envelope header is not JSON") from exc
    keys = {"capsuleId", "manifestDigest", "suite", "chunkSize", "plaintextLength", "noncePrefix", "owner",
            "recipients"}
    if not isinstance(doc, dict) or set(doc) != keys:
        raise EnvelopeError(f"envelope header must have exactly the fields {sorted(keys)}")
    if doc["suite"] != SUITE:
        raise EnvelopeError(f"envelope suite {doc['suite']!r} is not {SUITE!r}")
    recipients = doc["recipients"]
    if not isinstance(recipients, list) or not 1 <= len(recipients) <= MAX_RECIPIENTS:
        raise EnvelopeError(f"envelope header field 'recipients' must list 1 to {MAX_RECIPIENTS} slots")
    slots = []
    for slot in recipients:
        if not isinstance(slot, dict) or set(slot) != {"enc", "wrapped"}:
            raise EnvelopeError("envelope recipient slot must have exactly 'enc' and 'wrapped'")
        slots.append((_hex(slot, "enc", 33), _hex(slot, "wrapped", 32 + TAG)))
    header = Header(
        capsule_id=_hex(doc, "capsuleId", 32), manifest_digest=_hex(doc, "manifestDigest", 32),
        chunk_size=_int(doc, "chunkSize", 1024, 16 << 20),
        plaintext_length=_int(doc, "plaintextLength", 0, MAX_PLAINTEXT),
        nonce_prefix=_hex(doc, "noncePrefix", 7), owner=_hex(doc, "owner", 33), recipients=tuple(slots),
    )
    if canonical.encode(header.to_json()) != raw:
        raise EnvelopeError("envelope header is not in canonical (RFC 8785) form")
    return header


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def _kek(shared: bytes, enc: bytes, recipient: bytes, capsule_id: bytes, manifest_digest: bytes) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=capsule_id + manifest_digest,
                info=_WRAP_INFO + enc + recipient)
    return AESGCM(hkdf.derive(shared))


def _read_exact(src: BinaryIO, n: int) -> bytes:
    data = src.read(n)
    if len(data) != n:
        raise EnvelopeTruncated(f"envelope ends early: wanted {n} more bytes, got {len(data)}")
    return data


def seal_stream(src: BinaryIO, dst: BinaryIO, *, length: int, recipients: Sequence[bytes], owner: Signer,
                capsule_id: bytes, manifest_digest: bytes, chunk_size: int = DEFAULT_CHUNK) -> Header:
    """Seal exactly `length` bytes read from `src` to `recipients` (33-byte secp256k1 keys), writing the
    envelope to `dst` chunk by chunk; memory stays at one chunk whatever the size."""
    if len(capsule_id) != 32 or len(manifest_digest) != 32:
        raise EnvelopeError("capsule id and manifest digest must be 32 bytes each")
    if not 1 <= len(recipients) <= MAX_RECIPIENTS:
        raise EnvelopeError(f"an envelope has 1 to {MAX_RECIPIENTS} recipients, got {len(recipients)}")
    if not 0 <= length <= MAX_PLAINTEXT:
        raise EnvelopeError(f"plaintext length {length} is out of range")
    cek = AESGCM.generate_key(bit_length=256)
    slots = []
    for recipient in recipients:
        try:
            peer = coincurve.PublicKey(bytes(recipient))  # parses and checks the point is on the curve
        except ValueError as exc:
            raise EnvelopeError(f"recipient key 0x{bytes(recipient).hex()} is not a secp256k1 public key") from exc
        # libsecp256k1 rather than OpenSSL's generic curve code: the key generation and ECDH were most of
        # a small seal's cost (decision 0100). The shared secret is the x-coordinate of eph * R, as
        # OpenSSL's ECDH gives it, so envelopes are byte-compatible either way.
        eph = coincurve.PrivateKey()
        enc = eph.public_key.format(compressed=True)
        shared = peer.multiply(eph.secret).format(compressed=True)[1:]
        kek = _kek(shared, enc, bytes(recipient), capsule_id, manifest_digest)
        slots.append((enc, kek.encrypt(_ZERO_NONCE, cek, _CEK_AAD)))
    header = Header(capsule_id, manifest_digest, chunk_size, length, os.urandom(7), owner.public_key(),
                    tuple(slots))
    raw = canonical.encode(header.to_json())
    if len(raw) > MAX_HEADER:
        raise EnvelopeError("envelope header too large")
    preamble = MAGIC + bytes([VERSION]) + len(raw).to_bytes(4, "big")
    sig_hash = hashlib.sha256(_SIG_DOMAIN)
    aad = hashlib.sha256(preamble + raw).digest()
    aead = AESGCM(cek)

    def emit(part: bytes) -> None:
        sig_hash.update(part)
        dst.write(part)

    emit(preamble + raw)
    remaining = length
    for i in range(header.chunk_count):
        n = min(chunk_size, remaining)
        chunk = src.read(n)
        if len(chunk) != n:
            raise EnvelopeError(f"input ended after {length - remaining + len(chunk)} of {length} bytes")
        remaining -= n
        emit(aead.encrypt(_nonce(header.nonce_prefix, i, i == header.chunk_count - 1), chunk, aad))
    dst.write(owner.sign_digest(sig_hash.digest()))
    return header


def read_header(src: BinaryIO) -> tuple[Header, bytes]:
    """Parse the preamble and header (no cryptography); returns the header and its raw preamble+bytes."""
    preamble = src.read(_PREAMBLE)
    if len(preamble) < _PREAMBLE:
        if MAGIC.startswith(preamble[: len(MAGIC)]):
            raise EnvelopeTruncated(f"envelope is {len(preamble)} bytes, shorter than its preamble")
        raise EnvelopeError("not a trustcap envelope (bad magic)")
    if preamble[: len(MAGIC)] != MAGIC:
        raise EnvelopeError("not a trustcap envelope (bad magic)")
    if preamble[len(MAGIC)] != VERSION:
        raise EnvelopeError(f"envelope version {preamble[len(MAGIC)]} is not supported (only {VERSION})")
    hlen = int.from_bytes(preamble[len(MAGIC) + 1:], "big")
    if not 2 <= hlen <= MAX_HEADER:
        raise EnvelopeError(f"envelope header length {hlen} is out of range")
    raw = _read_exact(src, hlen)
    return _parse_header(raw), preamble + raw


def _check_binding(header: Header, *, owner: bytes, capsule_id: bytes, manifest_digest: bytes) -> None:
    """An authentic envelope for another capsule, manifest or owner is a replay. All three are required:
    an opener that does not say whose data it expects would accept a co-recipient's re-signed forgery."""
    for what, value in (("owner", owner), ("capsule_id", capsule_id), ("manifest_digest", manifest_digest)):
        if not isinstance(value, bytes) or len(value) != (33 if what == "owner" else 32):
            raise EnvelopeError(f"{what} must be given to open an envelope ({33 if what == 'owner' else 32} bytes)")
    if header.capsule_id != capsule_id:
        raise EnvelopeReplayed(f"envelope is bound to capsule 0x{header.capsule_id.hex()}, not 0x{capsule_id.hex()}")
    if header.manifest_digest != manifest_digest:
        raise EnvelopeReplayed(f"envelope is bound to manifest 0x{header.manifest_digest.hex()}, "
                               f"not 0x{manifest_digest.hex()}")
    if header.owner != owner:
        raise EnvelopeReplayed(f"envelope is signed by 0x{header.owner.hex()}, not the expected owner 0x{owner.hex()}")


def _authenticate(src: BinaryIO, header: Header, head: bytes, cek: bytes, keep: BinaryIO | None) -> None:
    """The one pass over the source: every body byte is read once, hashed for the owner's signature,
    authenticated under the content key, and (when `keep` is given) copied into the caller's private
    spool; the plaintext is discarded. Only the bytes that passed both checks are ever decrypted for
    release, so a source that changes between reads (a co-recipient swapping chunks it re-encrypted
    with the content key it knows) cannot get forged data past the owner's signature."""
    sig_hash = hashlib.sha256(_SIG_DOMAIN)
    sig_hash.update(head)
    aead = AESGCM(cek)
    aad = hashlib.sha256(head).digest()
    for i, nonce, block in _chunks(src, header):
        sig_hash.update(block)
        try:
            aead.decrypt(nonce, block, aad)
        except InvalidTag as exc:
            raise EnvelopeTampered(f"envelope chunk {i} does not authenticate") from exc
        if keep is not None:
            keep.write(block)
    signature = _read_exact(src, SIG_LEN)
    if src.read(1):
        raise EnvelopeTruncated("envelope has bytes after its signature")
    if _secp256k1.recover(sig_hash.digest(), signature) != header.owner:
        raise EnvelopeTampered("envelope signature does not verify under its owner key: the envelope was altered")


def _release(body: BinaryIO, dst: BinaryIO, header: Header, head: bytes, cek: bytes) -> None:
    """Decrypt the already authenticated body into `dst`."""
    aead = AESGCM(cek)
    aad = hashlib.sha256(head).digest()
    for _, nonce, block in _chunks(body, header):
        dst.write(aead.decrypt(nonce, block, aad))


def _chunks(src: BinaryIO, header: Header) -> Iterator[tuple[int, bytes, bytes]]:
    """(index, nonce, ciphertext+tag) of each body chunk as the header lays them out, read exactly."""
    remaining = header.plaintext_length
    for i in range(header.chunk_count):
        n = min(header.chunk_size, remaining)
        yield i, _nonce(header.nonce_prefix, i, i == header.chunk_count - 1), _read_exact(src, n + TAG)
        remaining -= n


def _open_with(src: BinaryIO, dst: BinaryIO, cek_of: Any, *, owner: bytes, capsule_id: bytes,
               manifest_digest: bytes, immutable: bytes | None = None) -> Header:
    start = src.tell()
    header, head = read_header(src)
    _check_binding(header, owner=owner, capsule_id=capsule_id, manifest_digest=manifest_digest)
    expected = len(head) + header.body_length + SIG_LEN
    if immutable is not None or src.seekable():  # an early, clear answer; the one pass checks again
        here = src.tell()
        total = (len(immutable) if immutable is not None else src.seek(0, io.SEEK_END)) - start
        src.seek(here)
        if total != expected:
            raise EnvelopeTruncated(f"envelope is {total} bytes, its header says {expected}")
    cek = cek_of(header)
    if immutable is not None:  # bytes cannot change under us: authenticate, then decrypt the same bytes
        _authenticate(src, header, head, cek, None)
        _release(io.BytesIO(immutable[start + len(head):start + len(head) + header.body_length]), dst, header,
                 head, cek)
        return header
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY) as spool:
        _authenticate(src, header, head, cek, spool)  # type: ignore[arg-type]
        spool.seek(0)
        _release(spool, dst, header, head, cek)  # type: ignore[arg-type]
    return header


def open_stream(src: BinaryIO, dst: BinaryIO, *, key: Opener, owner: bytes, capsule_id: bytes,
                manifest_digest: bytes) -> Header:
    """Check and decrypt an envelope from `src` into `dst`, reading `src` once.

    Nothing reaches `dst` until the binding (owner, capsule, manifest: all three required), the
    recipient slot, every chunk's tag and the owner's signature over exactly those bytes have been
    checked; the ciphertext is kept in a private spool in between (in memory up to 8 MiB, then an
    unnamed temporary file), never the plaintext."""
    return _open_with(src, dst, lambda h: _unwrap(h, key), owner=owner, capsule_id=capsule_id,
                      manifest_digest=manifest_digest)


def unwrap_cek(head: bytes, key: Opener) -> tuple[Header, bytes]:
    """The content key of an envelope, from its header bytes (`read_header`'s second value) alone.

    For the owner's key-release broker (trustcap.release): the owner seals to itself, and the broker
    unwraps with the owner's key and re-wraps to an attested executor. The wrapping key is derived with
    the header's capsule id and manifest digest, so a header edited to name another capsule yields no
    key; the caller still checks that the binding is the one it releases for."""
    if not isinstance(head, bytes):
        raise EnvelopeError("envelope header must be bytes")
    src = io.BytesIO(head)
    header, raw = read_header(src)
    if raw != head:
        raise EnvelopeError(f"envelope header is {len(raw)} bytes, {len(head) - len(raw)} more were given")
    return header, _unwrap(header, key)


def _unwrap(header: Header, key: Opener) -> bytes:
    me = key.public_key()
    for enc, wrapped in header.recipients:
        try:
            shared = key.ecdh(enc)
        except ValueError as exc:
            raise EnvelopeTampered("envelope recipient slot holds an invalid ephemeral key") from exc
        kek = _kek(shared, enc, me, header.capsule_id, header.manifest_digest)
        try:
            return kek.decrypt(_ZERO_NONCE, wrapped, _CEK_AAD)
        except InvalidTag:
            continue
    raise NotARecipient(f"key 0x{me.hex()} is not a recipient of this envelope")


def seal_bytes(data: bytes, *, recipients: Sequence[bytes], owner: Signer, capsule_id: bytes,
               manifest_digest: bytes, chunk_size: int = DEFAULT_CHUNK) -> bytes:
    out = io.BytesIO()
    seal_stream(io.BytesIO(data), out, length=len(data), recipients=recipients, owner=owner,
                capsule_id=capsule_id, manifest_digest=manifest_digest, chunk_size=chunk_size)
    return out.getvalue()


def open_bytes(blob: bytes, *, key: Opener, owner: bytes, capsule_id: bytes, manifest_digest: bytes) -> bytes:
    data = bytes(blob)  # a private immutable copy: what is authenticated is what is decrypted
    out = io.BytesIO()
    _open_with(io.BytesIO(data), out, lambda h: _unwrap(h, key), owner=owner, capsule_id=capsule_id,
               manifest_digest=manifest_digest, immutable=data)
    return out.getvalue()


def open_with_key(blob: bytes, cek: bytes, *, owner: bytes, capsule_id: bytes, manifest_digest: bytes) -> bytes:
    """Open an envelope with its content key itself (released by the owner's broker, trustcap.release),
    with the same checks as `open_bytes`: binding, every tag, the owner's signature, one pass."""
    if not isinstance(cek, bytes) or len(cek) != 32:
        raise EnvelopeError("content key must be 32 bytes")
    data = bytes(blob)
    out = io.BytesIO()
    _open_with(io.BytesIO(data), out, lambda h: cek, owner=owner, capsule_id=capsule_id,
               manifest_digest=manifest_digest, immutable=data)
    return out.getvalue()
