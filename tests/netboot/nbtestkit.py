"""Shared fixtures: a boot root with approved files, a sibling folder and symlinks that point out of it,
and a running TFTP server on loopback (real UDP)."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from trustcap.netboot.approval import ManifestApproval
from trustcap.netboot.store import ApprovedStore, Refusal
from trustcap.netboot.tftp import TftpServer

KERNEL = bytes(range(256)) * 4000  # 1,024,000 bytes: many blocks at every block size
SCRIPT = b"#!ipxe\necho hi\n"
SECRET = b"outside the root\n"


@dataclass
class Root:
    root: Path
    store: ApprovedStore
    refusals: list[Refusal]


@pytest.fixture
def boot_root(tmp_path: Path) -> Root:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "kernel").write_bytes(KERNEL)
    (root / "boot.ipxe").write_bytes(SCRIPT)
    (root / "sub" / "initrd").write_bytes(b"initrd bytes")
    (root / "unapproved").write_bytes(b"present but never approved")
    sibling = tmp_path / "root-sibling"
    sibling.mkdir()
    (sibling / "secret").write_bytes(SECRET)
    (tmp_path / "secret").write_bytes(SECRET)
    os.symlink(tmp_path / "secret", root / "escape")
    os.symlink("../root-sibling", root / "sibdir")
    os.symlink("/etc", root / "etc")
    sha = {n: hashlib.sha256(d).digest() for n, d in
           (("kernel", KERNEL), ("boot.ipxe", SCRIPT), ("sub/initrd", b"initrd bytes"))}
    # Even approved by name and with the right digest, a symlink out of the root must not be served.
    sha["escape"] = hashlib.sha256(SECRET).digest()
    sha["sibdir/secret"] = hashlib.sha256(SECRET).digest()
    store = ApprovedStore(root, ManifestApproval(sha))
    refusals: list[Refusal] = []
    store.on_refused(refusals.append)
    return Root(root, store, refusals)


@pytest.fixture
def tftp(boot_root: Root) -> Iterator[TftpServer]:
    server = TftpServer(boot_root.store, "127.0.0.1", 0, timeout=0.5, retries=3).start()
    try:
        yield server
    finally:
        server.stop()


def rrq(name: bytes, mode: bytes = b"octet", options: dict[bytes, bytes] | None = None) -> bytes:
    body = b"\x00\x01" + name + b"\x00" + mode + b"\x00"
    for k, v in (options or {}).items():
        body += k + b"\x00" + v + b"\x00"
    return body


def udp(timeout: float = 3.0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(timeout)
    return s


def first_reply(server: TftpServer, packet: bytes) -> tuple[int, int, bytes]:
    """(opcode, code-or-block, rest) of the server's first answer to `packet`."""
    with udp() as s:
        s.sendto(packet, ("127.0.0.1", server.port))
        data, _ = s.recvfrom(70000)
    op, num = struct.unpack("!HH", data[:4])
    return op, num, data[4:]


def download(server: TftpServer, name: str, blksize: int | None = None, timeout: float = 5.0) -> bytes:
    """A strict little RFC 1350/2348 client over real UDP (independent of the server code). Like any
    TFTP client it retransmits its last packet on a timeout (UDP may drop it under a flood), 4 times."""
    opts = {b"blksize": str(blksize).encode()} if blksize else None
    out = bytearray()
    with udp(timeout / 4) as s:
        last, dest = rrq(name.encode(), options=opts), ("127.0.0.1", server.port)
        s.sendto(last, dest)
        size = blksize or 512
        expect = 1
        misses = 0
        while True:
            try:
                data, peer = s.recvfrom(70000)
            except TimeoutError:
                misses += 1
                if misses > 4:
                    raise
                s.sendto(last, dest)
                continue
            misses = 0
            op, num = struct.unpack("!HH", data[:4])
            if op == 5:
                raise PermissionError(num)
            dest = peer
            if op == 6:
                last = struct.pack("!HH", 4, 0)
                s.sendto(last, peer)
                continue
            assert op == 3
            if num == expect % 65536:
                out += data[4:]
                expect += 1
            last = struct.pack("!HH", 4, num)
            s.sendto(last, peer)
            if num == (expect - 1) % 65536 and len(data) - 4 < size:
                return bytes(out)
