"""One-time enrolment tokens: how a freshly netbooted HPC's boot key is bound to its node.

The gateway mints a token per boot and puts it on the kernel command line it serves
(`trustcap.token=...`, the netboot component). The agent makes its key pair at boot and presents the
token once, with the boot-image digest; the gateway binds that key to the node and burns the token. A
second use, an unknown token, an expired one or a boot digest the gateway does not serve is refused.

A node has one boot key at a time: a new enrolment replaces the node's earlier key (that boot is over;
its key must not reconnect), and `revoke` forgets a node's key and unused tokens at once (the `reboot`
wipe, gateway/boot.py). `on_enrolled` hooks see every enrolment (BootArming disarms the token file).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from trustcap.gateway.errors import EnrolmentRefused

__all__ = ["Enrolment", "TokenBook"]


@dataclass(frozen=True)
class Enrolment:
    node_id: str
    agent_key: str  # 0x-hex compressed secp256k1
    boot_digest: str
    enrolled_at: float


class TokenBook:
    """Tokens waiting to be used, and the keys they enrolled. Thread-safe; time injected for tests."""

    def __init__(self, allowed_boot_digests: Iterable[str], *, ttl_seconds: float = 900,
                 clock: Callable[[], float] = time.time) -> None:
        self.allowed = {d.lower() for d in allowed_boot_digests}
        self.ttl = ttl_seconds
        self.clock = clock
        self._pending: dict[str, tuple[str, float]] = {}
        self._used: set[str] = set()
        self.enrolled: dict[str, Enrolment] = {}
        self.on_enrolled: list[Callable[[Enrolment], None]] = []
        self._lock = threading.Lock()

    def issue(self, node_id: str) -> str:
        token = secrets.token_hex(16)
        with self._lock:
            self._pending[token] = (node_id, self.clock())
        return token

    def _valid(self, token: str, node_id: str, boot_digest: str) -> str:
        """The pending token that `token` is, if it may enrol `node_id` booted from `boot_digest`; caller
        holds the lock. EnrolmentRefused names what was wrong."""
        if token in self._used:
            raise EnrolmentRefused("enrolment token was already used (a token enrols one boot key once)")
        match = next((t for t in self._pending if hmac.compare_digest(t, token)), None)
        if match is None:
            raise EnrolmentRefused("enrolment token is unknown to this gateway")
        want_node, issued = self._pending[match]
        if self.clock() - issued > self.ttl:
            del self._pending[match]
            raise EnrolmentRefused(f"enrolment token expired ({self.ttl:g} s)")
        if want_node != node_id:
            raise EnrolmentRefused(f"enrolment token is for node {want_node!r}, not {node_id!r}")
        if boot_digest.lower() not in self.allowed:
            raise EnrolmentRefused(f"boot image {boot_digest} is not one this gateway serves")
        return match

    def check(self, token: str, node_id: str, boot_digest: str) -> None:
        """Would `enrol` accept this token? Changes nothing: the handshake asks before it answers a HELLO,
        and enrols only once the agent's FINISHED proved the key live (a HELLO alone commits nothing)."""
        with self._lock:
            self._valid(token, node_id, boot_digest)

    def enrol(self, token: str, node_id: str, agent_key: str, boot_digest: str) -> Enrolment:
        """Burn `token` and bind `agent_key` to `node_id`; EnrolmentRefused names what was wrong."""
        with self._lock:
            match = self._valid(token, node_id, boot_digest)
            del self._pending[match]
            self._used.add(match)
            e = Enrolment(node_id, agent_key, boot_digest.lower(), self.clock())
            for key in [k for k, old in self.enrolled.items() if old.node_id == node_id]:
                del self.enrolled[key]  # the node's earlier boot is over: its key never reconnects
            self.enrolled[agent_key] = e
        for hook in list(self.on_enrolled):
            hook(e)
        return e

    def revoke(self, node_id: str) -> tuple[list[str], int]:
        """Forget the node's enrolled boot key(s) and its unused tokens: (keys revoked, tokens dropped)."""
        with self._lock:
            keys = [k for k, e in self.enrolled.items() if e.node_id == node_id]
            for k in keys:
                del self.enrolled[k]
            return keys, self._drop_pending(node_id)

    def drop_pending(self, node_id: str) -> int:
        """Drop the node's unused tokens (its boot has enrolled: no second enrolment from that boot)."""
        with self._lock:
            return self._drop_pending(node_id)

    def _drop_pending(self, node_id: str) -> int:
        toks = [t for t, (n, _) in self._pending.items() if n == node_id]
        for t in toks:
            del self._pending[t]
        return len(toks)

    def lookup(self, agent_key: str, node_id: str) -> Enrolment | None:
        with self._lock:
            e = self.enrolled.get(agent_key)
        return e if e is not None and e.node_id == node_id else None
