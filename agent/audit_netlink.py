"""The kernel audit netlink multicast group as an audit source: the syscall-exit records of our rules
(writes that fail with EROFS, failed opens of /dev/ paths; docs/decisions/0045) and seccomp denials,
filtered to the run's own uid. The rules themselves are installed by audit_rules.

    Executor                 AuditRules (auditctl)        kernel audit             AuditStream (netlink)
      | install(uid, key) ---> | -e 1, -b, -a exit rules --> |                          |
      | start() --------------------------------------------------------------------> | bind READLOG group
      |   capsule (uid) fails a write (EROFS) or open("/dev/..") (ENOENT/EACCES/EPERM)  |
      |                       |                              | SYSCALL+CWD+PATH+EOE --> | keep ours (key, uid)
      | drain() <------------------------------------------------------------------------ | FileEvents, seccomp
      | remove() -----------> | -D -k key, restore -e/-b     |                          |

The kernel filters by the run's own uid and the failing result; the stream keeps only records carrying the
run's key and uid, and `file_violation` keeps only EROFS (any syscall) and failed opens of a /dev/ path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
import select
import socket
import struct
import threading
from dataclasses import dataclass

from trustcap.agent.audit_kmsg import SeccompEvent, parse

__all__ = ["AuditStream", "FileEvent", "fields", "file_violation", "normalize", "parse_netlink"]

EROFS, ENOENT, EACCES, EPERM = errno.EROFS, errno.ENOENT, errno.EACCES, errno.EPERM
_ARCH = {"c000003e": "x86_64", "40000003": "i386"}
# Names of the file syscalls a write attempt can use (x86_64, then i386), to say what was attempted.
_FILE_SYSCALLS: dict[str, dict[int, str]] = {
    "x86_64": {2: "open", 257: "openat", 437: "openat2", 85: "creat", 83: "mkdir", 258: "mkdirat", 84: "rmdir",
               87: "unlink", 263: "unlinkat", 82: "rename", 264: "renameat", 316: "renameat2", 86: "link",
               265: "linkat", 88: "symlink", 266: "symlinkat", 90: "chmod", 91: "fchmod", 268: "fchmodat",
               452: "fchmodat2", 92: "chown", 93: "fchown", 94: "lchown", 260: "fchownat", 76: "truncate",
               77: "ftruncate", 132: "utime", 235: "utimes", 280: "utimensat", 261: "futimesat", 133: "mknod",
               259: "mknodat", 188: "setxattr", 189: "lsetxattr", 190: "fsetxattr", 197: "removexattr",
               198: "lremovexattr", 199: "fremovexattr"},
    "i386": {5: "open", 295: "openat", 437: "openat2", 8: "creat", 39: "mkdir", 296: "mkdirat", 40: "rmdir",
             10: "unlink", 301: "unlinkat", 38: "rename", 302: "renameat", 9: "link", 83: "symlink",
             15: "chmod", 306: "fchmodat", 182: "chown", 92: "truncate", 93: "ftruncate", 30: "utime"},
}
_OPENS = {"open", "openat", "openat2"}
_FLAGS_ARG = {"open": "a1", "openat": "a2"}  # openat2 passes its flags in memory the record does not show
_O_ACCMODE, _O_CREAT, _O_TRUNC = 0o3, 0o100, 0o1000
_FIELD = re.compile(r'(\w+)=("[^"]*"|\S+)')
_HEADER = re.compile(r"audit\((?P<ts>\d+\.\d+):(?P<serial>\d+)\):\s*")
_HEXSTR = re.compile(r"[0-9A-F]+")
_UNTRUSTED = {"name", "comm", "exe", "cwd", "key"}
_NLMSG_HDR = struct.Struct("=IHHII")
_AUDIT_SYSCALL, _AUDIT_PATH, _AUDIT_CWD, _AUDIT_EOE, _AUDIT_SECCOMP = 1300, 1302, 1307, 1320, 1326
_NETLINK_AUDIT, _AUDIT_NLGRP_READLOG = 9, 1


def fields(text: str) -> dict[str, str]:
    """The key=value fields of one audit record; quoted values unquoted, hex-encoded untrusted ones decoded."""
    out: dict[str, str] = {}
    for k, v in _FIELD.findall(text):
        if v.startswith('"'):
            v = v[1:-1]
        elif k in _UNTRUSTED and len(v) % 2 == 0 and _HEXSTR.fullmatch(v):
            v = bytes.fromhex(v).decode("utf-8", "replace")
        out.setdefault(k, v)
    return out


@dataclass(frozen=True)
class FileEvent:
    """One failed file syscall of the capsule, as the kernel recorded it (SYSCALL + CWD + PATH records)."""

    ts: float
    pid: int
    uid: int
    comm: str
    exe: str
    arch: str
    syscall: int
    exit: int
    key: str
    cwd: str = "/"
    paths: tuple[tuple[str, str], ...] = ()  # (name as passed or its directory, nametype)
    flags: int | None = None  # open flags (open: a1, openat: a2); None where the record cannot carry them

    @property
    def syscall_name(self) -> str:
        return _FILE_SYSCALLS.get(self.arch, {}).get(self.syscall, f"syscall {self.syscall} ({self.arch})")


def normalize(name: str, cwd: str) -> str:
    """An absolute, lexically clean path inside the capsule's root (relative names joined to its cwd;
    `/proc/<pid>/root` prefixes stripped, since they name the same root)."""
    path = name if name.startswith("/") else f"{cwd.rstrip('/')}/{name}"
    trailing = path.endswith("/")
    path = posixpath.normpath(re.sub(r"/+", "/", path))
    path = re.sub(r"^/proc/(?:self|thread-self|\d+)/root(?=/|$)", "", path) or "/"
    path = posixpath.normpath(path)
    return path + "/" if trailing and path != "/" else path


def file_violation(ev: FileEvent) -> tuple[str, str] | None:
    """(kind, attempted) for an attempt we report, None for the ordinary failures a program makes.

    EROFS from any syscall is a write outside scratch (only scratch is writable); so is an open for
    writing refused with EACCES/EPERM (an existing file the run's uid does not own is refused by its mode
    before the read-only mount is consulted). A failed open of a /dev/ path is a device attempt (no device
    node is there to open). Every other failure is what programs do all day: noise."""
    named = [(normalize(n, ev.cwd), t) for n, t in ev.paths if n and n != "(null)"]
    who = f"by {ev.comm} ({ev.exe})"
    if ev.exit == -EROFS:
        if not named:
            return "write", f"{ev.syscall_name} on an open file {who}"
        full = [p for p, t in named if t != "PARENT"]
        if full:
            return "write", f"{ev.syscall_name} {full[0]} {who}"
        parent = named[0][0].rstrip("/") + "/"
        return "write", f"{ev.syscall_name} entry in {parent} {who}"
    if ev.exit in (-ENOENT, -EACCES, -EPERM) and ev.syscall_name in _OPENS:
        for p, _ in named:
            if p.startswith("/dev/"):
                return "device", f"{ev.syscall_name} {p} {who}"
        writing = ev.flags is not None and bool(ev.flags & (_O_ACCMODE | _O_CREAT | _O_TRUNC))
        if ev.exit != -ENOENT and writing and named:
            return "write", f"{ev.syscall_name} {named[-1][0]} {who}"
    return None


def _event_from(records: list[tuple[int, dict[str, str]]], ts: float) -> FileEvent | None:
    sc = next((f for t, f in records if t == _AUDIT_SYSCALL), None)
    if sc is None:
        return None
    cwd = next((f.get("cwd", "/") for t, f in records if t == _AUDIT_CWD), "/")
    paths = tuple((f.get("name", ""), f.get("nametype", "")) for t, f in records if t == _AUDIT_PATH)
    try:
        arch = _ARCH.get(sc.get("arch", ""), sc.get("arch", ""))
        name = _FILE_SYSCALLS.get(arch, {}).get(int(sc["syscall"]), "")
        flags = int(sc[_FLAGS_ARG[name]], 16) if name in _FLAGS_ARG and _FLAGS_ARG[name] in sc else None
        return FileEvent(ts=ts, pid=int(sc["pid"]), uid=int(sc["uid"]), comm=sc.get("comm", ""),
                         exe=sc.get("exe", ""), arch=arch, syscall=int(sc["syscall"]), exit=int(sc["exit"]),
                         key=sc.get("key", ""), cwd=cwd, paths=paths, flags=flags)
    except (KeyError, ValueError):
        return None


def parse_netlink(data: bytes) -> list[tuple[int, str]]:
    """(type, text) of each audit message in one netlink datagram."""
    out: list[tuple[int, str]] = []
    off = 0
    while off + _NLMSG_HDR.size <= len(data):
        length, mtype, _, _, _ = _NLMSG_HDR.unpack_from(data, off)
        if length < _NLMSG_HDR.size or off + length > len(data):
            break
        out.append((mtype, data[off + _NLMSG_HDR.size:off + length].rstrip(b"\0").decode("utf-8", "replace")))
        off += (length + 3) & ~3
    return out


class AuditStream:
    """Reads the kernel's audit records from the netlink multicast group (read-only, needs CAP_AUDIT_READ).

    Why multicast, not /dev/kmsg: without an audit daemon the kernel prints audit records rate-limited
    (printk_ratelimit, ~10 per 5 s), and the ordinary ENOENT records of a starting program would crowd out
    the ones we need; the multicast group receives every record, with or without auditd.
    Keeps only records of `uid` (seccomp) or carrying `key` (our rules), folded into bounded counts."""

    def __init__(self, uid: int, key: str, *, rcvbuf: int = 8 << 20) -> None:
        self.uid, self.key, self.rcvbuf = uid, key, rcvbuf
        self.error = ""
        self.overruns = 0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r = self._wake_w = -1  # stop() wakes the reader through this pipe (made by start)
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[float, list[tuple[int, dict[str, str]]]]] = {}
        self._out: list[FileEvent | SeccompEvent] = []

    def start(self) -> bool:
        try:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_AUDIT)
            try:
                s.setsockopt(socket.SOL_SOCKET, 33, self.rcvbuf)  # SO_RCVBUFFORCE (root)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            s.bind((0, _AUDIT_NLGRP_READLOG))
            s.setblocking(False)
        except OSError as exc:
            self.error = f"cannot join the kernel audit multicast group ({exc.strerror or exc})"
            return False
        self._sock = s
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._loop, name=f"audit-{self.key}", daemon=True)
        self._thread.start()
        return True

    def _loop(self) -> None:
        """Wait for records or for `stop`'s wake-up; on stop, read what the socket still holds first, so
        that a record the kernel queued just before the run ended is counted (and stop returns at once
        instead of after a poll interval)."""
        assert self._sock is not None
        sock, wake = self._sock, self._wake_r
        stopping = False
        while True:
            if not stopping:
                ready, _, _ = select.select([sock.fileno(), wake], [], [])
                stopping = wake in ready
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                if stopping:
                    return
                continue
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # the socket overflowed: records were lost
                    self.overruns += 1
                    continue
                self.error = f"audit stream failed ({exc})"
                return
            for mtype, text in parse_netlink(data):
                self.feed(mtype, text)

    def feed(self, mtype: int, text: str) -> None:
        """One record; complete events are kept (public so recorded records can be replayed in tests)."""
        if mtype == _AUDIT_SECCOMP:
            ev = parse(f"type=1326 {text}")
            if ev is not None and ev.uid == self.uid:
                with self._lock:
                    self._out.append(ev)
            return
        m = _HEADER.match(text)
        if m is None:
            return
        serial = m["serial"]
        if mtype == _AUDIT_EOE:
            ts, recs = self._pending.pop(serial, (0.0, []))
            self._finish(ts, recs)
        elif mtype in (_AUDIT_SYSCALL, _AUDIT_CWD, _AUDIT_PATH):
            f = fields(text[m.end():])
            if mtype == _AUDIT_SYSCALL and (f.get("key") != self.key or f.get("uid") != str(self.uid)):
                return  # not ours: drop its CWD/PATH records too (they arrive after the SYSCALL record)
            if mtype != _AUDIT_SYSCALL and serial not in self._pending:
                return
            self._pending.setdefault(serial, (float(m["ts"]), []))[1].append((mtype, f))

    def _finish(self, ts: float, recs: list[tuple[int, dict[str, str]]]) -> None:
        ev = _event_from(recs, ts)
        if ev is not None and file_violation(ev) is not None:
            with self._lock:
                self._out.append(ev)

    def drain(self) -> list[FileEvent | SeccompEvent]:
        with self._lock:
            out, self._out = self._out, []
        return out

    def stop(self) -> None:
        """Stop reading; events whose EOE never came are finished as they are (never dropped)."""
        self._stop.set()
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1
        for serial in list(self._pending):
            ts, recs = self._pending.pop(serial)
            self._finish(ts, recs)
