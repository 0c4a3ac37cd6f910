"""A read-only TFTP server for the HPC link, built on tftpy's packet codec with our own session loop.

Why not `tftpy.TftpServer` as is (docs/decisions/0051-tftp-hardening.md): it serves any file that
exists below the root before asking anyone (no approval, no digest), follows symlinks out of the root
(`abspath` does not resolve them), accepts uploads, handles packets from a foreign address/port inside
a session after logging "Discarding", and lets a malformed datagram's `struct.error` or
`UnicodeDecodeError` escape `listen()`, which kills the server. Here tftpy only encodes and decodes
packets; every name goes through `ApprovedStore.fetch`, and every datagram is handled inside one
`try` so that no input can stop the loop.

    client (iPXE)                      TftpServer (main :69)            session socket (new TID)
      | RRQ name [blksize,tsize] ------->|                                     |
      |                                   | store.fetch(name) -> verified bytes |
      |<------------------------------------------- OACK (or DAT 1) -----------|
      | ACK n ----------------------------------------------------------------->| peer checked (addr, port)
      |<------------------------------------------- DAT n+1 -------------------| resend on timeout,
      | ...                                                                     | drop after `retries`
      |<------------------------------------------- DAT last (< blksize) ------|
      | ACK last --------------------------------------------------------------->| session ends

Every refusal (bad path, not approved, digest mismatch, upload) answers ERR 2 "Access violation" and
does not tell which: a prober learns nothing about the root. One thread, non-blocking sockets, and a
per-session deadline: a client that stalls holds only its own session until it expires; a flood of
requests holds at most `max_per_client` sessions per address (a repeated TID replaces its session).
"""

from __future__ import annotations

import logging
import select
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
_EXPIRE_EVERY = 0.05  # s: resend and expiry are checked this often, not after every datagram


@dataclass
class _Session:
    sock: socket.socket
    peer: tuple[str, int]
    data: memoryview
    blksize: int
    block: int = 0  # last block sent (0 = OACK sent, waiting for ACK 0)
    last: list[bytes | memoryview] = field(default_factory=list)
    sent_at: float = 0.0
    tries: int = 0
    done: bool = False
    name: str = field(default="")

    def chunk(self, block: int) -> memoryview:
        start = (block - 1) * self.blksize
        return self.data[start:start + self.blksize]

    @property
    def final_block(self) -> int:
        return len(self.data) // self.blksize + 1


_ERR_TEXT = {0: b"Server busy", 2: b"Access violation", 4: b"Illegal TFTP operation", 5: b"Unknown transfer ID"}


def _err(code: int) -> bytes:
    # Encoded here: tftpy's TftpPacketERR cannot encode code 0 ("not defined", used for "busy").
    return struct.pack("!HH", 5, code) + _ERR_TEXT.get(code, b"Error") + b"\0"


def _dat(block: int, data: bytes | memoryview) -> list[bytes | memoryview]:
    """A DAT packet as the two buffers `sendmsg` gathers: the header, and the chunk without a copy."""
    return [_ACK.pack(_OP_DAT, block % 65536), data]


class TftpServer:
    """Serve `store` over TFTP on (bind, port) in a background thread until `stop()`."""

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
        self._sessions: dict[int, _Session] = {}  # by the session socket's fd
        # epoll itself, not `selectors`: one TFTP block is one wake-up, and the selectors layer's
        # per-event objects cost as much as the rest of the block's handling.
        self._poll = select.epoll()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._sock.bind((bind, port))
        except OSError as exc:
            raise ServiceError(f"TFTP cannot bind {bind}:{port}: {exc.strerror}") from exc
        self._sock.setblocking(False)
        self.bind = bind
        self.port: int = self._sock.getsockname()[1]
        self._poll.register(self._sock.fileno(), select.EPOLLIN)
        self.completed: list[tuple[str, str]] = []  # (client, name) of finished transfers

    def start(self) -> TftpServer:
        self._thread = threading.Thread(target=self._run, name="trustcap-tftp", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        for sess in list(self._sessions.values()):
            self._close(sess)
        self._poll.close()
        self._sock.close()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- loop ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        log.info("TFTP serving on %s:%d", self.bind, self.port)
        main = self._sock.fileno()
        wait = min(0.2, self.timeout / 2)
        checked = time.monotonic()
        while not self._stop.is_set():
            try:
                for fd, _ in self._poll.poll(wait):
                    if fd == main:
                        self._on_main()
                    else:
                        sess = self._sessions.get(fd)
                        if sess:
                            self._on_session(sess)
                now = time.monotonic()
                if now - checked >= _EXPIRE_EVERY:
                    checked = now
                    self._expire(now)
            except Exception:  # the loop must survive anything a datagram can cause
                log.exception("TFTP loop error (continuing)")
                DROPPED.labels("internal").inc()

    def _on_main(self) -> None:
        try:
            buf, peer = self._sock.recvfrom(MAX_DATAGRAM)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # e.g. ICMP port unreachable reported on the socket
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
        for old in [x for x in self._sessions.values() if x.peer == peer]:
            self._close(old)  # a new request from the same TID replaces its old session
        per_client = sum(1 for x in self._sessions.values() if x.peer[0] == peer[0])
        if len(self._sessions) >= self.max_sessions or per_client >= self.max_per_client:
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
        sock.bind((self.bind, 0))
        sock.setblocking(False)
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
        self._sessions[sock.fileno()] = sess
        self._poll.register(sock.fileno(), select.EPOLLIN)
        if oack:
            o = TftpPacketOACK()
            o.options = oack
            self._send(sess, [o.encode().buffer])
        else:
            sess.block = 1
            self._send(sess, _dat(1, sess.chunk(1)))

    def _send(self, sess: _Session, payload: list[bytes | memoryview]) -> None:
        sess.last = payload
        sess.sent_at = time.monotonic()
        try:
            sess.sock.sendmsg(payload, (), 0, sess.peer)
        except OSError as exc:
            log.debug("TFTP send to %s failed: %s", sess.peer, exc)

    def _on_session(self, sess: _Session) -> None:
        try:
            buf, peer = sess.sock.recvfrom(MAX_DATAGRAM)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        if peer != sess.peer:  # RFC 1350: a foreign TID gets ERR 5 and changes nothing
            DROPPED.labels("foreign-tid").inc()
            try:
                sess.sock.sendto(_err(TftpErrors.UnknownTID), peer)
            except OSError:
                pass
            return
        if len(buf) == 4 and buf[1] == _OP_ACK and buf[0] == 0:
            # The one packet of the hot path, 4 bytes, decoded in place (RFC 1350 section 5); anything
            # else goes through tftpy's codec below.
            blocknumber = _ACK.unpack(buf)[1]
        else:
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
            blocknumber = pkt.blocknumber
        if blocknumber != sess.block % 65536:
            return  # duplicate or stale ACK: ignore (no Sorcerer's Apprentice resend)
        if sess.block == sess.final_block:
            self.completed.append((f"{peer[0]}:{peer[1]}", sess.name))
            self._close(sess)
            return
        sess.block += 1
        sess.tries = 0
        self._send(sess, _dat(sess.block, sess.chunk(sess.block)))

    def _expire(self, now: float) -> None:
        for sess in list(self._sessions.values()):
            if now - sess.sent_at < self.timeout:
                continue
            sess.tries += 1
            if sess.tries > self.retries:
                log.warning("TFTP session %s for %s timed out", sess.peer, sess.name)
                DROPPED.labels("timeout").inc()
                self._close(sess)
            else:
                self._send(sess, sess.last)

    def _close(self, sess: _Session) -> None:
        fd = sess.sock.fileno()
        if self._sessions.pop(fd, None) is not None:
            try:
                self._poll.unregister(fd)
            except (OSError, ValueError):
                pass
        sess.sock.close()
