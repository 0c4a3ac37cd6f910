"""The trust root: one interface (`TrustRoot`), two backends.

    ZymkeyTrustRoot    keys in a Zymkey/HSM through Zymbit's `zymkey` module (production gateways)
    SoftwareTrustRoot  keys sealed in a file under a key-encryption key (development, tests, no module)

`open_trust_root(home)` opens whichever store `home` holds. See docs/decisions/0020-trust-root.md.
"""

from __future__ import annotations

from pathlib import Path

from trustcap.trustroot.base import TamperStatus, TrustRoot
from trustcap.trustroot.errors import (
    KeyFilePermissions,
    SealedDataError,
    TamperDetected,
    TrustRootError,
    TrustRootLocked,
    TrustRootOperationError,
    TrustRootTimeout,
    TrustRootUnavailable,
)
from trustcap.trustroot.software import SoftwareTrustRoot, load_kek, new_kek_file
from trustcap.trustroot.zymkey import ZymkeyTrustRoot

__all__ = [
    "KeyFilePermissions",
    "SealedDataError",
    "SoftwareTrustRoot",
    "TamperDetected",
    "TamperStatus",
    "TrustRoot",
    "TrustRootError",
    "TrustRootLocked",
    "TrustRootOperationError",
    "TrustRootTimeout",
    "TrustRootUnavailable",
    "ZymkeyTrustRoot",
    "load_kek",
    "new_kek_file",
    "open_trust_root",
]


def open_trust_root(home: Path, *, kek_file: Path | None = None, zymkey_library: str | None = None) -> TrustRoot:
    """Open the trust root whose store is in `home`: the Zymkey one if `home/zymkey.json` exists, else the
    software one (KEK from `kek_file` or $TRUSTCAP_TRUSTROOT_KEK)."""
    from trustcap.trustroot import software, zymkey

    if (home / zymkey.STORE_NAME).exists():
        return ZymkeyTrustRoot.open(home, library_path=zymkey_library)
    if (home / software.STORE_NAME).exists():
        return SoftwareTrustRoot.open(home, load_kek(kek_file))
    raise TrustRootUnavailable(f"no trust root in {home}: neither {zymkey.STORE_NAME} nor {software.STORE_NAME}")
