"""Attack tests for the TFTP server on loopback with real UDP: traversal, garbage, stalls, hijack, upload."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time

import pytest
from nbtestkit import KERNEL, SCRIPT, Root, download, first_reply, rrq, udp

from trustcap.netboot.tftp import TftpServer

ACCESS_VIOLATION = 2

TRAVERSAL: list[tuple[bytes, str]] = [
    (b"../secret", "dotdot"),
    (b"../../../../etc/passwd", "deep-dotdot"),
    (b"sub/../../secret", "dotdot-after-dir"),
    (b"sub/../kernel/../../secret", "dotdot-zigzag"),
    (b"./kernel", "dot-prefix"),
    (b"sub/./initrd", "dot-middle"),
    (b"kernel/.", "dot-suffix"),
    (b"..", "bare-dotdot"),
    (b".", "bare-dot"),
    (b"/etc/passwd", "absolute"),
    (b"//etc/passwd", "double-slash-absolute"),
    (b"/../secret", "slash-dotdot"),
    (b"sub//initrd", "double-slash-inner"),
    (b"sub/", "trailing-slash"),
    (b"", "empty"),
    (b"/", "root-slash"),
    (b"../root-sibling/secret", "sibling-prefix"),
    (b"../root/kernel", "back-into-root-by-name"),
    (b"escape", "symlink-file-out-approved"),
    (b"sibdir/secret", "symlink-dir-out-approved"),
    (b"etc/passwd", "symlink-to-etc"),
    (b"unapproved", "present-not-approved"),
    (b"..%2fsecret", "percent-slash"),
    (b"%2e%2e/secret", "percent-dots"),
    (b"%2e%2e%2fsecret", "percent-all"),
    (b"..%252fsecret", "double-encoded"),
    (b"%c0%ae%c0%ae/secret", "overlong-utf8-encoded"),
    (b"\xc0\xae\xc0\xae/secret", "overlong-utf8-raw"),
    (b"..\\secret", "backslash"),
    (b"..\\..\\windows\\win.ini", "backslash-deep"),
    (b"sub\\..\\..\\secret", "backslash-mixed"),
    (b"C:\\boot.ini", "drive-letter"),
    (b"kernel\x00../secret", "nul-in-name"),
    (b"kernel\x00", "nul-then-empty-mode"),
    (b"\xff\xfe", "non-ascii"),
    (b"k\xe9rnel", "latin1"),
    (b"ker nel", "space"),
    (b"kernel\n", "newline"),
    (b"~/.ssh/id_rsa", "tilde-home"),
    (b"$HOME/secret", "shell-var"),
    (b"-kernel", "leading-dash"),
    (b"a" * 300, "too-long"),
    (b"sub/" * 80 + b"x", "too-deep"),
    (b"/proc/self/environ", "proc"),
    (b"....//secret", "four-dots"),
    (b".../secret", "three-dots"),
]


def test_corpus_is_big_enough() -> None:
    assert len(TRAVERSAL) >= 40


@pytest.mark.parametrize("name", [pytest.param(n, id=i) for n, i in TRAVERSAL])
def test_traversal_gets_access_violation(tftp: TftpServer, boot_root: Root, name: bytes) -> None:
    op, code, _ = first_reply(tftp, rrq(name))
    assert (op, code) == (5, ACCESS_VIOLATION)
    # Never the secret, and the server is still serving afterwards.
    assert download(tftp, "boot.ipxe") == SCRIPT


def test_mode_injection_via_nul_is_refused(tftp: TftpServer) -> None:
    # "kernel\0../../secret\0" parses as name=kernel, mode=../../secret: refused, not served.
    op, code, _ = first_reply(tftp, b"\x00\x01kernel\x00../../secret\x00")
    assert (op, code) == (5, ACCESS_VIOLATION)


@pytest.mark.parametrize("blksize", [pytest.param(b, id=f"blksize-{b}") for b in (None, 512, 1468, 8192, 65464)])
def test_approved_file_downloads_whole(tftp: TftpServer, blksize: int | None) -> None:
    assert download(tftp, "kernel", blksize) == KERNEL


def test_upload_is_refused(tftp: TftpServer, boot_root: Root) -> None:
    wrq = b"\x00\x02" + b"kernel\x00octet\x00"
    assert first_reply(tftp, wrq)[:2] == (5, ACCESS_VIOLATION)
    assert (boot_root.root / "kernel").read_bytes() == KERNEL


def test_tampered_file_is_refused_and_reported(tftp: TftpServer, boot_root: Root) -> None:
    (boot_root.root / "boot.ipxe").write_bytes(b"#!ipxe\nchain http://evil/\n")
    assert first_reply(tftp, rrq(b"boot.ipxe"))[:2] == (5, ACCESS_VIOLATION)
    assert [(r.reason, r.protocol) for r in boot_root.refusals] == [("digest-mismatch", "tftp")]


def test_random_and_truncated_datagrams_never_kill_the_server(tftp: TftpServer) -> None:
    rnd = random.Random(6)  # noqa: S311 -- reproducible fuzz input, not a secret
    valid = [rrq(b"kernel", options={b"blksize": b"1468", b"tsize": b"0"}), b"\x00\x04\x00\x01",
             b"\x00\x05\x00\x01oops\x00", b"\x00\x06blksize\x00512\x00", b"\x00\x03\x00\x01data"]
    with udp() as s:
        for i in range(3000):
            kind = i % 4
            if kind == 0:
                pkt = rnd.randbytes(rnd.randint(0, 600))
            elif kind == 1:
                base = rnd.choice(valid)
                pkt = base[: rnd.randint(0, len(base))]
            elif kind == 2:
                pkt = struct.pack("!H", rnd.randint(0, 9)) + rnd.randbytes(rnd.randint(0, 40))
            else:
                pkt = rrq(rnd.randbytes(8), options={b"blksize": rnd.choice([b"x", b"-1", b"0", b"99999999", b""])})
            s.sendto(pkt, ("127.0.0.1", tftp.port))
    assert tftp.alive()
    deadline = time.monotonic() + 20  # the flood's own sessions expire (bounded), then service is normal
    while tftp._sessions and time.monotonic() < deadline:
        time.sleep(0.1)
    assert download(tftp, "kernel", 1468) == KERNEL


def test_garbage_inside_a_session_is_ignored(tftp: TftpServer) -> None:
    with udp() as s:
        s.sendto(rrq(b"kernel"), ("127.0.0.1", tftp.port))
        data, peer = s.recvfrom(70000)
        assert data[:4] == b"\x00\x03\x00\x01"
        for junk in (b"", b"\x00", b"\x00\x04", b"\xff\xff\xff\xff", b"\x00\x01x\x00octet\x00", b"\x00\x04\x00\x09"):
            s.sendto(junk, peer)
        s.sendto(b"\x00\x04\x00\x01", peer)
        data, _ = s.recvfrom(70000)
        assert data[:4] == b"\x00\x03\x00\x02"
    assert tftp.alive()


def test_foreign_tid_cannot_hijack_a_session(tftp: TftpServer) -> None:
    with udp() as victim, udp() as attacker:
        victim.sendto(rrq(b"kernel"), ("127.0.0.1", tftp.port))
        data, session = victim.recvfrom(70000)
        assert data[:4] == b"\x00\x03\x00\x01"
        attacker.sendto(b"\x00\x04\x00\x01", session)  # ACK from the wrong port
        reply, _ = attacker.recvfrom(70000)
        assert struct.unpack("!HH", reply[:4]) == (5, 5)  # Unknown transfer ID
        victim.settimeout(0.3)
        with pytest.raises(socket.timeout):  # the session did not advance for the attacker's ACK
            while True:
                d, _ = victim.recvfrom(70000)
                assert d[:4] != b"\x00\x03\x00\x02"
        victim.sendto(b"\x00\x04\x00\x01", session)
        victim.settimeout(3)
        d, _ = victim.recvfrom(70000)
        assert d[:4] == b"\x00\x03\x00\x02"


def test_a_stalled_client_does_not_block_another(tftp: TftpServer) -> None:
    stalled = [udp() for _ in range(6)]
    try:
        for s in stalled:  # six clients open sessions and never ACK
            s.sendto(rrq(b"kernel", options={b"blksize": b"512"}), ("127.0.0.1", tftp.port))
        results: list[bytes] = []
        t = threading.Thread(target=lambda: results.append(download(tftp, "kernel", 8192)))
        t.start()
        t.join(timeout=30)
        assert not t.is_alive(), "a healthy client was blocked by stalled ones"
        assert results == [KERNEL]
    finally:
        for s in stalled:
            s.close()


def test_stalled_sessions_expire(tftp: TftpServer) -> None:
    with udp() as s:
        s.sendto(rrq(b"kernel"), ("127.0.0.1", tftp.port))
        s.recvfrom(70000)
        sessions_during = len(tftp._sessions)
    deadline = time.monotonic() + 10
    while tftp._sessions and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sessions_during == 1 and not tftp._sessions


def test_session_limit_answers_busy_not_crash(boot_root: Root) -> None:
    server = TftpServer(boot_root.store, "127.0.0.1", 0, timeout=5, retries=1, max_sessions=2).start()
    # three different clients (ports) on one address: the third is told "busy", the server lives on
    socks = [udp() for _ in range(3)]
    try:
        for s in socks:
            s.sendto(rrq(b"boot.ipxe"), ("127.0.0.1", server.port))
        replies = [struct.unpack("!HH", s.recvfrom(70000)[0][:4]) for s in socks]
        assert sorted(replies) == [(3, 1), (3, 1), (5, 0)]
        assert server.alive()
    finally:
        for s in socks:
            s.close()
        server.stop()


def test_one_address_cannot_take_every_session(boot_root: Root) -> None:
    server = TftpServer(boot_root.store, "127.0.0.1", 0, timeout=5, retries=1, max_per_client=3).start()
    socks = [udp() for _ in range(5)]
    try:
        for s in socks:
            s.sendto(rrq(b"boot.ipxe"), ("127.0.0.1", server.port))
        replies = [struct.unpack("!HH", s.recvfrom(70000)[0][:4]) for s in socks]
        assert sorted(replies) == [(3, 1)] * 3 + [(5, 0)] * 2
    finally:
        for s in socks:
            s.close()
        server.stop()


def test_repeated_request_from_one_tid_replaces_its_session(tftp: TftpServer) -> None:
    with udp() as s:
        for _ in range(20):
            s.sendto(rrq(b"kernel"), ("127.0.0.1", tftp.port))
            s.recvfrom(70000)
        assert len(tftp._sessions) == 1
