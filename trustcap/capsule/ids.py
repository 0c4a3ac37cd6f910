"""The identities of a capsule and of its one run (docs/decisions/0090-capsule-lifecycle-protocol.md).

Why two ids: an input owner must bind its envelope before the Capsule object exists, so the capsule id
depends only on what the owner knows (namespace and name). The task id, which the escrow, the reveals and
every round name, must be unique per object and unknowable before it exists, so it adds the API
server's uid: a deleted and re-applied capsule is a new task, and nobody can fund or grind it early.
"""

from __future__ import annotations

import hashlib

from trustcap import canonical
from trustcap.capsule.errors import CapsuleError

__all__ = ["CAPSULE_DOMAIN", "TASK_DOMAIN", "capsule_id", "task_id"]

CAPSULE_DOMAIN = "trustcap/capsule/v1"
TASK_DOMAIN = "trustcap/task/v1"


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 253:
        raise CapsuleError(f"{what} must be a non-empty string of at most 253 characters, got {value!r}")
    return value


def capsule_id(namespace: str, name: str) -> bytes:
    """sha256(canonical{domain, namespace, name}): 32 bytes, known to an owner before the capsule exists."""
    doc = {"domain": CAPSULE_DOMAIN, "namespace": _text(namespace, "namespace"), "name": _text(name, "name")}
    return hashlib.sha256(canonical.encode(doc)).digest()


def task_id(capsule_id: bytes, uid: str) -> bytes:
    """sha256(canonical{domain, capsule: 0x-hex, uid}): the bytes32 the escrow and every round name."""
    if not isinstance(capsule_id, bytes) or len(capsule_id) != 32:
        raise CapsuleError("capsule id must be 32 bytes")
    doc = {"domain": TASK_DOMAIN, "capsule": "0x" + capsule_id.hex(), "uid": _text(uid, "uid")}
    return hashlib.sha256(canonical.encode(doc)).digest()
