"""Run scratch areas and the verified wipe that ends every run.

The seed asks that after a run "temp files or data in any storage ... be cleanly removed (non
recoverable) ... verified and guaranteed", and docs/design.md that the wipe "says which path it used" (some
machines' hardware erase fails, osism #2552). So every run's scratch is one of:

- `BlockScratch` (the default when we are root): an ext4 filesystem on a loop device over a file the
  agent owns. After the run it is unmounted and the *whole device* is overwritten with zeros, flushed,
  and the backing store read back: the proof carries the sha256 of the raw device before and after and
  the digest a zero device must have. Nothing is discarded before the read-back (a discard punches holes
  in the backing file, and holes read as zeros whether or not the overwrite happened: the check could
  not fail), so an overwrite that did not happen is seen. A capsule run's inputs and output live here
  too (`stage`, `read_output`): `/inputs`, `/output` and `/scratch` are directories of this one file
  system, so the same overwrite covers them.
- `TmpfsScratch` (fallback, not root): a size-capped tmpfs in the container's own mount namespace. Its
  pages are released when the container dies; nothing can be read back, so its proof says `tmpfs-drop`,
  `verified: false` with the reason, and whether the kernel zeroes freed pages (`init_on_free`).
- `overwrite_file`: a file the engine wrote for the run outside scratch (Docker's json-file log of the
  capsule's stdout/stderr) is overwritten in place and read back before the container is removed. On a
  journaling or copy-on-write host file system older copies of its blocks may remain: the proof says so.
  Capsule runs avoid it altogether (log driver `none`: the streams are never written).

The `reboot` level (re-PXE-boot the HPC into a fresh image) is run and proven by the gateway
(`trustcap.gateway.boot.Rebooter`, decision 0049); this module never claims it.

What no path here wipes is said in each proof's `not_covered` (issue 12 item 19), so a recipient does not
read `verified: true` as "nothing of the run is left": the HPC's RAM (the capsule's process memory, and the
page cache of its files, which the kernel frees at container exit and unmount without overwriting it,
unless it boots with init_on_free=1), swap when the HPC has any, and older copies of the backing file's
blocks on a copy-on-write or data-journaling host file system. The scratch device's own buffers are
written out to the backing file and invalidated, and the device detached, before the backing file itself
is overwritten (BLKFLSBUF, `blockdev --flushbufs`, `losetup -d`: nothing can write through the device
after the zeros), and the read-back bypasses the page cache (O_DIRECT), so the check sees the disk, not
memory; `page_cache` in the proof says which.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import mmap
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trustcap.agent.errors import OutputError, WipeError

__all__ = ["BlockScratch", "Scratch", "TmpfsScratch", "make_scratch", "memory_not_covered", "overwrite_file",
           "zero_digest"]

log = logging.getLogger("trustcap.agent")
_CHUNK = 16 * 1024 * 1024
_ZERO = bytes(_CHUNK)        # the overwrite pattern
_ZERO_CHECK = bytes(_CHUNK)  # what verification compares with: independent of the pattern written
_PAGE = 4096                 # O_DIRECT alignment (offsets, lengths, buffer)
_DIGESTS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zero-digest")
INPUTS, OUTPUT, WORK = "inputs", "output", "work"  # a capsule run's directories on its scratch


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


_PROC_CMDLINE = Path("/proc/cmdline")
_PROC_SWAPS = Path("/proc/swaps")


def _init_on_free() -> bool:
    """Whether this kernel zeroes pages as it frees them (booted with init_on_free=1)."""
    try:
        return "init_on_free=1" in _PROC_CMDLINE.read_text().split()
    except OSError:
        return False


def _swap_areas() -> int | None:
    """How many swap areas are active (None when /proc/swaps cannot be read: unknown, so stated)."""
    try:
        lines = _PROC_SWAPS.read_text().splitlines()
    except OSError:
        return None
    return sum(1 for line in lines[1:] if line.strip())


def memory_not_covered() -> list[str]:
    """What a software wipe on this HPC leaves in memory, as the proof's `not_covered` states it."""
    zeroed = _init_on_free()
    out = ["RAM: the capsule's process memory and the page cache of its files are freed when the container "
           "exits and the scratch is unmounted, not overwritten; " +
           ("this kernel zeroes freed pages (init_on_free=1)" if zeroed else
            "this kernel does not zero freed pages (no init_on_free=1), so their contents stay in free memory "
            "until reused; only the reboot wipe level starts a fresh boot")]
    swaps = _swap_areas()
    if swaps is None:
        out.append("swap: /proc/swaps could not be read, so whether pages of the run were swapped out is unknown")
    elif swaps:
        out.append(f"swap: {swaps} active swap area(s); pages of the run swapped out there are not overwritten")
    return out


def _fs_type(path: Path) -> str:
    try:
        return _run(["stat", "-f", "-c", "%T", str(path)], "naming the host file system").strip() or "unknown"
    except WipeError:
        return "unknown"


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

    def stage(self, uid: int, gid: int, inputs: Mapping[str, bytes]) -> None:
        raise WipeError(f"{self.level} scratch cannot hold a capsule's inputs and output: block scratch is needed "
                        "(the agent runs as root with losetup and mkfs.ext4)")

    def read_output(self, limit: int) -> bytes:
        raise WipeError(f"{self.level} scratch holds no capsule output")


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
                "init_on_free": "init_on_free=1" in cmdline.split(), "verified": False,
                "unverified_because": "freed tmpfs pages cannot be read back; the kernel zeroes them only "
                                      "with init_on_free=1",
                "not_covered": ["the scratch itself: its tmpfs pages are freed, not overwritten",
                                *memory_not_covered()]}


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
        self._staged = False
        # The proof's expected digest (sha256 of `size` zeros) is computed while the run goes on, not on
        # the wipe's critical path; it is cached per size for the agent's life.
        self._expected = _DIGESTS.submit(zero_digest, size)
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

        if not self._staged:
            return {"mounts": [Mount(target="/scratch", source=str(self.mountpoint), type="bind", read_only=False)]}
        return {"mounts": [
            Mount(target="/scratch", source=str(self.mountpoint / WORK), type="bind", read_only=False),
            Mount(target="/inputs", source=str(self.mountpoint / INPUTS), type="bind", read_only=True),
            Mount(target="/output", source=str(self.mountpoint / OUTPUT), type="bind", read_only=False)]}

    def stage(self, uid: int, gid: int, inputs: Mapping[str, bytes]) -> None:
        """Lay out a capsule run: inputs (read-only for `uid`), an empty output and a work directory, all on
        this file system, so the wipe covers them."""
        root = self.mountpoint
        for sub in (INPUTS, OUTPUT, WORK):
            (root / sub).mkdir(mode=0o700)
        for name, data in inputs.items():
            if not name or "/" in name or name in (".", ".."):
                raise WipeError(f"input name {name!r} is not a plain file name")
            target = root / INPUTS / name
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fchown(fd, uid, gid)
            finally:
                os.close(fd)
        for sub, mode in ((INPUTS, 0o500), (OUTPUT, 0o700), (WORK, 0o700)):
            os.chown(root / sub, uid, gid)
            os.chmod(root / sub, mode)
        self._staged = True

    def read_output(self, limit: int) -> bytes:
        """The capsule's `/output/result`, read without following links (the capsule owns the directory:
        a symlink there must not make the agent read a host file) and only if it is a regular file."""
        if not self._staged:
            raise WipeError("the scratch was not staged for a capsule run")
        dfd = os.open(self.mountpoint / OUTPUT, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            try:
                fd = os.open("result", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
            except FileNotFoundError as exc:
                raise OutputError("/output/result: the capsule wrote no result") from exc
            except OSError as exc:  # ELOOP: a symlink
                raise OutputError(f"/output/result: not a regular file ({exc.strerror})") from exc
        finally:
            os.close(dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OutputError("/output/result: not a regular file")
            if st.st_size > limit:
                raise OutputError(f"/output/result: {st.st_size} bytes, more than the {limit} allowed")
            parts: list[bytes] = []
            while chunk := os.read(fd, _CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        finally:
            os.close(fd)

    def wipe(self) -> dict[str, Any]:
        """Unmount, hash and overwrite all of the device with zeros in one pass, flush, read the backing
        store back from the disk and compare. Nothing is discarded first: holes would read as zeros and
        the check could not fail."""
        t0 = time.monotonic()
        if self._mounted:
            _run(["umount", str(self.mountpoint)], "unmounting scratch")
            self._mounted = False
        # The device's bytes *are* the backing file's. Its buffers are written out to the file and dropped
        # (BLKFLSBUF), and the device is detached, so nothing can write through it again; then the file
        # itself is hashed and overwritten, chunk by chunk, and fsynced: one page cache, not the loop
        # device's on top of the file's (writing through the device took half again as long).
        _run(["blockdev", "--flushbufs", self.device], "flushing scratch buffers")
        _run(["losetup", "-d", self.device], "detaching scratch")
        still = _run(["losetup", "--associated", str(self.backing)], "checking the scratch is detached").strip()
        if still:
            raise WipeError(f"scratch {self.backing} is still attached after losetup -d: {still}")
        before = hashlib.sha256()
        _overwrite(str(self.backing), self.size, before=(before, str(self.backing)))
        # Read back the backing store itself (what anyone scanning the disk would see), after the loop
        # device flushed to it and let go of it, and past the page cache where the file system allows
        # (O_DIRECT): every block the overwrite reached holds written zeros on the disk, not only in memory.
        after, all_zero, read_back = _read_back(str(self.backing), self.size)
        expected = self._expected.result()
        host_fs = _fs_type(self.dir)
        self.backing.unlink()
        self.mountpoint.rmdir()
        self.dir.rmdir()
        verified = all_zero and after == expected
        proof = {"what": "scratch", "path_used": "software-overwrite", "bytes": self.size, "passes": 1,
                 "pattern": "zeros", "discard": False, "device": self.device,
                 "covers": ["/scratch", "/inputs", "/output"] if self._staged else ["/scratch"],
                 "how": "unmounted; loop device flushed and detached; its whole backing store hashed and "
                        f"overwritten with zeros, fsynced, and read back ({read_back}) before it was unlinked",
                 "read_back": read_back,
                 "digest_before": "sha256:" + before.hexdigest(), "digest_after": after, "expected_after": expected,
                 "verified": verified,
                 "page_cache": "the scratch device's buffers were written out and invalidated before the overwrite "
                               "(BLKFLSBUF), and the device detached; the read-back " +
                               ("bypassed the page cache (O_DIRECT)" if read_back == "O_DIRECT"
                                else f"used it ({read_back})"),
                 "not_covered": [*memory_not_covered(),
                                 f"the host file system under the backing file ({host_fs}): the overwrite reaches "
                                 "that file's blocks, but a copy-on-write (btrfs, zfs) or data-journaling one may "
                                 "keep older copies of them elsewhere on the disk"],
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


def _overwrite(path: str, size: int, *, before: tuple[Any, str] | None = None) -> None:
    """Write zeros over the first `size` bytes of `path` and fsync (one place, so a test can fail it).

    With `before` (a hashlib object and the path that holds the same bytes as `path`), each chunk is read
    from that path and fed to the hash just before the same range is overwritten: the proof's digest of
    what was there costs no pass of its own. The hash runs in a worker thread (hashlib
    lets go of the GIL on large buffers) while the next chunk is read and this one is overwritten, so on
    two cores it hides behind the I/O. Two buffers alternate; a buffer is refilled only once its hash is
    done (the worker hashes in submission order, which keeps the digest's byte order).
    """
    fd = os.open(path, os.O_RDWR)
    try:
        if before is None:
            off = 0
            while off < size:
                off += os.pwrite(fd, _ZERO[:min(size - off, _CHUNK)], off)
        else:
            digest, source = before
            src = os.open(source, os.O_RDONLY)
            bufs = (bytearray(_CHUNK), bytearray(_CHUNK))
            hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wipe-hash")
            with contextlib.closing(_Fd(src)), hasher as pool:
                pending: Future[None] | None = None
                off, i = 0, 0
                while off < size:
                    n = min(size - off, _CHUNK)
                    view = memoryview(bufs[i % 2])[:n]
                    got = os.preadv(src, [view], off)
                    if got != n:
                        raise WipeError(f"reading {source}: it ended {size - off - got} bytes early")
                    if pending is not None:
                        pending.result()  # the other buffer's hash is done: it may be refilled next turn
                    pending = pool.submit(digest.update, view)
                    done = 0
                    while done < n:
                        done += os.pwrite(fd, _ZERO[done:n], off + done)
                    off, i = off + n, i + 1
                if pending is not None:
                    pending.result()
        os.fsync(fd)
    finally:
        os.close(fd)


class _Fd:
    """A raw file descriptor that `contextlib.closing` closes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)


def _read_back(path: str, size: int) -> tuple[str, bool, str]:
    """(digest, all zero, how it was read) of the first `size` bytes of `path`, read past the page cache.

    O_DIRECT reads what the disk holds, not what the kernel still has in memory; it needs a page-aligned
    buffer (an anonymous mmap is) and aligned offsets and lengths, so the last read asks for a whole page
    and takes what the file has. A file system without O_DIRECT (tmpfs) is read through the cache, and the
    proof says so.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        digest, zero = _hash_device(path, size, zero_check_only=True)
        return digest, zero, "page cache: the file system refused O_DIRECT"
    buf = mmap.mmap(-1, _CHUNK)
    try:
        off = 0
        while off < size:
            want = min(_CHUNK, -(-(size - off) // _PAGE) * _PAGE)
            try:
                got = os.preadv(fd, [memoryview(buf)[:want]], off)
            except OSError:
                os.close(fd)
                fd = -1
                digest, zero = _hash_device(path, size, zero_check_only=True)
                return digest, zero, "page cache: the file system refused O_DIRECT reads"
            n = min(got, size - off)
            if n <= 0:
                raise WipeError(f"reading {path}: file ended {size - off} bytes early")
            # mmap slicing copies into a bytes object whose == with the zero pattern is one memcmp
            if buf[:n] != (_ZERO_CHECK if n == _CHUNK else _ZERO_CHECK[:n]):
                return _hash_device(path, size)[0], False, "O_DIRECT"
            off += n
        return zero_digest(size), True, "O_DIRECT"
    finally:
        if fd >= 0:
            os.close(fd)
        buf.close()


def overwrite_file(path: Path, what: str) -> dict[str, Any]:
    """Overwrite a host file in place with zeros, read it back, then unlink it; the proof states its limit."""
    try:
        size = path.stat().st_size
        before, _ = _hash_device(str(path), size)
        _overwrite(str(path), size)
        after, all_zero = _hash_device(str(path), size, zero_check_only=True)
        path.unlink()
    except OSError as exc:
        return {"what": what, "path": str(path), "verified": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"what": what, "path": str(path), "path_used": "software-overwrite", "bytes": size,
            "digest_before": before, "digest_after": after, "expected_after": zero_digest(size),
            "verified": all_zero and after == zero_digest(size),
            "limits": "overwritten in place on the host file system; a journaling or copy-on-write file "
                      "system may keep older copies of its blocks",
            "not_covered": [*memory_not_covered(),
                            f"the host file system under {path.name} ({_fs_type(path.parent)}): a journaling or "
                            "copy-on-write one may keep older copies of its blocks",
                            "copies the engine kept in memory while it wrote the log"]}


def make_scratch(size: int, root: Path | None, target: str) -> Scratch:
    """Block-backed scratch when we can (root with loop tools), else tmpfs; the proof names which."""
    if root is not None and os.geteuid() == 0 and all(shutil.which(t) for t in ("losetup", "mkfs.ext4", "mount")):
        return BlockScratch(size, root)
    return TmpfsScratch(size, target)
