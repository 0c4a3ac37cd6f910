"""The errors of the trust root.

    TrustcapError
    └── TrustRootError               anything the trust root refuses or fails to do
        ├── TrustRootUnavailable     no module, no device, library missing or unloadable: nothing to ask
        ├── TrustRootTimeout         the module did not answer in time (busy i2c bus, zkifc stalled)
        ├── TrustRootLocked          the sealed key store cannot be opened: wrong or missing KEK, locked module
        ├── KeyFilePermissions       a key or KEK file is readable by group or others (message names the chmod)
        ├── SealedDataError          sealed bytes are malformed, tampered, or were sealed by another root
        ├── TamperDetected           the module's perimeter reports a breach; its keys must not be trusted
        └── TrustRootOperationError  the module refused an operation (bad slot, wrong key type, bad return code)

Zymkey errors are translated in one place, `trustcap.trustroot.zymkey._translate`, so a caller only ever
catches these.
"""

from __future__ import annotations

from trustcap.errors import TrustcapError

__all__ = [
    "KeyFilePermissions",
    "SealedDataError",
    "TamperDetected",
    "TrustRootError",
    "TrustRootLocked",
    "TrustRootOperationError",
    "TrustRootTimeout",
    "TrustRootUnavailable",
]


class TrustRootError(TrustcapError):
    """The trust root refused or failed an operation."""


class TrustRootUnavailable(TrustRootError):
    """No usable module: the library or device is missing, or the key store does not exist."""


class TrustRootTimeout(TrustRootError):
    """The module did not answer in time; waiting and retrying may help."""


class TrustRootLocked(TrustRootError):
    """The key store cannot be opened with what we were given (wrong or missing key-encryption key)."""


class KeyFilePermissions(TrustRootError):
    """A secret file is readable or writable by group or others; we refuse to use it."""


class SealedDataError(TrustRootError):
    """Sealed bytes are malformed, were altered, or were sealed by another trust root or for another purpose."""


class TamperDetected(TrustRootError):
    """The module's perimeter detection fired: the hardware may have been opened."""


class TrustRootOperationError(TrustRootError):
    """The module refused an operation: unknown slot, wrong key type, or a bad return code."""
