"""One attempt a capsule made that its isolation stopped: the one shape every reporter uses.

The agent's executor counts what the kernel saw (seccomp, audit rules, the pids controller) and the
gateway's egress guard counts what nftables dropped on the HPC link; both report `Violation`s, so a
run's report folds them together without translating one into the other.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Violation"]


@dataclass(frozen=True)
class Violation:
    """What kind (`egress`, `syscall`, `write`, `device`, ...), what was attempted, who saw it, how often."""

    kind: str
    attempted: str
    source: str
    count: int = 1
