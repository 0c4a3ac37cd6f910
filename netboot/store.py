"""The one gate every served byte passes: approved name, safe path, matching digest, every time.

TFTP and HTTP both ask `ApprovedStore.fetch(name, protocol, client)`. It

1. rejects any name that is not a plain relative path (`..`, absolute, backslash, NUL, %-encoding, ...),
2. asks the approval source which files are approved *now* (a revoked image stops at the next request),
3. opens the file component by component with `O_NOFOLLOW` below the root (no symlink leads out),
4. reads the whole file, hashes it and compares with the approved sha256, and returns *those* bytes,
   so what was checked is what is sent (no check-then-reopen race).

A refusal is logged, counted in `trustcap_netboot_refused_total{protocol,reason}` and handed to every
registered hook (the gateway turns it into a Kubernetes Warning event / an attestation failure).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter

from trustcap.netboot.approval import SAFE_PATH, ApprovalSource
from trustcap.netboot.errors import DigestMismatch, NetbootError, NotApproved, PathRejected

__all__ = ["ApprovedStore", "Refusal", "normalize_name"]

log = logging.getLogger("trustcap.netboot")

SERVED = Counter("trustcap_netboot_served_total", "Boot files served after their digest matched.", ["protocol"])
SERVED_BYTES = Counter("trustcap_netboot_served_bytes_total", "Bytes of verified boot files handed out.", ["protocol"])
REFUSED = Counter(
    "trustcap_netboot_refused_total",
    "Boot file requests refused (path rejected, not approved, digest mismatch, missing).",
    ["protocol", "reason"],
)

REASONS = ("path", "not-approved", "digest-mismatch", "missing", "approval-unavailable")


@dataclass(frozen=True)
class Refusal:
    """What a hook receives: enough to report, never the file's content."""

    protocol: str
    name: str
    reason: str
    client: str
    detail: str


def normalize_name(raw: str) -> str:
    """The relative path a client asked for, or PathRejected. One leading '/' is tolerated (iPXE and
    many PXE ROMs send `/boot.ipxe`); everything else must already be a plain relative name."""
    if not isinstance(raw, str) or "\x00" in raw or "\\" in raw or "%" in raw:
        raise PathRejected(f"{raw!r}: NUL, backslash or %-encoding in a boot file name")
    name = raw[1:] if raw.startswith("/") and not raw.startswith("//") else raw
    if len(name) > 255 or not SAFE_PATH.match(name) or any(p in (".", "..") for p in name.split("/")):
        raise PathRejected(f"{raw!r}: not a plain relative boot file name")
    return name


class ApprovedStore:
    """Serves approved, untampered files from `root`. Thread-safe: it keeps no per-request state."""

    def __init__(self, root: Path, approval: ApprovalSource, max_bytes: int = 512 * 1024 * 1024) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise NetbootError(f"boot root {root} is not a directory")
        self.approval = approval
        self.max_bytes = max_bytes
        self._hooks: list[Callable[[Refusal], None]] = []

    def on_refused(self, hook: Callable[[Refusal], None]) -> None:
        """Call `hook(refusal)` on every refusal (after logging and counting it)."""
        self._hooks.append(hook)

    def fetch(self, raw_name: str, protocol: str, client: str) -> bytes:
        """The verified bytes of `raw_name`, or a NetbootError (already reported)."""
        try:
            name = normalize_name(raw_name)
            approved = self.approval.approved()
            want = approved.get(name)
            if want is None:
                raise NotApproved(f"{name}: not part of any approved boot image")
            data = self._read(name)
            got = hashlib.sha256(data).digest()
            if not hmac.compare_digest(got, want):
                raise DigestMismatch(f"{name}: sha256 {got.hex()} differs from approved {want.hex()}")
        except NetbootError as exc:
            self._report(protocol, raw_name, exc, client)
            raise
        SERVED.labels(protocol).inc()
        SERVED_BYTES.labels(protocol).inc(len(data))
        log.info("served %s (%d bytes, sha256 ok) to %s over %s", name, len(data), client, protocol)
        return data

    def _read(self, name: str) -> bytes:
        parts = name.split("/")
        flags_dir = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.root, flags_dir)
        try:
            for part in parts[:-1]:
                nfd = os.open(part, flags_dir, dir_fd=fd)
                os.close(fd)
                fd = nfd
            ffd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=fd)
        except OSError as exc:
            reason = "symlink" if exc.errno in (errno.ELOOP, errno.ENOTDIR) else exc.strerror
            raise NotApproved(f"{name}: cannot open below the boot root ({reason})") from exc
        finally:
            os.close(fd)
        with os.fdopen(ffd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise NotApproved(f"{name}: not a regular file")
            if st.st_size > self.max_bytes:
                raise NotApproved(f"{name}: {st.st_size} bytes exceeds the {self.max_bytes}-byte limit")
            return fh.read(self.max_bytes + 1)

    def _report(self, protocol: str, raw_name: str, exc: NetbootError, client: str) -> None:
        reason = {
            "PathRejected": "path",
            "NotApproved": "not-approved",
            "DigestMismatch": "digest-mismatch",
            "ApprovalUnavailable": "approval-unavailable",
        }.get(type(exc).__name__, "missing")
        REFUSED.labels(protocol, reason).inc()
        level = logging.ERROR if reason == "digest-mismatch" else logging.WARNING
        log.log(level, "refused %r to %s over %s: %s", raw_name[:300], client, protocol, exc)
        event = Refusal(protocol=protocol, name=raw_name[:300], reason=reason, client=client, detail=str(exc))
        for hook in self._hooks:
            try:
                hook(event)
            except Exception:  # a broken reporter must not take the boot server down
                log.exception("refusal hook %r failed", hook)
