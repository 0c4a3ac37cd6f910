"""A per-run parent cgroup that holds the pids limit, named after the run, so a fork bomb is attributable.

Docker removes a container's own cgroup when it exits, and with it `pids.events`; a capsule that hits
its process limit and exits at once would leave no trace there. So the limit sits on a parent cgroup the
agent creates for the run (`cgroup_parent`). The kernel's once-per-cgroup "fork rejected by pids
controller in /trustcap-<run>/..." line (read by `audit.AuditReader`) names it; on cgroup v2 the parent's
`pids.events` also keeps the count after the container is gone. Docker's cgroupfs driver only.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["RunCgroup"]

_ROOT = Path("/sys/fs/cgroup")


class RunCgroup:
    def __init__(self, run_id: str, pids_limit: int, root: Path = _ROOT) -> None:
        self.name = f"trustcap-{run_id}"
        self.root = root
        pids_root = root / "pids" if (root / "pids").is_dir() else root
        self.dir = pids_root / self.name
        self.dir.mkdir()
        (self.dir / "pids.max").write_text(str(pids_limit))

    @classmethod
    def create(cls, run_id: str, pids_limit: int, driver: str) -> RunCgroup | None:
        """None when we cannot (not root, systemd driver, no pids controller): the caller polls instead."""
        if os.geteuid() != 0 or driver != "cgroupfs":
            return None
        try:
            return cls(run_id, pids_limit)
        except OSError:
            return None

    @property
    def parent(self) -> str:
        return f"/{self.name}"

    def forks_denied(self) -> int:
        try:
            for line in (self.dir / "pids.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "max":
                    return int(value)
        except (OSError, ValueError):
            return 0
        return 0

    def remove(self) -> None:
        """rmdir the run's parent in every controller (runc created it in each); empty by now."""
        for d in [self.dir, *self.root.glob(f"*/{self.name}")]:
            with contextlib.suppress(OSError):
                d.rmdir()
