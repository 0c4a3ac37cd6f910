"""A read-only TFTP server for the HPC link, built on tftpy's packet codec with our own session loop.

Why not `tftpy.TftpServer` as is (docs/decisions/0051-tftp-hardening.md): it serves any file that
exists below the root before asking anyone (no approval, no digest), follows symlinks out of the root
(`abspath` does not resolve them), accepts uploads, handles packets from a foreign address/port inside
a session after logging "Discarding", and lets a malformed datagram's `struct.error` or
`UnicodeDecodeError` escape `listen()`, which kills the server. Here tftpy only encodes and decodes
packets; every name goes through `ApprovedStore.fetch`, and every datagram is handled inside one
`try` so that no input can stop the loop.

    client (iPXE)                      TftpServer (main :69)            session thread + socket (new TID)
      | RRQ name [blksize,tsize] ------->|                                     |
      |                                   | store.fetch(name) -> verified bytes |
      |<------------------------------------------- OACK (or DAT 1) -----------|
      | ACK n ----------------------------------------------------------------->| peer checked (addr, port)
      |<------------------------------------------- DAT n+1 -------------------| resend on timeout,
      | ...                                                                     | drop after `retries`
      |<------------------------------------------- DAT last (< blksize) ------|
      | ACK last --------------------------------------------------------------->| session ends

Every refusal (bad path, not approved, digest mismatch, upload) answers ERR 2 "Access violation" and
does not tell which: a prober learns nothing about the root. The main socket has its own thread; each
session has a thread of its own that blocks in one `recvfrom` with a kernel receive timeout
(SO_RCVTIMEO), so one block costs one receive and one send, with no poll in between (decision 0102:
the poll was a third of the system calls and a fifth of the CPU per block). A client that stalls holds
only its own session until it expires; a flood of requests holds at most `max_per_client` sessions per
address and `max_sessions` in all (a repeated TID replaces its session).
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import Counter
from tftpy.TftpPacketFactory import TftpPacketFactory
from tftpy.TftpPacketTypes import (
    TftpPacketACK,
    TftpPacketERR,
    TftpPacketOACK,
    TftpPacketRRQ,
    TftpPacketWRQ,
)
from tftpy.TftpShared import TftpErrors

from trustcap.netboot.errors import NetbootError, ServiceError
from trustcap.netboot.store import ApprovedStore

__all__ = ["TftpServer"]

log = logging.getLogger("trustcap.netboot")

DROPPED = Counter(
    "trustcap_netboot_tftp_dropped_total", "TFTP datagrams dropped as malformed, foreign or unexpected.", ["reason"]
)
MAX_DATAGRAM = 65536
MIN_BLKSIZE, MAX_BLKSIZE = 8, 65464  # RFC 2348
_OP_DAT, _OP_ACK = 3, 4
_ACK = struct.Struct("!HH")  # RFC 1350 ACK: opcode, block; also the DAT header (opcode, block)
_TIMEVAL = struct.Struct("@ll")  # struct timeval {time_t tv_sec; suseconds_t tv_usec} on LP64 and ILP32 Linux


@dataclass(slots=True)  # slots: the session loop reads and writes these fields once per block
class _Session:
    sock: socket.socket
    peer: tuple[str, int]
    data: memoryview
    blksize: int
    block: int = 0  # last block sent (0 = OACK sent, waiting for ACK 0)
    last: list[bytes | memoryview] = field(default_factory=list)
    sent_at: float = 0.0
    tries: int = 0
    name: str = field(default="")
    final_block: int = field(init=False)
    closed: bool = False  # set (under the server's lock) by whoever ends the session; the thread then exits
    short_wait: bool = False  # the receive timeout is set to less than a full `timeout` (see _serve)
    thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        # the block shorter than blksize (empty when the size is a multiple of it) ends the transfer
        self.final_block = len(self.data) // self.blksize + 1

    def chunk(self, block: int) -> memoryview:
        start = (block - 1) * self.blksize
        return self.data[start:start + self.blksize]


_ERR_TEXT = {0: b"Server busy", 2: b"Access violation", 4: b"Illegal TFTP operation", 5: b"Unknown transfer ID"}


def _err(code: int) -> bytes:
    # Encoded here: tftpy's TftpPacketERR cannot encode code 0 ("not defined", used for "busy").
    return struct.pack("!HH", 5, code) + _ERR_TEXT.get(code, b"Error") + b"\0"


def _dat(block: int, data: bytes | memoryview) -> list[bytes | memoryview]:
    """A DAT packet as the two buffers `sendmsg` gathers: the header, and the chunk without a copy."""
    return [_ACK.pack(_OP_DAT, block % 65536), data]


@functools.cache
def _kernel_timeout_works() -> bool:
    """Whether SO_RCVTIMEO takes a `struct timeval` of two C longs here: a round trip through getsockopt
    gives back what was set (1.5 s is exact in jiffies at every HZ). Where it does not, sockets fall
    back to Python's own timeout, which is as correct but polls before every receive."""
    want = _TIMEVAL.pack(1, 500_000)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, want)
            return probe.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.size) == want
        except OSError:
            return False


def _set_receive_timeout(sock: socket.socket, seconds: float) -> None:
    """Let a receive on `sock` give up after `seconds`: in the kernel (SO_RCVTIMEO, one system call per
    receive, and a shutdown from another thread wakes it) where it works, else Python's timeout."""
    if not _kernel_timeout_works():
        sock.settimeout(seconds)
        return
    usec = max(1, round(seconds * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(usec // 1_000_000, usec % 1_000_000))


class TftpServer:
    """Serve `store` over TFTP on (bind, port) in background threads until `stop()`."""

    def __init__(
        self, store: ApprovedStore, bind: str, port: int, *, timeout: float = 1.0, retries: int = 5,
        max_sessions: int = 64, max_per_client: int = 8,
    ) -> None:
        self.store = store
        self.timeout = timeout
        self.retries = retries
        self.max_sessions = max_sessions
        self.max_per_client = max_per_client
        self._factory = TftpPacketFactory()
        self._sessions: dict[int, _Session] = {}  # by a serial number
        self._serial = itertools.count()
        self._lock = threading.Lock()  # guards _sessions and each session's `closed`
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._sock.bind((bind, port))
        except OSError as exc:
            raise ServiceError(f"TFTP cannot bind {bind}:{port}: {exc.strerror}") from exc
        # stop() wakes the main thread's receive by shutting the socket down; the timeout bounds the wait
        # where that does not wake it (Python's own socket timeout polls, and shutdown does not end the poll)
        _set_receive_timeout(self._sock, 0.2)
        self.bind = bind
        self.port: int = self._sock.getsockname()[1]
        self.completed: list[tuple[str, str]] = []  # (client, name) of finished transfers

    def start(self) -> TftpServer:
        self._thread = threading.Thread(target=self._run, name="trustcap-tftp", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the main thread's receive now
        except OSError:
            pass
        if self._thread:
            self._thread.join(timeout=5)
        with self._lock:
            live = list(self._sessions.values())
        for sess in live:
            self._close(sess)
        for sess in live:
            if sess.thread is not None:
                sess.thread.join(timeout=5)
        self._sock.close()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- main socket: requests ----------------------------------------------------------------------
    def _run(self) -> None:
        log.info("TFTP serving on %s:%d", self.bind, self.port)
        while not self._stop.is_set():
            try:
                self._on_main()
            except Exception:  # the loop must survive anything a datagram can cause
                log.exception("TFTP loop error (continuing)")
                DROPPED.labels("internal").inc()

    def _on_main(self) -> None:
        try:
            buf, peer = self._sock.recvfrom(MAX_DATAGRAM)
            if self._stop.is_set():
                return  # woken by stop()'s shutdown
        except (BlockingIOError, TimeoutError, InterruptedError):
            return
        except OSError as exc:  # e.g. ICMP port unreachable reported on the socket
            if self._stop.is_set():
                return
            log.debug("TFTP main recv error: %s", exc)
            return
        client = f"{peer[0]}:{peer[1]}"
        try:
            pkt = self._factory.parse(buf)
        except Exception:
            DROPPED.labels("malformed").inc()
            if buf[:2] == b"\x00\x01":  # an RRQ we cannot even decode is refused, not ignored
                self._sock.sendto(_err(TftpErrors.AccessViolation), peer)
            return
        if isinstance(pkt, TftpPacketWRQ):
            log.warning("TFTP upload attempt %r from %s refused (read-only)", pkt.filename[:200], client)
            DROPPED.labels("upload").inc()
            self._sock.sendto(_err(TftpErrors.AccessViolation), peer)
            return
        if not isinstance(pkt, TftpPacketRRQ):
            DROPPED.labels("unexpected").inc()
            return
        if pkt.mode not in ("octet", "netascii"):
            DROPPED.labels("mode").inc()
            self._sock.sendto(_err(TftpErrors.AccessViolation), peer)
            return
        with self._lock:
            replaced = [x for x in self._sessions.values() if x.peer == peer]
        for old in replaced:
            self._close(old)  # a new request from the same TID replaces its old session
        with self._lock:
            per_client = sum(1 for x in self._sessions.values() if x.peer[0] == peer[0])
            busy = len(self._sessions) >= self.max_sessions or per_client >= self.max_per_client
        if busy:
            DROPPED.labels("busy").inc()
            self._sock.sendto(_err(TftpErrors.NotDefined), peer)
            return
        try:
            data = self.store.fetch(pkt.filename, "tftp", client)
        except NetbootError:
            self._sock.sendto(_err(TftpErrors.AccessViolation), peer)
            return
        self._open(pkt, peer, data)

    def _open(self, pkt: TftpPacketRRQ, peer: tuple[str, int], data: bytes) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((self.bind, 0))
        except OSError:
            sock.close()
            raise
        _set_receive_timeout(sock, self.timeout)
        opts = {k.lower(): v for k, v in (pkt.options or {}).items()}
        oack: dict[str, str] = {}
        blksize = 512
        if "blksize" in opts:
            try:
                blksize = max(MIN_BLKSIZE, min(MAX_BLKSIZE, int(opts["blksize"])))
                oack["blksize"] = str(blksize)
            except ValueError:
                blksize = 512
        if "tsize" in opts:
            oack["tsize"] = str(len(data))
        sess = _Session(sock=sock, peer=peer, data=memoryview(data), blksize=blksize, name=pkt.filename)
        if oack:
            o = TftpPacketOACK()
            o.options = oack
            first = [o.encode().buffer]
        else:
            sess.block = 1
            first = _dat(1, sess.chunk(1))
        key = next(self._serial)
        sess.thread = threading.Thread(target=self._serve, args=(key, sess, first), name=f"trustcap-tftp-{key}",
                                       daemon=True)
        with self._lock:
            self._sessions[key] = sess
        sess.thread.start()

    # -- one session --------------------------------------------------------------------------------
    def _serve(self, key: int, sess: _Session, first: list[bytes | memoryview]) -> None:
        """The session's thread: send, wait for the ACK of what was sent, resend on timeout.

        The ACK of the block just sent is the one datagram of a transfer's steady state, so it is
        handled inline: at 512-byte blocks an 8 MiB image is 16384 of them, and each Python call and
        allocation on the way is paid 16384 times. Every other datagram goes through `_on_datagram`
        (tftpy's codec)."""
        sock, peer, data, blksize, final = sess.sock, sess.peer, sess.data, sess.blksize, sess.final_block
        recv_into, sendmsg = sock.recvfrom_into, sock.sendmsg
        pack, monotonic = _ACK.pack, time.monotonic
        rbuf = bytearray(MAX_DATAGRAM)  # one buffer for the session: `recvfrom` would allocate this per call
        rview = memoryview(rbuf)
        try:
            self._send(sess, first)
            while not sess.closed:
                try:
                    n, src = recv_into(rbuf)
                except (BlockingIOError, TimeoutError):  # the receive timeout: nothing came
                    if not sess.closed:
                        self._timed_out(sess)
                    continue
                except OSError as exc:
                    if sess.closed or exc.errno == errno.EBADF:
                        break
                    continue  # an ICMP error queued on the socket (the client went away): wait on
                if sess.closed:
                    break  # woken by _close's shutdown
                if n == 4 and rbuf[0] == 0 and rbuf[1] == _OP_ACK and src == peer \
                        and (rbuf[2] << 8 | rbuf[3]) == sess.block & 0xFFFF:
                    # RFC 1350 section 5: ACK = opcode 4, block number; only the block just sent advances
                    block = sess.block
                    if block == final:
                        self._finish(sess)
                        break
                    start = block * blksize
                    block += 1
                    sess.block = block
                    sess.tries = 0
                    if sess.short_wait:
                        self._wait_for(sess, self.timeout)
                    payload = sess.last = [pack(_OP_DAT, block & 0xFFFF), data[start:start + blksize]]
                    sess.sent_at = monotonic()
                    try:
                        sendmsg(payload, (), 0, peer)
                    except OSError as exc:  # resent on timeout, like a lost datagram
                        log.debug("TFTP send to %s failed: %s", peer, exc)
                    continue
                self._on_datagram(sess, bytes(rview[:n]), src)
                if sess.closed:
                    break
                # Whatever came did not advance the transfer: it must not push the resend back either,
                # or a client repeating an old ACK could hold its session forever.
                left = sess.sent_at + self.timeout - monotonic()
                if left <= 0:
                    self._timed_out(sess)
                else:
                    self._wait_for(sess, left)
        except Exception:  # a session must end cleanly whatever a datagram caused
            log.exception("TFTP session error for %s (session closed)", peer)
            DROPPED.labels("internal").inc()
        finally:
            self._close(sess)
            sock.close()  # only this thread closes its socket: its fd cannot be reused under a receive

    def _wait_for(self, sess: _Session, seconds: float) -> None:
        _set_receive_timeout(sess.sock, seconds)
        sess.short_wait = seconds < self.timeout

    def _timed_out(self, sess: _Session) -> None:
        sess.tries += 1
        if sess.tries > self.retries:
            log.warning("TFTP session %s for %s timed out", sess.peer, sess.name)
            DROPPED.labels("timeout").inc()
            self._close(sess)
            return
        if sess.short_wait:
            self._wait_for(sess, self.timeout)
        self._send(sess, sess.last)

    def _send(self, sess: _Session, payload: list[bytes | memoryview]) -> None:
        sess.last = payload
        sess.sent_at = time.monotonic()
        try:
            sess.sock.sendmsg(payload, (), 0, sess.peer)
        except OSError as exc:
            log.debug("TFTP send to %s failed: %s", sess.peer, exc)

    def _on_datagram(self, sess: _Session, buf: bytes, peer: tuple[str, int]) -> None:
        """A session datagram other than the ACK of the block just sent from its peer (`_serve` has that)."""
        if peer != sess.peer:  # RFC 1350: a foreign TID gets ERR 5 and changes nothing
            DROPPED.labels("foreign-tid").inc()
            try:
                sess.sock.sendto(_err(TftpErrors.UnknownTID), peer)
            except OSError:
                pass
            return
        try:
            pkt = self._factory.parse(buf)
        except Exception:
            DROPPED.labels("malformed").inc()
            return
        if isinstance(pkt, TftpPacketERR):
            log.info("TFTP client %s aborted %s", peer, sess.name)
            self._close(sess)
            return
        if not isinstance(pkt, TftpPacketACK):
            DROPPED.labels("unexpected").inc()
            return
        if pkt.blocknumber != sess.block % 65536:
            return  # duplicate or stale ACK: ignore (no Sorcerer's Apprentice resend)
        if sess.block == sess.final_block:
            self._finish(sess)
            return
        sess.block += 1
        sess.tries = 0
        if sess.short_wait:
            self._wait_for(sess, self.timeout)
        self._send(sess, _dat(sess.block, sess.chunk(sess.block)))

    def _finish(self, sess: _Session) -> None:
        self.completed.append((f"{sess.peer[0]}:{sess.peer[1]}", sess.name))
        self._close(sess)

    def _close(self, sess: _Session) -> None:
        """End a session from any thread: mark it closed and wake its thread, which closes the socket."""
        with self._lock:
            if sess.closed:
                return
            sess.closed = True
            for k, v in list(self._sessions.items()):
                if v is sess:
                    del self._sessions[k]
        if sess.thread is not threading.current_thread():
            # shutdown wakes a receive blocked in another thread (Linux answers ENOTCONN for an
            # unconnected UDP socket, and still wakes it)
            try:
                sess.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
