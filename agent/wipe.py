"""Run scratch areas and the verified wipe that ends every run.

The seed asks that after a run "temp files or data in any storage ... be cleanly removed (non
recoverable) ... verified and guaranteed", and docs/design.md that the wipe "says which path it used" (some
machines' hardware erase fails, osism #2552). So every run's scratch is one of:

- `BlockScratch` (the default when we are root): an ext4 filesystem on a loop device over a file the
  agent owns. After the run it is unmounted and the *whole device* is overwritten with zeros, discarded,
  and read back: the proof carries the sha256 of the raw device before and after and the digest a zero
  device must have. Nothing the capsule wrote can survive on the backing store, and that is checked,
  not assumed.
- `TmpfsScratch` (fallback, not root): a size-capped tmpfs in the container's own mount namespace. Its
  pages are released when the container dies; the proof says `tmpfs-drop` and whether the kernel zeroes
  freed pages (`init_on_free`). This is weaker and the proof says so.

The `reboot` level (re-PXE-boot the HPC into a fresh image) is run and proven by the gateway
(`trustcap.gateway.boot.Rebooter`, decision 0049); this module never claims it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trustcap.agent.errors import WipeError

__all__ = ["BlockScratch", "Scratch", "TmpfsScratch", "make_scratch", "zero_digest"]

log = logging.getLogger("trustcap.agent")
_CHUNK = 16 * 1024 * 1024
_ZERO = bytes(_CHUNK)        # the overwrite pattern
_ZERO_CHECK = bytes(_CHUNK)  # what verification compares with: independent of the pattern written
DISCARD = True               # also discard (on a loop device: punch holes in the backing file)


@functools.lru_cache(maxsize=16)
def zero_digest(size: int) -> str:
    """sha256 of `size` zero bytes: what a fully overwritten device must hash to."""
    h = hashlib.sha256()
    left = size
    while left:
        n = min(left, _CHUNK)
        h.update(_ZERO_CHECK[:n])
        left -= n
    return "sha256:" + h.hexdigest()


def _run(cmd: list[str], what: str) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WipeError(f"{what}: {cmd[0]} could not run: {exc}") from exc
    if proc.returncode != 0:
        raise WipeError(f"{what}: {' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip()[:300]}")
    return proc.stdout


def _hash_device(path: str, size: int, *, zero_check_only: bool = False) -> tuple[str, bool]:
    """sha256 of the first `size` bytes of a device, and whether every byte was zero.

    With `zero_check_only`, bytes are compared with zeros and not hashed while they stay zero: an
    all-zero device's sha256 *is* `zero_digest(size)`, so hashing it again proves nothing more. The first
    non-zero chunk switches to a real digest (a second pass), so a failed wipe reports what is there.
    """
    h = hashlib.sha256()
    all_zero = True
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as dev:
        left = size
        while left:
            n = dev.readinto(view[:min(left, _CHUNK)])
            if not n:
                raise WipeError(f"reading {path}: device ended {left} bytes early")
            chunk = view[:n]
            # bytearray == bytes is one memcmp; a memoryview comparison would go element by element
            if all_zero and (buf != _ZERO_CHECK if n == _CHUNK else bytes(chunk) != _ZERO_CHECK[:n]):
                all_zero = False
                if zero_check_only:
                    return _hash_device(path, size)[0], False
            if not zero_check_only:
                h.update(chunk)
            left -= n
    if zero_check_only:
        return zero_digest(size), True
    return "sha256:" + h.hexdigest(), all_zero


@dataclass
class Scratch:
    """A run's only writable area. `docker_settings()` plugs it into the container; `wipe()` ends it."""

    size: int
    level: str = "none"
    proof: dict[str, Any] = field(default_factory=dict)

    def docker_settings(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def wipe(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError


class TmpfsScratch(Scratch):
    """Size-capped tmpfs inside the container; released with it (weaker: RAM pages freed, not overwritten)."""

    def __init__(self, size: int, target: str) -> None:
        super().__init__(size=size, level="tmpfs-drop")
        self.target = target

    def docker_settings(self) -> dict[str, Any]:
        return {"tmpfs": {self.target: f"rw,noexec,nosuid,nodev,size={self.size},mode=1777"}}

    def wipe(self) -> dict[str, Any]:
        cmdline = Path("/proc/cmdline").read_text() if Path("/proc/cmdline").exists() else ""
        return {"what": "scratch", "path_used": "tmpfs-drop", "bytes": self.size,
                "how": "tmpfs in the container's mount namespace, released when the container was removed",
                "init_on_free": "init_on_free=1" in cmdline, "verified": "container removal confirmed"}


class BlockScratch(Scratch):
    """ext4 on a loop device over an agent-owned file; wiped by whole-device overwrite + read-back."""

    def __init__(self, size: int, root: Path, uid: int = 65534, gid: int = 65534) -> None:
        super().__init__(size=size, level="overwrite")
        root.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="run-", dir=root))
        self.backing = self.dir / "scratch.img"
        self.mountpoint = self.dir / "mnt"
        self.mountpoint.mkdir()
        self.device = ""
        self._mounted = False
        try:
            with open(self.backing, "wb") as f:
                f.truncate(size)
            self.device = _run(["losetup", "--find", "--show", str(self.backing)], "attaching scratch").strip()
            _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
                  "-O", "^has_journal", self.device], "formatting scratch")
            _run(["mount", "-t", "ext4", "-o", "nosuid,nodev,noexec,noatime", self.device, str(self.mountpoint)],
                 "mounting scratch")
            self._mounted = True
            os.chown(self.mountpoint, uid, gid)
            os.chmod(self.mountpoint, 0o700)
            lost = self.mountpoint / "lost+found"
            if lost.exists():
                shutil.rmtree(lost)
        except Exception:
            self._teardown_quietly()
            raise

    def docker_settings(self) -> dict[str, Any]:
        from docker.types import Mount

        return {"mounts": [Mount(target="/scratch", source=str(self.mountpoint), type="bind", read_only=False)]}

    def wipe(self) -> dict[str, Any]:
        """Unmount, hash, overwrite all of the device with zeros, discard, read back and compare."""
        t0 = time.monotonic()
        if self._mounted:
            _run(["umount", str(self.mountpoint)], "unmounting scratch")
            self._mounted = False
        # The device's bytes *are* the backing file's: hashing the file is the same content, read faster.
        before, _ = _hash_device(str(self.backing), self.size)
        with open(self.device, "r+b", buffering=0) as dev:
            left = self.size
            while left:
                left -= dev.write(_ZERO[:min(left, _CHUNK)])
            os.fsync(dev.fileno())
        discarded = DISCARD and subprocess.run(["blkdiscard", "--force", self.device], capture_output=True,
                                               timeout=60, check=False).returncode == 0
        _run(["blockdev", "--flushbufs", self.device], "flushing scratch buffers")
        _run(["losetup", "-d", self.device], "detaching scratch")
        # Read back the backing store itself (what anyone scanning the disk would see), after the loop
        # device flushed to it and let go of it; its blocks hold zeros (or are holes after discard).
        after, all_zero = _hash_device(str(self.backing), self.size, zero_check_only=True)
        expected = zero_digest(self.size)
        self.backing.unlink()
        self.mountpoint.rmdir()
        self.dir.rmdir()
        verified = all_zero and after == expected
        proof = {"what": "scratch", "path_used": "software-overwrite", "bytes": self.size, "passes": 1,
                 "pattern": "zeros", "discard": discarded, "device": self.device,
                 "how": "unmounted; whole loop device overwritten with zeros, fsynced, discarded; "
                        "backing store read back",
                 "digest_before": before, "digest_after": after, "expected_after": expected,
                 "verified": verified,
                 "seconds": round(time.monotonic() - t0, 3)}
        if not verified:
            raise WipeError(f"scratch wipe did not verify: device digest {after} != zero digest {expected}")
        log.info("scratch %s wiped and verified (%s bytes)", self.device, self.size)
        return proof

    def _teardown_quietly(self) -> None:
        if self._mounted:
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True, timeout=30, check=False)
        if self.device:
            subprocess.run(["losetup", "-d", self.device], capture_output=True, timeout=30, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def make_scratch(size: int, root: Path | None, target: str) -> Scratch:
    """Block-backed scratch when we can (root with loop tools), else tmpfs; the proof names which."""
    if root is not None and os.geteuid() == 0 and all(shutil.which(t) for t in ("losetup", "mkfs.ext4", "mount")):
        return BlockScratch(size, root)
    return TmpfsScratch(size, target)
