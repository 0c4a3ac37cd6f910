"""Software trust root: keys sealed in a file under a key-encryption key (KEK).

For development, tests and nodes without a Zymkey. The key store `HOME/trustroot.json` (mode 0600) holds
the secp256k1 signing key and the VRF secret, each sealed with AES-256-GCM under a key derived from the
KEK (HKDF-SHA256, bound to this store's serial so that two stores sharing a KEK cannot unseal each
other's data). The KEK lives elsewhere: a separate file (mode 0600) or the TRUSTCAP_TRUSTROOT_KEK
environment variable (64 hex digits), so a copy of the store alone reveals nothing.

It gives no protection against a thief who holds both the store and the KEK; that is what the Zymkey is
for. Tamper status is therefore "not supported".
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from trustcap.trustroot import _secp256k1
from trustcap.trustroot._files import check_private_file, write_private_file
from trustcap.trustroot.base import VRF_SEAL_CONTEXT, TamperStatus, TrustRoot
from trustcap.trustroot.errors import (
    SealedDataError,
    TrustRootLocked,
    TrustRootOperationError,
    TrustRootUnavailable,
)

log = logging.getLogger("trustcap.trustroot")

FORMAT = "trustcap-trustroot-software/1"
STORE_NAME = "trustroot.json"
KEK_ENV = "TRUSTCAP_TRUSTROOT_KEK"
KEK_LEN = 32
_SEAL_MAGIC = b"TCS1"
_NONCE_LEN = 12
_SIGNING_CONTEXT = b"trustcap/trustroot/signing-key/v1"


def load_kek(kek_file: Path | None = None) -> bytes:
    """The KEK from `kek_file` (64 hex digits or 32 raw bytes, mode 0600) or else from TRUSTCAP_TRUSTROOT_KEK."""
    if kek_file is not None:
        check_private_file(kek_file, "key-encryption key file")
        raw = kek_file.read_bytes()
        source = str(kek_file)
    elif os.environ.get(KEK_ENV):
        raw = os.environ[KEK_ENV].encode()
        source = f"${KEK_ENV}"
    else:
        raise TrustRootLocked(f"no key-encryption key: give a KEK file or set {KEK_ENV} (64 hex digits)")
    if len(raw) == KEK_LEN:
        return raw
    try:
        kek = bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        kek = b""
    if len(kek) != KEK_LEN:
        raise TrustRootLocked(f"key-encryption key from {source} is not {KEK_LEN} bytes or {2 * KEK_LEN} hex digits")
    return kek


def new_kek_file(path: Path) -> bytes:
    """Create a fresh random KEK file (mode 0600, 64 hex digits); refuses to overwrite one."""
    kek = os.urandom(KEK_LEN)
    try:
        write_private_file(path, kek.hex().encode() + b"\n", exclusive=True)
    except FileExistsError as exc:
        raise TrustRootOperationError(str(exc)) from exc
    return kek


def _aead_for(kek: bytes, serial: str) -> AESGCM:
    """The sealing key: HKDF of the KEK bound to the store's serial."""
    info = b"trustcap/trustroot/software/seal/v1|" + serial.encode()
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(kek))


def _seal(aead: AESGCM, data: bytes, context: bytes) -> bytes:
    nonce = os.urandom(_NONCE_LEN)
    return _SEAL_MAGIC + nonce + aead.encrypt(nonce, bytes(data), _SEAL_MAGIC + context)


class SoftwareTrustRoot(TrustRoot):
    """Trust root whose keys are sealed in a file; see the module docstring."""

    backend = "software"
    store_name = STORE_NAME
    store_format = FORMAT

    def __init__(self, path: Path, serial: str, kek: bytes, sealed_signing: bytes, sealed_vrf: bytes) -> None:
        self._path = path
        self._serial = serial
        self._aead = _aead_for(kek, serial)
        try:
            self._secret = self.unseal(sealed_signing, _SIGNING_CONTEXT)
        except SealedDataError as exc:
            raise TrustRootLocked(
                f"cannot open key store {path}: wrong key-encryption key, or the store was altered"
            ) from exc
        super().__init__(sealed_vrf, _secp256k1.public_key_from_secret(self._secret))

    @classmethod
    def create(cls, home: Path, kek: bytes) -> SoftwareTrustRoot:
        """Make a new key store in `home`; refuses to overwrite an existing one."""
        path = cls._new_store(home)
        serial = "sw-" + os.urandom(8).hex()
        aead = _aead_for(kek, serial)
        while True:
            secret = os.urandom(32)
            if 0 < int.from_bytes(secret, "big") < _secp256k1.N:
                break
        sealed_signing = _seal(aead, secret, _SIGNING_CONTEXT)
        sealed_vrf = _seal(aead, cls._new_vrf_secret(os.urandom), VRF_SEAL_CONTEXT)
        cls._write_store(path, {
            "serial": serial,
            "publicKey": _secp256k1.public_key_from_secret(secret).hex(),
            "signingKey": sealed_signing.hex(),
            "vrfSecret": sealed_vrf.hex(),
        })
        log.info("created software trust root %s in %s", serial, path)
        return cls(path, serial, kek, sealed_signing, sealed_vrf)

    @classmethod
    def open(cls, home: Path, kek: bytes) -> SoftwareTrustRoot:
        """Open the key store in `home` with `kek`; its permissions are checked first."""
        path, doc = cls._read_store(home, "trust root key store")
        try:
            serial = str(doc["serial"])
            sealed_signing = bytes.fromhex(doc["signingKey"])
            sealed_vrf = bytes.fromhex(doc["vrfSecret"])
            public = bytes.fromhex(doc["publicKey"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TrustRootUnavailable(f"key store {path}: field {exc} is missing or not hex") from exc
        root = cls(path, serial, kek, sealed_signing, sealed_vrf)
        if root.public_key() != public:
            raise SealedDataError(f"key store {path}: field 'publicKey' does not match the sealed signing key")
        return root

    def _sign(self, digest32: bytes) -> bytes:
        return _secp256k1.sign(self._secret, digest32)

    def seal(self, data: bytes, context: bytes = b"") -> bytes:
        return _seal(self._aead, data, context)

    def unseal(self, sealed: bytes, context: bytes = b"") -> bytes:
        sealed = bytes(sealed)
        if len(sealed) < len(_SEAL_MAGIC) + _NONCE_LEN + 16 or not sealed.startswith(_SEAL_MAGIC):
            raise SealedDataError("sealed data is truncated or not sealed by a software trust root")
        nonce = sealed[len(_SEAL_MAGIC): len(_SEAL_MAGIC) + _NONCE_LEN]
        try:
            return self._aead.decrypt(nonce, sealed[len(_SEAL_MAGIC) + _NONCE_LEN:], _SEAL_MAGIC + context)
        except InvalidTag as exc:
            raise SealedDataError(
                "sealed data does not authenticate: altered, sealed by another root, or for another context"
            ) from exc

    def _random(self, n: int) -> bytes:
        return os.urandom(n)

    def serial(self) -> str:
        return self._serial

    def tamper_status(self) -> TamperStatus:
        return TamperStatus(supported=False, breached=False)

    def close(self) -> None:
        self._secret = b""
