"""secp256k1 helpers shared by the trust root backends: Ethereum-style recoverable signatures.

Why here and not in each backend: whatever holds the key (a file or a Zymkey slot), the signature a
contract's `ecrecover` accepts has one shape: r || s || v, s in the lower half of the order (EIP-2), v in
{27, 28}. A module that returns plain (r, s) is turned into that shape by `to_recoverable`.

Signing and recovery are libsecp256k1's (through `coincurve`): the owner's signature and its check sit
on every seal and open, and eth_keys' pure-Python fall-back cost milliseconds each
(docs/decisions/0100-native-crypto.md). libsecp256k1 signs deterministically (RFC 6979) and always low s,
which is exactly the shape above.
"""

from __future__ import annotations

import coincurve
from eth_keys.datatypes import PublicKey
from eth_keys.exceptions import BadSignature
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from eth_utils.exceptions import ValidationError

from trustcap.errors import InvalidKey

N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
HALF_N = N // 2
P = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEFFFFFC2F
SIGNATURE_LEN = 65


def check_digest(digest32: bytes) -> None:
    if not isinstance(digest32, (bytes, bytearray)) or len(digest32) != 32:
        raise ValueError(f"digest must be 32 bytes, got {len(digest32) if isinstance(digest32, bytes) else digest32!r}")


def public_key_from_secret(secret: bytes) -> bytes:
    """The 33-byte compressed public key of a 32-byte secret scalar."""
    try:
        return bytes(coincurve.PrivateKey(_secret_bytes(secret)).public_key.format(compressed=True))
    except ValueError as exc:
        raise InvalidKey(f"not a secp256k1 secret key: {exc}") from exc


def _secret_bytes(secret: bytes) -> bytes:
    """coincurve would take a shorter secret as a smaller scalar; a key file that lost bytes is an error."""
    raw = bytes(secret)
    if len(raw) != 32:
        raise ValueError(f"a secp256k1 secret key is 32 bytes, got {len(raw)}")
    return raw


def compress(public_key: bytes) -> bytes:
    """SEC1 compressed form of a 33-, 64- (X||Y, as a Zymkey exports) or 65-byte public key."""
    raw = bytes(public_key)
    try:
        if len(raw) == 33:
            return bytes(PublicKey.from_compressed_bytes(raw).to_compressed_bytes())
        if len(raw) == 65 and raw[0] == 4:
            raw = raw[1:]
        if len(raw) == 64:
            # eth_keys does not check that X||Y is on the curve (a P-256 key would pass): we do.
            x, y = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
            if not (x < P and y < P and (y * y - x * x * x - 7) % P == 0):
                raise InvalidKey("not a secp256k1 public key: the point is not on the curve")
            return bytes(PublicKey(raw).to_compressed_bytes())
    except (ValidationError, ValueError, BadSignature) as exc:
        raise InvalidKey(f"not a secp256k1 public key: {exc}") from exc
    raise InvalidKey(f"not a secp256k1 public key: {len(raw)} bytes (want 33, 64 or 65)")


def address_of(public_key: bytes) -> str:
    """EIP-55 address: the last 20 bytes of keccak256 of the uncompressed X||Y."""
    pk = PublicKey.from_compressed_bytes(compress(public_key))
    return str(to_checksum_address(bytes(keccak(pk.to_bytes()))[-20:]))


def sign(secret: bytes, digest32: bytes) -> bytes:
    """Deterministic (RFC 6979) low-s recoverable signature, v in {27, 28}."""
    check_digest(digest32)
    sig = coincurve.PrivateKey(_secret_bytes(secret)).sign_recoverable(bytes(digest32), hasher=None)
    if sig[64] > 1:  # r overflowed the order (probability ~2^-127): no Ethereum v can express it
        raise ValueError("signature has recovery id above 1; sign another digest")
    return sig[:64] + bytes([27 + sig[64]])


def recover(digest32: bytes, signature: bytes) -> bytes | None:
    """The compressed public key that made `signature` over `digest32`, or None if it is not a valid
    low-s recoverable signature (high s is refused: it is the malleable twin of a valid one)."""
    check_digest(digest32)
    if len(signature) != SIGNATURE_LEN or signature[64] not in (27, 28):
        return None
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:64], "big")
    if not (0 < r < N and 0 < s <= HALF_N):
        return None
    try:
        pk = coincurve.PublicKey.from_signature_and_message(
            bytes(signature[:64]) + bytes([signature[64] - 27]), bytes(digest32), hasher=None
        )
    except ValueError:
        return None
    return bytes(pk.format(compressed=True))


def to_recoverable(digest32: bytes, r: int, s: int, public_key: bytes) -> bytes:
    """Turn a plain (r, s) made by `public_key` into r||s||v with low s: the recovery id is found by
    trying both parities, so a module whose recovery id is missing or wrong still gives a valid v."""
    if s > HALF_N:
        s = N - s
    want = compress(public_key)
    for v in (27, 28):
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([v])
        if recover(digest32, sig) == want:
            return sig
    raise ValueError("signature does not match the public key under either recovery id")
