"""Status conditions, cert-manager style: `lastTransitionTime` moves only when the status flips.

Why: `kubectl wait --for=condition=Ready` and every dashboard read `lastTransitionTime` as "since when is
this so". Rewriting it on each reconcile (an operator restart re-runs `resume` handlers) would make a
capsule that waited an hour look as if it had just started waiting. Reason and message may change
without a flip; they are updated in place.

The functions here are pure (the clock is a parameter) so that tests freeze time; handlers write the
returned list through `patch.status["conditions"]` (a JSON merge patch replaces the whole list, which is
why the full list is returned). Reasons are named constants below: the CRD enforces their shape, and a
Warning event mirrors every flip to False under the same reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypedDict

from trustcap.operator.errors import InvalidCondition

ConditionStatus = Literal["True", "False", "Unknown"]

# Condition types. `Ready` is always present; later stages add their own types beside it.
READY: Final = "Ready"
FUNDED: Final = "Funded"
SCHEDULED: Final = "Scheduled"
ATTESTED: Final = "Attested"
INPUTS_RELEASED: Final = "InputsReleased"
RAN: Final = "Ran"
SEALED: Final = "Sealed"
WIPED: Final = "Wiped"
RECORDED: Final = "Recorded"
#: the step conditions of a capsule, in lifecycle order (Ready summarises them)
CAPSULE_STEPS: Final = (FUNDED, SCHEDULED, ATTESTED, INPUTS_RELEASED, RAN, SEALED, WIPED, RECORDED)

# Reasons (CamelCase, as the CRD pattern and `kubectl describe` expect).
REASON_AWAITING_SCHEDULING: Final = "AwaitingScheduling"
REASON_SCHEDULED: Final = "Scheduled"
REASON_ATTESTING: Final = "Attesting"
REASON_RUNNING: Final = "Running"
REASON_SEALING: Final = "Sealing"
REASON_WIPING: Final = "Wiping"
REASON_COMPLETED: Final = "Completed"
REASON_FAILED: Final = "Failed"
REASON_WIPE_PENDING: Final = "WipePending"
# Step reasons of the capsule controller (operator/capsule.py); each names what happened or what is awaited.
REASON_AWAITING_FUNDING: Final = "AwaitingFunding"
REASON_ESCROW_MISMATCH: Final = "EscrowMismatch"
REASON_AWAITING_SEED: Final = "AwaitingSeed"
REASON_FUNDED: Final = "Funded"
REASON_AWAITING_REVEALS: Final = "AwaitingReveals"
REASON_NOT_ENOUGH_NODES: Final = "NotEnoughNodes"
REASON_SELECTED: Final = "Selected"
REASON_QUORUM_PASSED: Final = "QuorumPassed"
REASON_QUORUM_FAILED: Final = "QuorumFailed"
REASON_ROUND_EXPIRED: Final = "RoundExpired"
REASON_AWAITING_QUORUM: Final = "AwaitingQuorum"
REASON_RELEASED: Final = "Released"
REASON_INPUT_REJECTED: Final = "InputRejected"
REASON_SUCCEEDED: Final = "Succeeded"
REASON_TIMEOUT: Final = "Timeout"
REASON_RUN_FAILED: Final = "RunFailed"
REASON_DELETED: Final = "Deleted"
REASON_RESULTS_SEALED: Final = "ResultsSealed"
REASON_WIPE_PROVEN: Final = "WipeProven"
REASON_PAID: Final = "Paid"
REASON_SLASHED: Final = "Slashed"
REASON_CANCELLED: Final = "Cancelled"
REASON_AWAITING_RECORD: Final = "AwaitingRecord"
REASON_INVALID: Final = "InvalidManifest"

_REASON_RE: Final = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
_STATUSES: Final = frozenset({"True", "False", "Unknown"})
MAX_MESSAGE: Final = 32768  # the CRD's maxLength for message


class Condition(TypedDict):
    """One entry of `status.conditions` (the shape of metav1.Condition)."""

    type: str
    status: ConditionStatus
    reason: str
    message: str
    lastTransitionTime: str
    observedGeneration: int


@dataclass(frozen=True)
class ConditionUpdate:
    """Result of `set_condition`: the full new list, and what changed."""

    conditions: list[Condition]
    condition: Condition
    flipped: bool  # status differs from before (or the condition is new): lastTransitionTime moved
    changed: bool  # anything differs (status, reason, message or observedGeneration)


def utcnow() -> datetime:
    """The real clock; handlers pass it, tests pass a frozen one."""
    return datetime.now(UTC)


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with second precision, as Kubernetes writes `metav1.Time`."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime: pass an aware (UTC) time")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def get_condition(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    """The condition of that type, or None."""
    for cond in conditions or ():
        if cond.get("type") == type_:
            return cond
    return None


def is_true(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> bool:
    cond = get_condition(conditions, type_)
    return cond is not None and cond.get("status") == "True"


def set_condition(
    conditions: Sequence[Mapping[str, Any]] | None,
    *,
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    observed_generation: int,
    now: datetime,
) -> ConditionUpdate:
    """Return `conditions` with `type_` set; the order of other conditions is kept, a new one appended."""
    if status not in _STATUSES:
        raise InvalidCondition(f"condition {type_}: status must be True, False or Unknown, not {status!r}")
    if not _REASON_RE.match(reason):
        raise InvalidCondition(f"condition {type_}: reason {reason!r} is not CamelCase")
    if observed_generation < 0:
        raise InvalidCondition(f"condition {type_}: observedGeneration must be >= 0")
    message = message[:MAX_MESSAGE]
    old = get_condition(conditions, type_)
    flipped = old is None or old.get("status") != status
    stamp = format_time(now) if flipped or not old or not old.get("lastTransitionTime") \
        else str(old["lastTransitionTime"])
    new: Condition = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": stamp,
        "observedGeneration": observed_generation,
    }
    changed = old is None or any(old.get(k) != v for k, v in new.items())
    result: list[Condition] = []
    for cond in conditions or ():
        if cond.get("type") == type_:
            result.append(new)
        else:
            result.append(_copy(cond))
    if old is None:
        result.append(new)
    return ConditionUpdate(conditions=result, condition=new, flipped=flipped, changed=changed)


def _copy(cond: Mapping[str, Any]) -> Condition:
    # Conditions written by other controllers pass through untouched (no validation of theirs here).
    return dict(cond)  # type: ignore[return-value]
