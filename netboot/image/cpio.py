"""A reproducible initramfs writer: cpio "newc" with sorted names, fixed owners, times and inodes.

The `cpio` tool takes mtimes, owners and inode numbers from the build machine; the kernel needs none of
them. Writing the archive here makes the initrd's bytes a function of its contents alone, so the same
inputs give the same sha256 on any machine (what the chain approves is what anyone can rebuild).
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass

__all__ = ["Entry", "pack"]


@dataclass(frozen=True)
class Entry:
    """One archive member. `kind`: "dir", "file", "symlink" or "chardev" (with `rdev` = (major, minor))."""

    path: str
    kind: str
    data: bytes = b""
    mode: int = 0o755
    rdev: tuple[int, int] = (0, 0)


_TYPES = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK, "chardev": stat.S_IFCHR}


def _header(ino: int, mode: int, nlink: int, mtime: int, size: int, rdev: tuple[int, int], namesize: int) -> bytes:
    fields = (ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdev[0], rdev[1], namesize, 0)
    return b"070701" + b"".join(b"%08X" % f for f in fields)


def _pad(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def pack(entries: list[Entry], mtime: int) -> bytes:
    """The newc archive of `entries` (sorted by path, parents first), gzip-compressed without a timestamp."""
    seen: dict[str, Entry] = {}
    for e in entries:
        if e.path in seen:
            raise ValueError(f"duplicate initramfs path {e.path}")
        seen[e.path] = e
    for path in list(seen):  # the kernel's unpacker creates no parents: add any missing folder
        parts = path.split("/")
        for i in range(1, len(parts)):
            seen.setdefault("/".join(parts[:i]), Entry("/".join(parts[:i]), "dir"))
    out = bytearray()
    for ino, path in enumerate(sorted(seen), start=1):
        e = seen[path]
        body = e.data if e.kind in ("file", "symlink") else b""
        mode = _TYPES[e.kind] | (0o777 if e.kind == "symlink" else e.mode)
        name = path.encode() + b"\0"
        out += _header(ino, mode, 2 if e.kind == "dir" else 1, mtime, len(body), e.rdev, len(name))
        out += name + _pad(110 + len(name)) + body + _pad(len(body))
    trailer = b"TRAILER!!!\0"
    out += _header(0, 0, 1, 0, 0, (0, 0), len(trailer)) + trailer + _pad(110 + len(trailer))
    out += b"\0" * (-len(out) % 512)
    return gzip.compress(bytes(out), compresslevel=9, mtime=0)
