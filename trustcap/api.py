"""The project's Kubernetes vocabulary, in one place: the API group and version, the resources' plurals
and the phases each resource moves through (docs/design.md, "Custom resources"; crds/ is the schema).

Every component imports these instead of spelling them: a phase written as a literal in the gateway or
netboot could drift from what the operator writes, and a typo would compare unequal without a word.
The phases are `StrEnum`s, so they are the very strings the CRDs hold and compare equal to them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

__all__ = ["API_VERSION", "ATTESTATIONS", "BOOTIMAGES", "CAPSULERUNS", "CAPSULES", "GATEWAYS", "GROUP",
           "HPCNODES", "VERSION", "BootImagePhase", "CapsulePhase", "GatewayPhase", "HPCNodePhase"]

GROUP: Final = "trustcap.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"

CAPSULES: Final = "capsules"
CAPSULERUNS: Final = "capsuleruns"
ATTESTATIONS: Final = "attestations"
HPCNODES: Final = "hpcnodes"
GATEWAYS: Final = "gateways"
BOOTIMAGES: Final = "bootimages"


class CapsulePhase(StrEnum):
    """`Capsule.status.phase`, written by the operator only (operator/lifecycle.py holds the transitions)."""

    PENDING = "Pending"
    SCHEDULED = "Scheduled"
    ATTESTING = "Attesting"
    RUNNING = "Running"
    SEALING = "Sealing"
    WIPING = "Wiping"
    COMPLETED = "Completed"
    FAILED = "Failed"


class HPCNodePhase(StrEnum):
    """`HPCNode.status.phase`, written by the operator only, from its own checks and the gateway's reports
    (decision 0113)."""

    REGISTERED = "Registered"
    BOOTING = "Booting"
    ENROLLED = "Enrolled"
    READY = "Ready"
    EXECUTING = "Executing"
    WIPING = "Wiping"
    QUARANTINED = "Quarantined"


class GatewayPhase(StrEnum):
    """`Gateway.status.phase`, written by the operator from the chain (operator/gateway.py)."""

    PENDING = "Pending"
    REGISTERED = "Registered"
    ACTIVE = "Active"
    OFFLINE = "Offline"
    SLASHED = "Slashed"


class BootImagePhase(StrEnum):
    """`BootImage.status.phase`, written by the operator from the chain (decision 0063)."""

    PENDING = "Pending"
    APPROVED = "Approved"
    REVOKED = "Revoked"
