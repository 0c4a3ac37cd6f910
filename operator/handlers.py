"""kopf handlers: the walking skeleton of the Capsule lifecycle.

A new Capsule is admitted: status.phase becomes Pending with a `Ready=False/AwaitingScheduling`
condition and `observedGeneration`, mirrored by a Warning event. Later stages (scheduler, attestation,
executor, sealing, wipe) each add a handler that calls `lifecycle.move_to` for their step; the table in
`lifecycle` refuses any step that would skip the wipe.

    user            kube-apiserver                 operator (this module)
     │ apply Capsule     │                                │
     ├──────────────────►│ create (CRD schema + CEL)      │
     │                   ├──── watch event: ADDED ───────►│ add finalizer trustcap.io/cleanup
     │                   │◄──── patch metadata ───────────┤
     │                   ├──── watch event ──────────────►│ admit_capsule: lifecycle.admit()
     │                   │◄──── patch status (Pending) ───┤ + Warning event AwaitingScheduling
     │ delete Capsule    │                                │
     ├──────────────────►│ deletionTimestamp set          │
     │                   ├──── watch event ──────────────►│ release_capsule: wait while an executor
     │                   │◄──── remove finalizer ─────────┤ may hold its data (until wiped)

Every handler is idempotent: it reads the current status and writes only the difference, so an operator
killed at any line resumes (`on.resume`) and does the same thing again, or nothing. kopf keeps its own
bookkeeping in `kopf.trustcap.io/*` annotations (our status schema has no room for it, by design).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final

import kopf
from trustcap.operator import conditions, lifecycle
from trustcap.operator.errors import OperatorError

GROUP: Final = "trustcap.io"
VERSION: Final = "v1alpha1"
FINALIZER: Final = "trustcap.io/cleanup"
KOPF_PREFIX: Final = "kopf.trustcap.io"

# Finite everywhere: a handler that cannot finish in time fails permanently and says so in its status.
ADMIT_TIMEOUT_S: Final = 60.0
ADMIT_RETRIES: Final = 10
RELEASE_TIMEOUT_S: Final = 3600.0  # an executor must finish its wipe within this; then deletion proceeds
RELEASE_POLL_S: Final = 5.0



@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Name kopf's state after our API group and bound every network wait."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=KOPF_PREFIX, key="last-handled-configuration",
    )
    settings.posting.level = logging.WARNING  # events are ours (Warnings mirror False conditions), not log lines
    settings.networking.request_timeout = 30.0
    settings.networking.connect_timeout = 10.0
    # An int, not 300.0: kopf puts it in the URL as timeoutSeconds and the API server refuses "300.0".
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330.0
    settings.watching.connect_timeout = 10.0


def _apply(change: lifecycle.StatusChange, body: kopf.Body, patch: kopf.Patch, logger: Any) -> None:
    patch.status["phase"] = str(change.phase)
    patch.status["observedGeneration"] = change.observed_generation
    patch.status["conditions"] = change.conditions
    ready = change.ready
    logger.info("phase %s, Ready=%s (%s)", change.phase, ready["status"], ready["reason"])
    if change.warn:
        kopf.warn(body, reason=ready["reason"], message=ready["message"])


@kopf.on.resume(GROUP, VERSION, "capsules", timeout=ADMIT_TIMEOUT_S, retries=ADMIT_RETRIES, backoff=2)
@kopf.on.create(GROUP, VERSION, "capsules", timeout=ADMIT_TIMEOUT_S, retries=ADMIT_RETRIES, backoff=2)
def admit_capsule(
    body: kopf.Body, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch, logger: kopf.Logger, **_: Any,
) -> None:
    """Put a new Capsule in Pending; on resume, repair a missing condition and otherwise do nothing."""
    try:
        change = lifecycle.admit(status, generation=int(meta.get("generation") or 0), now=conditions.utcnow())
    except OperatorError as exc:
        raise kopf.PermanentError(str(exc)) from exc
    if change is None:
        logger.debug("capsule already admitted (phase %s)", status.get("phase"))
        return
    _apply(change, body, patch, logger)


@kopf.on.delete(GROUP, VERSION, "capsules", timeout=RELEASE_TIMEOUT_S, backoff=RELEASE_POLL_S)
def release_capsule(status: kopf.Status, logger: kopf.Logger, **_: Any) -> None:
    """Keep a Capsule while an executor may still hold its data; the finalizer is its guard.

    Deleting the object must not hide an unfinished run: the wipe proof and the chain record belong to it.
    """
    phase = _phase_or_none(status)
    if phase in lifecycle.HOLDS_DATA:
        raise kopf.TemporaryError(
            f"capsule is {phase}: deletion waits until the executor is wiped", delay=RELEASE_POLL_S,
        )
    logger.info("capsule released (phase %s)", phase or "none")


def _phase_or_none(status: Mapping[str, Any]) -> lifecycle.Phase | None:
    try:
        return lifecycle.parse_phase(status.get("phase"))
    except OperatorError:
        return None
