"""The kernel log (`/dev/kmsg`) as an audit source: seccomp denials and the pids controller's note.

Our seccomp profile carries SECCOMP_FILTER_FLAG_LOG, so every denial is written by the kernel as an
`audit: type=1326 ... syscall=N ...` record (to the audit daemon or, without one, the kernel log). The
executor opens `/dev/kmsg` when a run starts (positioned at its end) and reads only records that arrive
during the run. An HPC runs one capsule at a time, so the records of the run window are the capsule's;
the audit timestamp is also checked against the window (docs/decisions/0040-capsule-isolation.md).
The same stream carries the pids controller's "fork rejected ... in <cgroup>" line, which names the run's
own cgroup: that is how a fork bomb is reported even when it exits before the next poll. Seccomp records
are read here only when the netlink stream (audit_netlink) is unavailable.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

from trustcap.agent.isolation import SYSCALL_KIND_X86_64

__all__ = ["AuditReader", "PidsEvent", "SeccompEvent", "parse", "parse_pids"]

_REC = re.compile(r"type=1326 audit\((?P<ts>\d+\.\d+):\d+\).*?pid=(?P<pid>\d+) comm=\"?(?P<comm>[^\" ]*)\"?"
                  r" exe=\"?(?P<exe>[^\" ]*)\"?.*? syscall=(?P<sc>\d+).*? code=0x(?P<code>[0-9a-f]+)")
_UID = re.compile(r"\suid=(?P<uid>\d+)")
_PIDS = re.compile(r"fork rejected by pids controller in (?P<path>/\S*)")
_IGNORED_SYSCALLS = {435}  # clone3 -> ENOSYS is a compatibility rule (libc falls back), not an attempt
_ACT_ALLOW = 0x7FFF0000


@dataclass(frozen=True)
class SeccompEvent:
    ts: float
    pid: int
    comm: str
    exe: str
    syscall: int
    action_code: int
    uid: int = -1

    @property
    def kind(self) -> str:
        kind, _ = SYSCALL_KIND_X86_64.get(self.syscall, ("syscall", f"syscall {self.syscall}"))
        return str(kind)

    @property
    def name(self) -> str:
        _, name = SYSCALL_KIND_X86_64.get(self.syscall, ("syscall", f"syscall {self.syscall}"))
        return str(name)


@dataclass(frozen=True)
class PidsEvent:
    """The kernel's note that a cgroup refused a fork (printed once per cgroup): a fork bomb hit its wall."""

    cgroup: str


def parse_pids(line: str) -> PidsEvent | None:
    m = _PIDS.search(line)
    return PidsEvent(m["path"]) if m else None


def parse(line: str) -> SeccompEvent | None:
    m = _REC.search(line)
    if not m:
        return None
    u = _UID.search(line)
    ev = SeccompEvent(float(m["ts"]), int(m["pid"]), m["comm"], m["exe"], int(m["sc"]), int(m["code"], 16),
                      int(u["uid"]) if u else -1)
    if ev.syscall in _IGNORED_SYSCALLS or ev.action_code == _ACT_ALLOW:
        return None
    return ev


class AuditReader:
    """Reads seccomp records that reach the kernel log after `open()`; empty (and says so) without access.
    `seccomp=False` when an `AuditStream` delivers them (each record must be counted once)."""

    def __init__(self, path: str = "/dev/kmsg") -> None:
        self.path = path
        self.seccomp = True
        self.available = False
        self._fd: int | None = None
        self._pending_pids = False

    def open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            os.lseek(self._fd, 0, os.SEEK_END)
            self.available = True
        except OSError:
            self._fd = None
            self.available = False

    def read(self, since: float) -> list[SeccompEvent | PidsEvent]:
        events: list[SeccompEvent | PidsEvent] = []
        if self._fd is None:
            return events
        while True:
            try:
                rec = os.read(self._fd, 8192)
            except BlockingIOError:
                break
            except OSError:  # EPIPE: records overwritten while we read; continue from the next one
                continue
            if not rec:
                break
            text = rec.decode("utf-8", "replace")
            if self._pending_pids:  # the cgroup path may arrive as a continuation record
                text = "fork rejected by pids controller in " + text.split(";", 1)[-1].strip()
                self._pending_pids = False
            ev = parse(text) if self.seccomp else None
            if ev is not None and ev.ts >= since:
                events.append(ev)
            pe = parse_pids(text)
            if pe is not None:
                events.append(pe)
            elif text.rstrip().endswith("fork rejected by pids controller in"):
                self._pending_pids = True
        return events

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

