"""The content key, wrapped to one attested executor key for one input of one task.

ECIES over secp256k1, as the envelope wraps its slots: an ephemeral key, ECDH with the executor key,
HKDF-SHA256 whose salt is the capsule id and task id and whose info names the input and both public keys,
then AES-256-GCM over the 32-byte content key with the same binding as associated data. A key wrapped for
one capsule, task, input or executor key opens for no other (the derived key differs, so the tag fails).

    wrapped = 0x01 | enc (33) | AES-GCM(kek, cek, aad) (48)          82 bytes
"""

from __future__ import annotations

import hashlib
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from trustcap import canonical
from trustcap.release.errors import WrappedKeyError

__all__ = ["WRAPPED_LEN", "Opener", "unwrap_key", "wrap_key"]

_VERSION = b"\x01"
_DOMAIN = "trustcap/release/v1/wrap"
_TAG = 16
WRAPPED_LEN = 1 + 33 + 32 + _TAG
_ZERO_NONCE = bytes(12)  # every kek is used once: it is derived from a fresh ephemeral key


class Opener(Protocol):
    def public_key(self) -> bytes: ...
    def ecdh(self, peer_public_key: bytes) -> bytes: ...


def _binding(enc: bytes, executor_key: bytes, capsule_id: bytes, task_id: bytes, input_name: str) -> bytes:
    for what, value in (("capsule id", capsule_id), ("task id", task_id)):
        if not isinstance(value, bytes) or len(value) != 32:
            raise WrappedKeyError(f"{what} must be 32 bytes")
    if not isinstance(input_name, str) or not input_name:
        raise WrappedKeyError("input name must be a non-empty string")
    return canonical.encode({"domain": _DOMAIN, "capsule": capsule_id, "task": task_id, "input": input_name,
                             "executorKey": executor_key, "enc": enc})


def _kek(shared: bytes, binding: bytes, capsule_id: bytes, task_id: bytes) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=capsule_id + task_id,
                info=hashlib.sha256(binding).digest())
    return AESGCM(hkdf.derive(shared))


def wrap_key(cek: bytes, executor_key: bytes, *, capsule_id: bytes, task_id: bytes, input_name: str) -> bytes:
    """Wrap `cek` (32 bytes) to `executor_key` (33-byte compressed secp256k1) for one input of one task."""
    if not isinstance(cek, bytes) or len(cek) != 32:
        raise WrappedKeyError("content key must be 32 bytes")
    try:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), bytes(executor_key))
    except (ValueError, TypeError) as exc:
        raise WrappedKeyError("executor key is not a secp256k1 public key") from exc
    if len(executor_key) != 33:
        raise WrappedKeyError("executor key must be 33 bytes (compressed)")
    eph = ec.generate_private_key(ec.SECP256K1())
    enc = eph.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    binding = _binding(enc, bytes(executor_key), capsule_id, task_id, input_name)
    kek = _kek(eph.exchange(ec.ECDH(), peer), binding, capsule_id, task_id)
    return _VERSION + enc + kek.encrypt(_ZERO_NONCE, cek, binding)


def unwrap_key(wrapped: bytes, opener: Opener, *, capsule_id: bytes, task_id: bytes, input_name: str) -> bytes:
    """The content key, if `wrapped` was made for `opener`'s key and this capsule, task and input."""
    if not isinstance(wrapped, bytes) or len(wrapped) != WRAPPED_LEN or wrapped[:1] != _VERSION:
        raise WrappedKeyError(f"a wrapped key is {WRAPPED_LEN} bytes starting with version 1")
    enc, sealed = wrapped[1:34], wrapped[34:]
    binding = _binding(enc, opener.public_key(), capsule_id, task_id, input_name)
    try:
        shared = opener.ecdh(enc)
    except ValueError as exc:
        raise WrappedKeyError("wrapped key holds an invalid ephemeral key") from exc
    try:
        return _kek(shared, binding, capsule_id, task_id).decrypt(_ZERO_NONCE, sealed, binding)
    except InvalidTag as exc:
        raise WrappedKeyError("wrapped key does not open for this capsule, task, input and executor key") from exc
