"""Recoverable secp256k1 signatures, the form an Ethereum contract can `ecrecover`.

The Signer (shared interface): `address` (EIP-55), `public_key()` (33-byte SEC1 compressed), and
`sign_digest(digest32) -> 65 bytes r || s || v` with v in {27, 28} and low s. The trust root implements
it (Zymkey or software); evidence code only ever sees this shape.

Verification is strict where a contract would be: exactly 65 bytes, v in {27, 28}, 1 <= r < n,
1 <= s <= n/2 (high s is a malleated copy of a valid signature: refusing it keeps one signature per
message, as OpenZeppelin's ECDSA.recover does).

The curve work is libsecp256k1's (through `coincurve`), called directly rather than through eth_keys'
backend choice: a verifier appraises every quote of every round, and a silent fall-back to pure-Python
arithmetic (what eth_keys does when coincurve is missing) made two recoveries cost ~15 ms
(docs/decisions/0100-native-crypto.md).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import coincurve
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from trustcap.evidence.errors import SignatureError

__all__ = ["SIGNATURE_LEN", "Signer", "address_of", "recover_address", "recovers_address", "recovers_key"]

SIGNATURE_LEN = 65
_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@runtime_checkable
class Signer(Protocol):
    @property
    def address(self) -> str: ...

    def public_key(self) -> bytes: ...

    def sign_digest(self, digest32: bytes) -> bytes: ...


def address_of(public_key: bytes) -> str:
    """The EIP-55 address of a 33-byte compressed secp256k1 public key."""
    return _address(_parse_compressed(public_key))


def _parse_compressed(public_key: bytes) -> coincurve.PublicKey:
    raw = bytes(public_key) if isinstance(public_key, (bytes, bytearray)) else b""
    if len(raw) != 33 or raw[0] not in (2, 3):  # coincurve would also take the 65-byte form: we do not
        raise SignatureError(f"not a compressed secp256k1 public key: {len(raw)} bytes, want 33 starting 02/03")
    try:
        point = coincurve.PublicKey(raw)  # refuses an x with no point on the curve
    except ValueError as exc:
        raise SignatureError(f"not a compressed secp256k1 public key: {exc}") from exc
    return point


def _address(point: coincurve.PublicKey) -> str:
    """EIP-55: the last 20 bytes of keccak256 of the uncompressed X || Y."""
    return str(to_checksum_address(keccak(point.format(compressed=False)[1:])[-20:]))


def recover_address(digest32: bytes, signature: bytes) -> str:
    """The EIP-55 address whose key made `signature` over `digest32`; SignatureError if malformed."""
    return _address(_recover(digest32, signature))


def recovers_address(digest32: bytes, signature: bytes, address: str) -> bool:
    """Whether `signature` over `digest32` was made by the key of `address` (0x + 40 hex; False for
    anything else), with the same checks as `recover_address` (SignatureError if the signature is
    malformed). It compares the 20 address bytes, sparing the EIP-55 checksum (a second keccak and a
    character loop) that only a display needs."""
    text = address if isinstance(address, str) else ""
    if len(text) != 42 or text[:2] not in ("0x", "0X"):
        return False
    try:
        want = bytes.fromhex(text[2:])
    except ValueError:
        return False
    return keccak(_recover(digest32, signature).format(compressed=False)[1:])[-20:] == want


def recovers_key(digest32: bytes, signature: bytes, public_key: bytes) -> bool:
    """Whether `signature` over `digest32` was made by the compressed key `public_key` (same checks as
    `recover_address`; SignatureError if the signature or the key is malformed). Comparing keys instead
    of EIP-55 addresses spares two keccaks and two checksums, a sixth of an appraisal."""
    return bytes(_recover(digest32, signature).format(compressed=True)) == bytes(
        _parse_compressed(public_key).format(compressed=True))


def _recover(digest32: bytes, signature: bytes) -> coincurve.PublicKey:
    if not isinstance(digest32, (bytes, bytearray)) or len(digest32) != 32:
        raise SignatureError("the signed digest must be 32 bytes")
    if not isinstance(signature, (bytes, bytearray)) or len(signature) != SIGNATURE_LEN:
        raise SignatureError(f"a signature must be {SIGNATURE_LEN} bytes (r || s || v)")
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:64], "big")
    v = signature[64]
    if v not in (27, 28):
        raise SignatureError(f"signature v must be 27 or 28, got {v}")
    if not 1 <= r < _N or not 1 <= s <= _N // 2:
        raise SignatureError("signature r or s is out of range (high s is refused as malleable)")
    try:
        public = coincurve.PublicKey.from_signature_and_message(
            bytes(signature[:64]) + bytes([v - 27]), bytes(digest32), hasher=None
        )
    except ValueError as exc:
        raise SignatureError(f"no public key can be recovered from the signature: {exc}") from exc
    return public
