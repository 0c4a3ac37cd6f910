"""The session loop's timing rules on loopback with real UDP (RFC 1350 section 2 and 4): a DAT that is not
acknowledged is sent again after the timeout, a stale ACK neither triggers a resend nor postpones one, a
session that never advances expires after `retries` resends, and concurrent transfers each get the whole
file. Decision 0102 gave each session its own thread; these are the behaviours that move must keep."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from nbtestkit import KERNEL, Root, download, rrq, udp

from trustcap.netboot.tftp import TftpServer


def _dat1(server: TftpServer) -> tuple[socket.socket, tuple[str, int]]:
    s = udp(3.0)
    s.sendto(rrq(b"kernel"), ("127.0.0.1", server.port))
    data, peer = s.recvfrom(70000)
    assert data[:4] == b"\x00\x03\x00\x01"
    return s, peer


def test_an_unacknowledged_block_is_sent_again_after_the_timeout(boot_root: Root) -> None:
    server = TftpServer(boot_root.store, "127.0.0.1", 0, timeout=0.4, retries=3).start()
    try:
        s, _ = _dat1(server)
        with s:
            t0 = time.monotonic()
            again, _ = s.recvfrom(70000)
            waited = time.monotonic() - t0
        assert again[:4] == b"\x00\x03\x00\x01" and again[4:] == KERNEL[:512]
        assert waited >= 0.3, f"resent after {waited:.2f} s, before the 0.4 s timeout"
    finally:
        server.stop()


def test_a_stale_ack_gets_no_resend(boot_root: Root) -> None:
    server = TftpServer(boot_root.store, "127.0.0.1", 0, timeout=2.0, retries=3).start()
    try:
        s, peer = _dat1(server)
        with s:
            s.sendto(struct.pack("!HH", 4, 0), peer)  # ACK of no block sent
            s.settimeout(0.5)
            with pytest.raises(TimeoutError):  # no Sorcerer's Apprentice: a stale ACK is not answered
                s.recvfrom(70000)
            s.settimeout(3)
            s.sendto(struct.pack("!HH", 4, 1), peer)  # positive control
            data, _ = s.recvfrom(70000)
            assert data[:4] == b"\x00\x03\x00\x02"
    finally:
        server.stop()


def test_repeating_a_stale_ack_cannot_keep_a_session_alive(boot_root: Root) -> None:
    """A client that sends an old ACK more often than the timeout must still see resends and expiry:
    each datagram wakes the session's receive, and waiting a full timeout again after each would
    postpone the resend forever."""
    server = TftpServer(boot_root.store, "127.0.0.1", 0, timeout=0.5, retries=2).start()
    try:
        s, peer = _dat1(server)
        resends = 0
        with s:
            s.settimeout(0.05)
            deadline = time.monotonic() + 4.0
            while time.monotonic() < deadline and server._sessions:
                s.sendto(struct.pack("!HH", 4, 0), peer)
                try:
                    data, _ = s.recvfrom(70000)
                    resends += data[:4] == b"\x00\x03\x00\x01"
                except TimeoutError:
                    pass
                time.sleep(0.15)
        assert resends == 2, f"{resends} resends of block 1 (retries=2)"
        assert not server._sessions, "a session kept alive by stale ACKs never expired"
    finally:
        server.stop()


def test_concurrent_transfers_each_get_the_whole_file(tftp: TftpServer) -> None:
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda bs=bs: results.append(download(tftp, "kernel", bs)))
               for bs in (512, 1024, 1468, 8192, None, 512)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [KERNEL] * len(threads)
    # a client is done once it sent its last ACK; the server drops the session when that ACK arrives,
    # on its own thread, so give it a moment (on a loaded machine the assertion ran first, a flake in CI)
    deadline = time.monotonic() + 10.0
    while tftp._sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not tftp._sessions, f"sessions left after every transfer completed: {list(tftp._sessions.values())}"


def test_stop_ends_live_sessions_promptly(boot_root: Root) -> None:
    server = TftpServer(boot_root.store, "127.0.0.1", 0, timeout=5.0, retries=5).start()
    socks = [_dat1(server)[0] for _ in range(3)]
    try:
        threads = [sess.thread for sess in server._sessions.values()]
        t0 = time.monotonic()
        server.stop()
        took = time.monotonic() - t0
        assert all(t is not None and not t.is_alive() for t in threads)
        assert took < 2.5, f"stop took {took:.1f} s with 5 s session timeouts: the receives were not woken"
        assert not server.alive()
    finally:
        for s in socks:
            s.close()
