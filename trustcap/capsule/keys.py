"""A person's or node's key pair in files: one secp256k1 key that signs (as owner) and opens envelopes
(as recipient). Same curve as the trust root, the chain and the Capsule CRD's `owner`/`publicKey`.

Files (`trustcap keys new --out DIR`): DIR/key holds the 32-byte secret as 64 hex digits (mode 0600,
refused if group/others can read it), DIR/key.pub the 33-byte compressed public key as 0x-hex.
"""

from __future__ import annotations

import os
from pathlib import Path

import coincurve
from cryptography.hazmat.primitives.asymmetric import ec

from trustcap.capsule.errors import CapsuleError
from trustcap.errors import InvalidKey
from trustcap.trustroot import _secp256k1
from trustcap.trustroot._files import check_private_file, write_private_file

__all__ = ["KeyPair", "load_public_key", "parse_public_key"]

SECRET_NAME = "key"  # noqa: S105 - a file name, not a secret
PUBLIC_NAME = "key.pub"


def parse_public_key(text: str | bytes, source: str = "public key") -> bytes:
    """A 33-byte compressed secp256k1 key from 0x-hex (or raw bytes); checked to be on the curve."""
    if isinstance(text, str):
        s = text.strip()
        s = s[2:] if s.startswith("0x") else s
        try:
            raw = bytes.fromhex(s)
        except ValueError as exc:
            raise InvalidKey(f"{source}: not hex") from exc
    else:
        raw = bytes(text)
    if len(raw) != 33:
        raise InvalidKey(f"{source}: {len(raw)} bytes; a compressed secp256k1 public key has 33")
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), raw)
    except ValueError as exc:
        raise InvalidKey(f"{source}: not a point on secp256k1") from exc
    return raw


def load_public_key(path: Path) -> bytes:
    try:
        return parse_public_key(path.read_text(), str(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise CapsuleError(f"cannot read public key file {path}: {exc}") from exc


class KeyPair:
    """Signer (address, public_key, sign_digest) and envelope opener (ecdh) from one secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) != 32 or not 0 < int.from_bytes(secret, "big") < _secp256k1.N:
            raise InvalidKey("a secp256k1 secret key is 32 bytes in [1, n-1]")
        self._secret = bytes(secret)
        self._public = _secp256k1.public_key_from_secret(secret)

    @classmethod
    def generate(cls) -> KeyPair:
        while True:
            candidate = os.urandom(32)
            if 0 < int.from_bytes(candidate, "big") < _secp256k1.N:
                return cls(candidate)

    @classmethod
    def load(cls, path: Path) -> KeyPair:
        """Load a secret key file; refused if group/others can access it."""
        check_private_file(path, "secret key file")
        text = path.read_text(errors="replace").strip()
        try:
            secret = bytes.fromhex(text[2:] if text.startswith("0x") else text)
        except ValueError as exc:
            raise InvalidKey(f"secret key file {path}: not 64 hex digits") from exc
        try:
            return cls(secret)
        except InvalidKey as exc:
            raise InvalidKey(f"secret key file {path}: {exc}") from exc

    def save(self, directory: Path) -> tuple[Path, Path]:
        """Write DIR/key (0600) and DIR/key.pub; refuses to overwrite an existing secret."""
        secret_path, public_path = directory / SECRET_NAME, directory / PUBLIC_NAME
        try:
            write_private_file(secret_path, self._secret.hex().encode() + b"\n", exclusive=True)
        except FileExistsError as exc:
            raise CapsuleError(f"{secret_path} already exists; refusing to overwrite a secret key") from exc
        public_path.write_text("0x" + self._public.hex() + "\n")
        return secret_path, public_path

    @property
    def address(self) -> str:
        return _secp256k1.address_of(self._public)

    def public_key(self) -> bytes:
        return self._public

    def sign_digest(self, digest32: bytes) -> bytes:
        return _secp256k1.sign(self._secret, digest32)

    def ecdh(self, peer_public_key: bytes) -> bytes:
        """x-coordinate of secret * peer (32 bytes), as OpenSSL's ECDH gives it; libsecp256k1 computes it
        (decision 0100). ValueError if `peer_public_key` is not a point on the curve."""
        peer = coincurve.PublicKey(bytes(peer_public_key))
        return bytes(peer.multiply(self._secret).format(compressed=True)[1:])
