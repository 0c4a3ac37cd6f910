"""The syscall-exit audit rules of one run, through `auditctl` (docs/decisions/0045).

The sequence with the stream that reads what they record is drawn in audit_netlink.

Rules are keyed `trustcap-<run>`, so a run's rules are removed by key and stale ones of a run that is
gone can be found and purged; the audit settings the rules need are restored as they were found.
A run's settings and rules go to the kernel in one `auditctl -R <file>` (one process, not one per
rule: the launch paid ~3.5 ms per auditctl, decision 0102); auditctl stops at the first line it
refuses and exits non-zero, and the caller then removes whatever came in before it, by key.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence

__all__ = ["KEY_PREFIX", "AuditRules", "Runner", "load", "rule_args", "rule_keys", "status"]

KEY_PREFIX = "trustcap-"
EROFS, ENOENT, EACCES, EPERM = errno.EROFS, errno.ENOENT, errno.EACCES, errno.EPERM

Runner = Callable[[list[str]], str]


def _auditctl(args: list[str]) -> str:
    """Run auditctl (our one wrapper around it; tests fake this callable, never subprocess)."""
    exe = shutil.which("auditctl")
    if exe is None:
        raise FileNotFoundError("auditctl is not installed (Debian package auditd)")
    done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise OSError(f"auditctl {' '.join(args)}: {(done.stderr or done.stdout).strip()[:200]}")
    return done.stdout


def rule_args(uid: int, key: str) -> list[list[str]]:
    """The syscall-exit rules of one run: both ABIs (an x86_64 process can make i386 syscalls)."""
    rules: list[list[str]] = []
    for arch in ("b64", "b32"):
        base = ["-a", "always,exit", "-F", f"arch={arch}", "-F", f"uid={uid}"]
        rules.append([*base, "-S", "all", "-F", f"exit=-{EROFS}", "-k", key])
        opens = "open,openat,openat2"
        for err in (ENOENT, EACCES, EPERM):
            rules.append([*base, "-S", opens, "-F", f"exit=-{err}", "-k", key])
    return rules


def status(run: Runner = _auditctl) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in run(["-s"]).splitlines():
        k, _, v = line.partition(" ")
        if v.strip().lstrip("-").isdigit():
            out[k] = int(v)
    return out


def _keys_in(listing: str) -> set[str]:
    return set(re.findall(rf"key=({re.escape(KEY_PREFIX)}[0-9a-f]+)", listing))


def rule_keys(run: Runner = _auditctl) -> set[str]:
    """The keys of our rules now in the kernel (`trustcap-<run>`), to prove none leak and purge stale ones."""
    return _keys_in(run(["-l"]))


def load(commands: Sequence[Sequence[str]], run: Runner = _auditctl) -> None:
    """Give auditctl several commands (settings, rules) in one process: `auditctl -R` of a rules file
    with one command per line, in order. Raises like `run` when auditctl refuses a line; the lines
    before it are in effect then (auditctl stops there), which the caller must undo."""
    if not commands:
        return
    for cmd in commands:
        for arg in cmd:
            # auditctl splits a rules line on blanks and knows no quoting: an argument with a blank or
            # a newline would become other arguments or another command
            if not arg or any(c.isspace() for c in arg):
                raise ValueError(f"auditctl argument {arg!r} is empty or holds a blank: it cannot go in a rules file")
    fd, path = tempfile.mkstemp(prefix="trustcap-audit-", suffix=".rules")  # 0600, ours
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(" ".join(cmd) + "\n" for cmd in commands))
        run(["-R", path])
    finally:
        os.unlink(path)


class AuditRules:
    """Installs one run's rules and removes them, leaving the audit settings as they were found."""

    BACKLOG = 8192

    def __init__(self, uid: int, key: str, run: Runner = _auditctl) -> None:
        self.uid, self.key, self.run = uid, key, run
        self.installed = False
        self.lost_before = 0
        self._restore: list[list[str]] = []

    def install(self) -> str:
        """'' when the rules are in, else the reason reporting is degraded (nothing half-installed)."""
        try:
            st = status(self.run)
            if st.get("enabled") == 2:
                return "kernel audit configuration is locked (enabled 2): rules cannot be added"
            if "enabled" not in st:
                return "kernel audit status unreadable"
            settings: list[list[str]] = []
            if st["enabled"] == 0:
                settings.append(["-e", "1"])
                self._restore.append(["-e", "0"])
            if 0 < st.get("backlog_limit", 0) < self.BACKLOG:
                settings.append(["-b", str(self.BACKLOG)])
                self._restore.append(["-b", str(st["backlog_limit"])])
            self.lost_before = st.get("lost", 0)
            self.installed = True
            load([*settings, *rule_args(self.uid, self.key)], self.run)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            self.remove()
            return f"kernel audit unavailable: {exc}"
        return ""

    def remove(self) -> list[str]:
        """Delete our rules (by key) and restore settings; returns problems (empty when clean)."""
        problems: list[str] = []
        if self.installed:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self.run(["-D", "-k", self.key])
        # One listing answers both questions: are ours gone, and are another run's rules live?
        keys: set[str] | None = None
        try:
            keys = rule_keys(self.run)
        except (OSError, subprocess.SubprocessError) as exc:
            if self.installed:
                problems.append(f"audit rules could not be listed after the run: {exc}")
        if self.installed and keys is not None and self.key in keys:
            problems.append(f"audit rules {self.key} could not be removed")
        others = bool(keys)
        for args in reversed(self._restore):  # one by one: a refused setting must not skip the next
            if args[0] == "-e" and others:
                continue  # another run's rules are live: leave audit on for it
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self.run(args)
        self._restore = []
        self.installed = False
        return problems

    def remove_key(self) -> None:
        """Delete every rule carrying this key (stale rules of a run that is gone)."""
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            self.run(["-D", "-k", self.key])

    def lost_since_install(self) -> int:
        try:
            return max(0, status(self.run).get("lost", 0) - self.lost_before)
        except (OSError, subprocess.SubprocessError):
            return 0
