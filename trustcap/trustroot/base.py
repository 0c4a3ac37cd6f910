"""The one trust-root interface every backend implements.

Why one interface: the gateway signs quotes and verdicts, proves VRF draws and seals its secrets the same
way whether its keys live in a Zymkey or in a file; only provisioning differs. What is common to all
backends (address, verification, the VRF secret kept sealed, the key store file `HOME/<store_name>` with
its format tag, mode 0600 and refusal to overwrite) is written here once.

The VRF secret (an ECVRF-P256 scalar, `trustcap.vrf`) never sits in the clear on disk: the backend
stores it sealed by its own `seal`, and `vrf_prove` unseals it into memory only for the proof.
"""

from __future__ import annotations

import abc
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from trustcap import vrf
from trustcap.errors import TrustcapError
from trustcap.trustroot import _secp256k1
from trustcap.trustroot._files import check_private_file, write_private_file
from trustcap.trustroot.errors import (
    SealedDataError,
    TamperDetected,
    TrustRootOperationError,
    TrustRootUnavailable,
)

log = logging.getLogger("trustcap.trustroot")

VRF_SEAL_CONTEXT = b"trustcap/trustroot/vrf-secret/v1"


@dataclass(frozen=True)
class TamperStatus:
    """What the module's perimeter detection says. `supported` is False for a software root."""

    supported: bool
    breached: bool
    first_breach: tuple[int, ...] = ()


class TrustRoot(abc.ABC):
    """Sign (secp256k1, recoverable), verify, seal/unseal, random, serial, tamper status, VRF.

    Satisfies the Signer interface: `address`, `public_key()`, `sign_digest(digest32)`.
    """

    backend: str = "abstract"
    store_name: ClassVar[str]  # the key store's file name in HOME
    store_format: ClassVar[str]  # its "format" tag, so one backend never opens another's store

    def __init__(self, sealed_vrf_secret: bytes, public_key: bytes) -> None:
        self._sealed_vrf = sealed_vrf_secret
        self._public = public_key
        self._vrf_pk: bytes | None = None

    # --- what each backend provides ---
    @abc.abstractmethod
    def _sign(self, digest32: bytes) -> bytes:
        """65-byte r||s||v, low s, v in {27, 28}."""

    @abc.abstractmethod
    def seal(self, data: bytes, context: bytes = b"") -> bytes:
        """Encrypt and authenticate `data` so only this root can unseal it, bound to `context`."""

    @abc.abstractmethod
    def unseal(self, sealed: bytes, context: bytes = b"") -> bytes:
        """Inverse of `seal`; raises SealedDataError if the bytes or the context differ."""

    @abc.abstractmethod
    def _random(self, n: int) -> bytes:
        """n > 0 bytes from the root's random source."""

    @abc.abstractmethod
    def serial(self) -> str:
        """A stable identifier of this root (module serial number, or the key store's id)."""

    @abc.abstractmethod
    def tamper_status(self) -> TamperStatus:
        """The perimeter-detection state."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the module and forget in-memory secrets; a closed root must not be used again."""

    # --- common to all backends ---
    def public_key(self) -> bytes:
        """33-byte SEC1 compressed secp256k1 public key of the signing key (read when the root opens)."""
        return self._public

    def random(self, n: int) -> bytes:
        """n bytes from the root's random source."""
        if n < 0:
            raise TrustRootOperationError(f"random: n must be >= 0, got {n}")
        return self._random(n) if n else b""

    @property
    def address(self) -> str:
        """EIP-55 Ethereum address of the signing key: the node's on-chain identity."""
        return _secp256k1.address_of(self.public_key())

    def sign_digest(self, digest32: bytes) -> bytes:
        """Sign a 32-byte digest. Refused when the perimeter reports a breach: a root that may have been
        opened must not vouch for anything."""
        try:
            _secp256k1.check_digest(digest32)
        except ValueError as exc:
            raise TrustRootOperationError(str(exc)) from exc
        status = self.tamper_status()
        if status.breached:
            raise TamperDetected(
                f"trust root {self.serial()} reports a perimeter breach (first events {status.first_breach}); "
                "refusing to sign"
            )
        return self._sign(bytes(digest32))

    def verify(self, digest32: bytes, signature: bytes, public_key: bytes | None = None) -> bool:
        """True if `signature` is a low-s recoverable signature of `digest32` by `public_key` (default:
        this root's own key). Verification needs no secret, so it is done in software for every backend,
        exactly as a contract's ecrecover would."""
        try:
            _secp256k1.check_digest(digest32)
        except ValueError as exc:
            raise TrustRootOperationError(str(exc)) from exc
        want = _secp256k1.compress(public_key) if public_key is not None else self.public_key()
        return _secp256k1.recover(bytes(digest32), bytes(signature)) == want

    def vrf_public_key(self) -> bytes:
        """33-byte ECVRF-P256 public key (what a Gateway resource publishes)."""
        if self._vrf_pk is None:
            self._vrf_pk = vrf.public_key(self._vrf_secret())
        return self._vrf_pk

    def vrf_prove(self, alpha: bytes) -> bytes:
        """ECVRF proof pi for `alpha`; the secret is unsealed into memory only for this call."""
        return vrf.prove(self._vrf_secret(), alpha)

    def _vrf_secret(self) -> bytes:
        secret = self.unseal(self._sealed_vrf, VRF_SEAL_CONTEXT)
        if len(secret) != vrf.SK_LEN:
            raise SealedDataError("the sealed VRF secret has the wrong length")
        return secret

    @classmethod
    def _new_vrf_secret(cls, random: Callable[[int], bytes]) -> bytes:
        """A uniformly random valid ECVRF-P256 scalar, by rejection sampling from the root's RNG."""
        for _ in range(64):
            candidate = random(vrf.SK_LEN)
            try:
                vrf.public_key(candidate)
            except TrustcapError:
                continue
            return candidate
        raise TrustRootOperationError("the random source gave no valid VRF scalar in 64 tries")

    # --- the key store file ---
    @classmethod
    def _new_store(cls, home: Path) -> Path:
        """Where `create` writes the store; refuses an existing one, whose keys would be lost."""
        path = home / cls.store_name
        if path.exists():
            raise TrustRootOperationError(f"key store {path} already exists; refusing to overwrite it")
        return path

    @classmethod
    def _write_store(cls, path: Path, fields: dict[str, Any]) -> None:
        doc = {"format": cls.store_format, **fields}
        write_private_file(path, json.dumps(doc, indent=2).encode() + b"\n", exclusive=True)

    @classmethod
    def _read_store(cls, home: Path, what: str) -> tuple[Path, dict[str, Any]]:
        """The store in `home` as a JSON object of this backend's format; its permissions are checked first."""
        path = home / cls.store_name
        check_private_file(path, what)
        try:
            doc: Any = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise TrustRootUnavailable(f"key store {path} is not readable JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != cls.store_format:
            raise TrustRootUnavailable(f"key store {path}: field 'format' is not {cls.store_format!r}")
        return path, doc

    def __enter__(self) -> TrustRoot:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
