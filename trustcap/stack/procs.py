"""Supervise the stack's daemons: start detached with a log and a pid file, find them again, stop them.

A pid file alone is not trusted: the pid must still run the same program (its /proc cmdline starts with
the binary we started), so a reused pid is never killed by mistake.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from trustcap.errors import StackError

__all__ = ["Daemon"]


@dataclass
class Daemon:
    name: str
    argv: list[str]
    state: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.state / "logs" / f"{self.name}.log"

    @property
    def pidfile(self) -> Path:
        return self.state / "run" / f"{self.name}.pid"

    def pid(self) -> int | None:
        """The pid of our running daemon, or None when it is not running (stale pid files are removed)."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            self.pidfile.unlink(missing_ok=True)
            return None
        zombie = stat.rsplit(")", 1)[-1].split()[0] == "Z"
        if zombie or not cmdline or cmdline[0].decode(errors="replace") != self.argv[0]:
            self.pidfile.unlink(missing_ok=True)
            return None
        return pid

    def running_argv(self) -> list[str] | None:
        """The argv our running daemon was started with (to tell whether its flags are still wanted)."""
        pid = self.pid()
        if pid is None:
            return None
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return None
        return [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")]

    def start(self) -> int:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(self.env)
        with self.log.open("ab") as fh:
            fh.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {' '.join(self.argv)}\n".encode())
            fh.flush()
            try:
                proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                    start_new_session=True, env=env, close_fds=True,
                )
            except OSError as exc:
                raise StackError(f"cannot start {self.name} ({self.argv[0]}): {exc}") from exc
        self.pidfile.write_text(str(proc.pid))
        # Until the child has exec'd, /proc shows our own interpreter: wait for the switch so that pid()
        # (which checks the program, not just the number) recognises it.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                argv0 = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except FileNotFoundError:
                break
            if argv0 == self.argv[0]:
                break
            time.sleep(0.01)
        if proc.poll() is not None:
            self.pidfile.unlink(missing_ok=True)
            raise StackError(f"{self.name} exited at once (exit {proc.returncode}); its log ({self.log}) ends with:\n"
                             f"{self.tail()}")
        # The daemon outlives this process by design; forget the child so no ResourceWarning is raised.
        proc.returncode = 0
        return proc.pid

    def stop(self, timeout: float = 15.0) -> bool:
        """SIGTERM, then SIGKILL after `timeout`; True when something was stopped."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pid() is None:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
        self.pidfile.unlink(missing_ok=True)
        return True

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
