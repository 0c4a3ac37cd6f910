"""The Capsule lifecycle: phases, the transitions allowed between them, and what each phase says in `Ready`.

Why a table: every later stage (scheduler, attestation rounds, executor, sealing, wipe) moves a Capsule
one step. Keeping the allowed steps in one place lets a handler refuse a step that would skip the wipe,
and lets the tests prove that no path from an executor-touching phase reaches the end without it::

    Pending ──► Scheduled ──► Attesting ──► Running ──► Sealing ──► Wiping ──► Completed
       │            │             │            │           │           │
       └──► Failed ◄┘             └────────────┴───────────┴──► Wiping └──► Failed

Before an executor holds anything (Pending, Scheduled) a capsule may fail at once. From Attesting on,
the executor may hold the image, decrypted inputs or results, so every way out goes through Wiping
(seed: "return the whole system stat to the original stat before execution").
Completed and Failed are final; the CRD also refuses to move a status out of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from trustcap.api import CapsulePhase
from trustcap.operator import conditions as cond
from trustcap.operator.errors import InvalidTransition

Phase = CapsulePhase  # the vocabulary lives in trustcap/api.py; the transitions live here


TRANSITIONS: Final[Mapping[Phase, frozenset[Phase]]] = {
    Phase.PENDING: frozenset({Phase.SCHEDULED, Phase.FAILED}),
    Phase.SCHEDULED: frozenset({Phase.ATTESTING, Phase.FAILED}),
    Phase.ATTESTING: frozenset({Phase.RUNNING, Phase.WIPING}),
    Phase.RUNNING: frozenset({Phase.SEALING, Phase.WIPING}),
    Phase.SEALING: frozenset({Phase.WIPING}),
    Phase.WIPING: frozenset({Phase.COMPLETED, Phase.FAILED}),
    Phase.COMPLETED: frozenset(),
    Phase.FAILED: frozenset(),
}

TERMINAL: Final = frozenset({Phase.COMPLETED, Phase.FAILED})

# Phases in which an executor may hold capsule data: the object must not go away before the wipe is proven.
HOLDS_DATA: Final = frozenset({Phase.ATTESTING, Phase.RUNNING, Phase.SEALING, Phase.WIPING})

# What `Ready` says in each phase: (status, reason, message). Ready means "the capsule has done its job".
READY_BY_PHASE: Final[Mapping[Phase, tuple[cond.ConditionStatus, str, str]]] = {
    Phase.PENDING: ("False", cond.REASON_AWAITING_SCHEDULING,
                    "waiting for the VRF sortition to select an executor and a committee"),
    Phase.SCHEDULED: ("False", cond.REASON_SCHEDULED, "executor committed; waiting for the pre-run attestation"),
    Phase.ATTESTING: ("False", cond.REASON_ATTESTING, "the committee is attesting the executor"),
    Phase.RUNNING: ("False", cond.REASON_RUNNING, "the function is running on an attested executor"),
    Phase.SEALING: ("False", cond.REASON_SEALING, "sealing the result to its recipients"),
    Phase.WIPING: ("False", cond.REASON_WIPING, "wiping the executor and proving the wipe"),
    Phase.COMPLETED: ("True", cond.REASON_COMPLETED, "results sealed and delivered; executor wiped"),
    Phase.FAILED: ("False", cond.REASON_FAILED, "the capsule failed"),
}


def parse_phase(value: object) -> Phase | None:
    """The phase in a status, None when absent; an unknown value is refused (the CRD enum forbids it)."""
    if value is None or value == "":
        return None
    try:
        return Phase(str(value))
    except ValueError:
        raise InvalidTransition(f"status.phase: unknown phase {value!r}") from None


def check_transition(old: Phase | None, new: Phase) -> None:
    """Raise InvalidTransition unless old -> new is a step of the lifecycle (None -> Pending starts it)."""
    if old is None:
        if new is not Phase.PENDING:
            raise InvalidTransition(f"a new capsule starts in Pending, not {new}")
        return
    if old == new:
        return
    if new not in TRANSITIONS[old]:
        raise InvalidTransition(f"status.phase: {old} cannot move to {new}")


@dataclass(frozen=True)
class StatusChange:
    """What a handler writes to `status` (merge patch), and whether a Warning event must mirror it."""

    phase: Phase
    observed_generation: int
    conditions: list[cond.Condition]
    ready: cond.Condition
    warn: bool


def move_to(
    status: Mapping[str, Any] | None,
    new: Phase,
    *,
    generation: int,
    now: datetime,
    message: str | None = None,
) -> StatusChange | None:
    """Move a Capsule's status to `new`; None when it is already there (the idempotent no-op)."""
    status = status or {}
    old = parse_phase(status.get("phase"))
    check_transition(old, new)
    ready_status, reason, default_message = READY_BY_PHASE[new]
    conditions: Sequence[Mapping[str, Any]] = status.get("conditions") or []
    update = cond.set_condition(
        conditions, type_=cond.READY, status=ready_status, reason=reason,
        message=message or default_message, observed_generation=generation, now=now,
    )
    if old == new and not update.changed and status.get("observedGeneration") == generation:
        return None
    return StatusChange(
        phase=new, observed_generation=generation, conditions=update.conditions, ready=update.condition,
        warn=update.flipped and ready_status == "False",
    )


def admit(status: Mapping[str, Any] | None, *, generation: int, now: datetime) -> StatusChange | None:
    """A new (or resumed) Capsule: put it in Pending unless a later stage already moved it on."""
    phase = parse_phase((status or {}).get("phase"))
    if phase is not None and phase is not Phase.PENDING:
        return None  # a later stage owns it now; admission must never move it back
    return move_to(status, Phase.PENDING, generation=generation, now=now)
