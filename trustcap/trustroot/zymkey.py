"""Zymkey trust root, through the real `zymkey` module of Zymbit's `zku` package.

Why this shape: the `zymkey` module binds `libzk_app_utils.so` with ctypes at import time and reports
every failure as a bare AssertionError("bad return code N"), a ZymkeyLibraryError or a
VerificationError. We load it in one place (`load_module`), call it in one place (`_call`) and translate
its errors in one place (`_translate`), so the rest of trustcap only sees `TrustRootError`s.

What lives where:
    Zymkey slot S (secp256k1)    the signing key; it never leaves the module (gen_key_pair makes it there)
    Zymkey one-way key           seals (`lock`) the VRF secret and whatever `seal` is given
    HOME/zymkey.json (0600)      slot number, module serial, public key, the locked VRF secret

Sealing binds a context: the module's lock authenticates what it encrypts, and we put the context inside
(`TZS1 || len(context) || context || data`), so data sealed for one purpose does not unseal for another.

The library path: the module reads `zymkey.settings.ZYMKEY_LIBRARY_PATH` (/usr/lib/libzk_app_utils.so,
also looked for under site-packages). `load_module(path)` (or TRUSTCAP_ZYMKEY_LIBRARY) supplies that
setting before the first import, which is how the tests load the stand-in from tests/zymkey_standin.
"""

from __future__ import annotations

import errno
import hmac
import importlib
import logging
import os
import re
import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from trustcap.errors import InvalidKey
from trustcap.trustroot import _secp256k1
from trustcap.trustroot.base import VRF_SEAL_CONTEXT, TamperStatus, TrustRoot
from trustcap.trustroot.errors import (
    SealedDataError,
    TrustRootError,
    TrustRootLocked,
    TrustRootOperationError,
    TrustRootTimeout,
    TrustRootUnavailable,
)

log = logging.getLogger("trustcap.trustroot")

FORMAT = "trustcap-trustroot-zymkey/1"
STORE_NAME = "zymkey.json"
LIBRARY_ENV = "TRUSTCAP_ZYMKEY_LIBRARY"
_SEAL_MAGIC = b"TZS1"

# Every exception class of zymkey.exceptions, by name, and what it means for us. A test checks that
# this table covers the module's whole exceptions list, so a new upstream error cannot slip through.
UPSTREAM_ERRORS: dict[str, type[TrustRootError]] = {
    "ZymkeyLibraryError": TrustRootUnavailable,
    "ZymkeyTimeoutError": TrustRootTimeout,
    "VerificationError": SealedDataError,
    "VaultError": TrustRootOperationError,
    "CommandError": TrustRootOperationError,
}

# Negative return codes of libzk_app_utils (errno values) that mean more than "operation refused".
RETURN_CODES: dict[int, type[TrustRootError]] = {
    errno.ETIMEDOUT: TrustRootTimeout,
    errno.EAGAIN: TrustRootTimeout,
    errno.ENODEV: TrustRootUnavailable,
    errno.ENXIO: TrustRootUnavailable,
    errno.EIO: TrustRootUnavailable,
    errno.EACCES: TrustRootLocked,
    errno.EPERM: TrustRootLocked,
}

_BAD_RC = re.compile(r"bad return code (-?\d+)")
T = TypeVar("T")


def _translate(exc: BaseException, doing: str) -> TrustRootError:
    """The one place where a zymkey-module error becomes ours."""
    cls = type(exc)
    if cls.__module__ == "zymkey.exceptions":
        ours = UPSTREAM_ERRORS.get(cls.__name__, TrustRootOperationError)
        detail = str(exc) or cls.__name__
        if ours is SealedDataError:
            detail = "the module refused the data: altered, or locked by another module"
        return ours(f"zymkey: cannot {doing}: {detail}")
    if isinstance(exc, AssertionError):
        m = _BAD_RC.search(str(exc))
        code = -int(m.group(1)) if m else 0
        ours = RETURN_CODES.get(code, TrustRootOperationError)
        name = errno.errorcode.get(code, "unknown")
        return ours(f"zymkey: cannot {doing}: the module returned -{code} ({name})")
    if isinstance(exc, ImportError):
        return TrustRootUnavailable(f"zymkey: cannot {doing}: the zymkey module is not installed (pip install zku)")
    if isinstance(exc, AttributeError):
        return TrustRootUnavailable(f"zymkey: cannot {doing}: libzk_app_utils lacks a symbol ({exc})")
    if isinstance(exc, OSError):
        return TrustRootUnavailable(f"zymkey: cannot {doing}: {exc}")
    return TrustRootOperationError(f"zymkey: cannot {doing}: {cls.__name__}: {exc}")


def load_module(library_path: str | None = None) -> types.ModuleType:
    """Import the `zymkey` module, pointed at `library_path` (or $TRUSTCAP_ZYMKEY_LIBRARY) if given."""
    wanted = library_path or os.environ.get(LIBRARY_ENV) or None
    loaded = sys.modules.get("zymkey")
    if loaded is not None:
        current = getattr(getattr(loaded, "zka", None), "zkalib", None)
        if wanted and getattr(current, "_name", wanted) != wanted:
            raise TrustRootUnavailable(
                f"zymkey: the module is already loaded from {current._name}; cannot switch to {wanted}"  # type: ignore[union-attr]
            )
        return loaded
    if wanted:
        if not Path(wanted).is_file():
            raise TrustRootUnavailable(f"zymkey: library {wanted} does not exist")
        settings = types.ModuleType("zymkey.settings")
        settings.ZYMKEY_LIBRARY_PATH = wanted  # type: ignore[attr-defined]
        sys.modules["zymkey.settings"] = settings
    try:
        with warnings.catch_warnings():
            # zymkey/zka.py imports distutils, deprecated since Python 3.10; that one warning only.
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*distutils.*")
            return importlib.import_module("zymkey")
    except Exception as exc:
        for name in [n for n in sys.modules if n == "zymkey" or n.startswith("zymkey.")]:
            del sys.modules[name]
        raise _translate(exc, "load the zymkey library") from exc


def _call(doing: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        raise _translate(exc, doing) from exc


class _Digest:
    """What zymkey's sign_digest wants: an object with .digest()."""

    def __init__(self, value: bytes) -> None:
        self._value = value

    def digest(self) -> bytes:
        return self._value


def _open_client(module: types.ModuleType) -> Any:
    try:
        return module.Zymkey()
    except AssertionError as exc:
        raise TrustRootUnavailable(
            "zymkey: cannot open the module (no device, or the zkifc service is not running)"
        ) from exc
    except Exception as exc:
        raise _translate(exc, "open the module") from exc


class ZymkeyTrustRoot(TrustRoot):
    """Trust root in a Zymkey/HSM: signing key in a secp256k1 slot, sealing by the module's lock."""

    backend = "zymkey"
    store_name = STORE_NAME
    store_format = FORMAT

    def __init__(self, client: Any, path: Path, slot: int, sealed_vrf: bytes) -> None:
        self._client = client
        self._path = path
        self._slot = slot
        raw = bytes(_call(f"export the public key of slot {slot}", client.get_public_key, slot))
        try:
            public = _secp256k1.compress(raw)
        except InvalidKey as exc:
            raise TrustRootOperationError(f"zymkey: slot {slot} does not hold a secp256k1 key") from exc
        super().__init__(sealed_vrf, public)

    @classmethod
    def create(cls, home: Path, *, library_path: str | None = None, slot: int | None = None) -> ZymkeyTrustRoot:
        """Provision: a new secp256k1 key pair in the module (or use `slot`), a VRF secret from the
        module's RNG, locked by the module; refuses to overwrite an existing store."""
        path = cls._new_store(home)
        client = _open_client(load_module(library_path))
        if slot is None:
            slot = int(_call("generate a secp256k1 key pair", client.gen_key_pair, "secp256k1"))
        vrf_secret = cls._new_vrf_secret(lambda n: bytes(_call("get random bytes", client.get_random, n)))
        sealed_vrf = _lock(client, vrf_secret, VRF_SEAL_CONTEXT)
        root = cls(client, path, slot, sealed_vrf)
        cls._write_store(path, {
            "serial": root.serial(),
            "slot": slot,
            "publicKey": root.public_key().hex(),
            "vrfSecret": sealed_vrf.hex(),
        })
        log.info("provisioned zymkey trust root %s, signing slot %s", root.serial(), slot)
        return root

    @classmethod
    def open(cls, home: Path, *, library_path: str | None = None) -> ZymkeyTrustRoot:
        """Open the store in `home` on the module it was made on."""
        path, doc = cls._read_store(home, "zymkey key store")
        try:
            slot = int(doc["slot"])
            serial = str(doc["serial"])
            public = bytes.fromhex(doc["publicKey"])
            sealed_vrf = bytes.fromhex(doc["vrfSecret"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TrustRootUnavailable(f"key store {path}: field {exc} is missing or malformed") from exc
        client = _open_client(load_module(library_path))
        here = str(_call("read the serial number", client.get_serial_number))
        if here != serial:
            raise TrustRootLocked(f"key store {path} belongs to module {serial}, but this is {here}")
        root = cls(client, path, slot, sealed_vrf)
        if root.public_key() != public:
            raise TrustRootLocked(f"key store {path}: slot {slot} no longer holds the key recorded there")
        return root

    def _sign(self, digest32: bytes) -> bytes:
        sig = bytes(_call(f"sign with slot {self._slot}", self._client.sign_digest, _Digest(digest32),
                          slot=self._slot))
        if len(sig) != 64:
            raise TrustRootOperationError(f"zymkey: signature of {len(sig)} bytes, expected 64 (r||s)")
        try:
            return _secp256k1.to_recoverable(
                digest32, int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"), self._public
            )
        except ValueError as exc:
            raise TrustRootOperationError(f"zymkey: the module's signature does not verify: {exc}") from exc

    def seal(self, data: bytes, context: bytes = b"") -> bytes:
        return _lock(self._client, bytes(data), context)

    def unseal(self, sealed: bytes, context: bytes = b"") -> bytes:
        plain = bytes(_call("unlock sealed data", self._client.unlock, bytes(sealed)))
        head = len(_SEAL_MAGIC) + 4
        if len(plain) < head or not plain.startswith(_SEAL_MAGIC):
            raise SealedDataError("sealed data was not sealed by a trustcap zymkey root")
        n = int.from_bytes(plain[len(_SEAL_MAGIC):head], "big")
        if len(plain) < head + n or not hmac.compare_digest(plain[head:head + n], context):
            raise SealedDataError("sealed data was sealed for another context")
        return plain[head + n:]

    def _random(self, n: int) -> bytes:
        return bytes(_call("get random bytes", self._client.get_random, n))

    def serial(self) -> str:
        return str(_call("read the serial number", self._client.get_serial_number))

    def tamper_status(self) -> TamperStatus:
        events = tuple(int(t) for t in _call("read perimeter status", self._client.get_perimeter_detect_info))
        return TamperStatus(supported=True, breached=any(events), first_breach=events)

    def close(self) -> None:
        self._client = None


def _lock(client: Any, data: bytes, context: bytes) -> bytes:
    framed = _SEAL_MAGIC + len(context).to_bytes(4, "big") + context + data
    return bytes(_call("lock data", client.lock, framed))
