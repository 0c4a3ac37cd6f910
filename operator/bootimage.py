"""BootImage approval from the chain: NodeRegistry.approvedBootImage(imageId) -> BootImage status.

A gateway serves only a BootImage whose status says Approved (netboot's `BootImageApproval`), and the
operator's enrolment check accepts only the `status.imageDigest` of such an image. When the chain is
configured, this controller is what writes that status; without chain settings it does nothing, so a
status written by hand (tests, a cluster without a chain) keeps working. Decision 0063.

    BootImage (spec: files + bootDigest)     this controller (timer)              NodeRegistry (chain)
        |                                       | imageId = image_id_of_spec(spec)   |
        |  every TRUSTCAP_BOOTIMAGE_POLL_SECONDS|----- approvedBootImage(imageId) --->|
        |                                       |<---------- true / false -----------|
        |                                       | status disagrees? eth_getLogs        |
        |                                       |-- BootImageApproved(digest=imageId) ->|
        |                                       |<-------- latest approval tx ---------|
        |<-- patch status (only what changed) --| decide(): Approved | Pending | Revoked
        |    + Warning event when Ready -> False|
        |                                       | RPC down: ChainError -> keep status, log, next tick

Pending = never approved; Revoked = approved once (an event on chain, or our own earlier status), not now.
A short outage of the chain changes nothing: "unknown" is not "revoked". A long one does (decision 0097):
an approval whose last successful chain read (`checkedAt`) is older than
`TRUSTCAP_BOOTIMAGE_MAX_AGE_SECONDS` (default 600) turns Pending, Ready False `ApprovalStale` naming the
outage, so gateways stop serving it and enrolments stop accepting its digest; the next successful read
approves it again. Each successful read that finds the image approved dates the status (`checkedAt`, at
most every quarter of the maximum age), which netboot ages the approval by on the Pi; after an operator
restart the status's `checkedAt` says how old the approval is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import kopf

from trustcap.api import BOOTIMAGES, GROUP, VERSION, BootImagePhase
from trustcap.bootimage import BootImageSpecError, image_id_of_spec
from trustcap.chain.bootimages import ApprovalHistory, BootImageRegistry
from trustcap.chain.client import Deployment
from trustcap.chain.errors import ChainError
from trustcap.forms import parse_rfc3339, rfc3339
from trustcap.operator.conditions import READY, ConditionStatus, set_condition, utcnow
from trustcap.operator.kube import seconds_setting

__all__ = ["MAX_AGE_S", "REASON_APPROVAL_STALE", "Decision", "decide", "expire", "max_age_s", "needs_history"]

log = logging.getLogger("trustcap.operator.bootimage")

POLL_S: Final = float(os.environ.get("TRUSTCAP_BOOTIMAGE_POLL_SECONDS", "5"))
RPC_TIMEOUT_S: Final = 5.0
#: How long an approval stands without a successful chain read: long enough that an RPC node's restart
#: or a few minutes of network trouble keep boots going, short enough that a revocation hidden by an
#: outage (or by an RPC endpoint an attacker blocks) stops being served within ten minutes.
MAX_AGE_S: Final = 600.0

PENDING: Final = BootImagePhase.PENDING
APPROVED: Final = BootImagePhase.APPROVED
REVOKED: Final = BootImagePhase.REVOKED

REASON_APPROVED_ON_CHAIN: Final = "ApprovedOnChain"
REASON_AWAITING_CHAIN_APPROVAL: Final = "AwaitingChainApproval"
REASON_REVOKED_ON_CHAIN: Final = "RevokedOnChain"
REASON_INVALID_SPEC: Final = "InvalidSpec"
REASON_APPROVAL_STALE: Final = "ApprovalStale"


@dataclass(frozen=True)
class Decision:
    """The status patch (only changed keys; None deletes a key) and the Warning to emit, if any."""

    patch: dict[str, Any]
    warning: tuple[str, str] | None = None


def needs_history(status: Mapping[str, Any], image_id_hex: str, approved: bool) -> bool:
    """Whether the events must be read: only when the status does not already say what the chain says.
    A Pending image is re-read each time, so an approve+revoke between two polls still shows as Revoked."""
    if status.get("imageId") != image_id_hex:
        return True
    if approved:
        return status.get("phase") != APPROVED or not status.get("approvalTx")
    return status.get("phase") != REVOKED


def decide(spec: Mapping[str, Any], status: Mapping[str, Any], *, generation: int, approved: bool | None,
           history: ApprovalHistory | None, now: datetime) -> Decision:
    """The status a BootImage should have, as a patch against `status`.

    `approved` is the chain's answer for the spec's image id, None when the chain could not be asked
    (then nothing changes). `history` is None when it was not read (`needs_history` said no).
    """
    try:
        iid = image_id_of_spec(spec)
    except BootImageSpecError as exc:
        return _with(status, generation, now, fields={
            "phase": PENDING, "approvedOnChain": False, "imageDigest": None, "approvalTx": None, "imageId": None,
        }, ready="False", reason=REASON_INVALID_SPEC, message=f"no image id to look up on chain: {exc}")
    if approved is None:
        return Decision({})
    iid_hex = "0x" + iid.hex()
    if approved:
        tx = history.latest_approval_tx if history is not None else status.get("approvalTx")
        return _with(status, generation, now, fields={
            "phase": APPROVED, "approvedOnChain": True, "imageDigest": spec["bootDigest"], "imageId": iid_hex,
            "approvalTx": tx,
        }, ready="True", reason=REASON_APPROVED_ON_CHAIN,
            message=f"image id {iid_hex} is approved on chain (NodeRegistry.approvedBootImage)")
    was = (history is not None and history.ever_approved) or \
        (status.get("phase") in (APPROVED, REVOKED) and status.get("imageId") == iid_hex)
    fields: dict[str, Any] = {"approvedOnChain": False, "imageDigest": None, "approvalTx": None, "imageId": iid_hex}
    if was:
        fields["phase"] = REVOKED
        return _with(status, generation, now, fields=fields, ready="False", reason=REASON_REVOKED_ON_CHAIN,
                     message=f"image id {iid_hex} was revoked on chain; gateways no longer serve it "
                             f"(NodeRegistry.approveBootImage({iid_hex}) approves it again)")
    fields["phase"] = PENDING
    return _with(status, generation, now, fields=fields, ready="False", reason=REASON_AWAITING_CHAIN_APPROVAL,
                 message=f"image id {iid_hex} is not approved on chain: the NodeRegistry owner must call "
                         f"approveBootImage({iid_hex})")


def expire(spec: Mapping[str, Any], status: Mapping[str, Any], *, generation: int, checked_at: datetime,
           now: datetime, max_age_s: float, error: str) -> Decision:
    """The decision while the chain cannot be read: nothing while the last successful read
    (`checked_at`) is younger than `max_age_s`; after that an Approved image turns Pending (not served,
    its digest not accepted), Ready False naming the outage. Revoked and Pending stay as they are."""
    age = (now - checked_at).total_seconds()
    if status.get("phase") != APPROVED or age <= max_age_s:
        return Decision({})
    iid = status.get("imageId") or "?"
    return _with(status, generation, now, fields={"phase": PENDING, "approvedOnChain": None, "imageDigest": None,
                                                  "approvalTx": None},
                 ready="False", reason=REASON_APPROVAL_STALE,
                 message=f"approval of image id {iid} is stale: the chain was last read {age:.0f} s ago, over the "
                         f"maximum of {max_age_s:.0f} s (TRUSTCAP_BOOTIMAGE_MAX_AGE_SECONDS), because the chain RPC "
                         f"is unreachable ({error[:300]}); gateways stop serving it until the RPC answers again")


def max_age_s() -> float:
    """The operator setting TRUSTCAP_BOOTIMAGE_MAX_AGE_SECONDS (a positive number of seconds)."""
    return float(seconds_setting("TRUSTCAP_BOOTIMAGE_MAX_AGE_SECONDS", MAX_AGE_S))


def _with(status: Mapping[str, Any], generation: int, now: datetime, *, fields: Mapping[str, Any],
          ready: ConditionStatus, reason: str, message: str) -> Decision:
    patch: dict[str, Any] = {}
    for key, value in fields.items():
        if value is None:
            if key in status:
                patch[key] = None
        elif status.get(key) != value:
            patch[key] = value
    if status.get("observedGeneration") != generation:
        patch["observedGeneration"] = generation
    update = set_condition(status.get("conditions"), type_=READY, status=ready,
                           reason=reason, message=message, observed_generation=generation, now=now)
    if update.changed:
        patch["conditions"] = update.conditions
    warning = (reason, message) if update.flipped and ready == "False" else None
    return Decision(patch, warning)


# -- kopf glue ---------------------------------------------------------------------------------------------

# Operator-wide state lives in kopf's memo (issue 10 item 4): `bootimage_registry`, the chain reader
# (None: not this operator's to read), and `bootimage_checked_at`, BootImage uid (or name) -> when this
# process last read the chain for it, or first failed to (after a restart the age of the status it finds
# is unknown; the clock starts then, see the module docstring).


@kopf.on.startup()
def start_bootimage_approval(logger: kopf.Logger, memo: kopf.Memo, **_: Any) -> None:
    """Configured the way the chain-writer is (TRUSTCAP_CHAIN_DEPLOYMENT, TRUSTCAP_CHAIN_RPC); without
    them the chain is not this operator's to read and BootImage status stays whoever else writes it."""
    memo["bootimage_registry"] = None
    memo["bootimage_checked_at"] = {}
    if "TRUSTCAP_CHAIN_DEPLOYMENT" not in os.environ:
        logger.warning("BootImage approval from chain disabled: TRUSTCAP_CHAIN_DEPLOYMENT is not set")
        return
    try:
        dep = Deployment.load(Path(os.environ["TRUSTCAP_CHAIN_DEPLOYMENT"]))
        rpc = os.environ["TRUSTCAP_CHAIN_RPC"]
    except KeyError as exc:
        raise kopf.PermanentError(f"BootImage approval: setting {exc.args[0]} is missing") from None
    except ChainError as exc:
        raise kopf.PermanentError(f"BootImage approval: {exc}") from None
    memo["bootimage_registry"] = BootImageRegistry(rpc, dep.registry, timeout=RPC_TIMEOUT_S)
    logger.info("BootImage approval from chain: NodeRegistry %s via %s, every %ss", dep.registry, rpc, POLL_S)


def _configured(memo: kopf.Memo | None = None, **_: Any) -> bool:
    return memo is not None and memo.get("bootimage_registry") is not None


@kopf.timer(GROUP, VERSION, BOOTIMAGES, interval=POLL_S, when=_configured, timeout=30.0)
def sync_bootimage(spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, body: kopf.Body, patch: kopf.Patch,
                   logger: kopf.Logger, memo: kopf.Memo, **_: Any) -> None:
    """One poll: ask the chain, write only what changed. Idempotent; a restart simply asks again."""
    registry: BootImageRegistry | None = memo.get("bootimage_registry")
    if registry is None:
        return
    _checked_at: dict[str, datetime] = memo.setdefault("bootimage_checked_at", {})
    generation = int(meta.get("generation") or 0)
    approved: bool | None = None
    history: ApprovalHistory | None = None
    try:
        iid = image_id_of_spec(spec)
    except BootImageSpecError:
        iid = None  # decide() writes the condition naming the field
    key = str(meta.get("uid") or meta.get("name") or "")
    now = utcnow()
    if iid is not None:
        try:
            approved = registry.is_approved(iid)
            if needs_history(status, "0x" + iid.hex(), approved):
                history = registry.history(iid)
        except ChainError as exc:
            checked = _checked_at.setdefault(key, _recorded_check(status) or now)
            decision = expire(spec, status, generation=generation, checked_at=checked, now=now,
                              max_age_s=max_age_s(), error=str(exc))
            if not decision.patch:
                logger.warning("chain unreachable, keeping the BootImage status (phase %s) and retrying in %ss: %s",
                               status.get("phase") or "unset", POLL_S, exc)
                return
            logger.warning("chain unreachable for %.0f s: the approval is stale, BootImage phase -> Pending: %s",
                           (now - checked).total_seconds(), exc)
            _write(decision, status, patch, body, logger)
            return
        _checked_at[key] = now
    decision = decide(spec, status, generation=generation, approved=approved, history=history, now=now)
    if approved:
        recorded = _recorded_check(status)
        # netboot ages an approval by this date (decision 0116): refresh it well inside the maximum age,
        # at most every quarter of it, so an idle BootImage costs one status write per ~150 s
        if recorded is None or (now - recorded).total_seconds() > max_age_s() / 4:
            decision.patch["checkedAt"] = rfc3339(now.timestamp())
    _write(decision, status, patch, body, logger)


def _recorded_check(status: Mapping[str, Any]) -> datetime | None:
    """`status.checkedAt` when the status carries it (a CRD that keeps the field; see decision 0097):
    after a restart it says how old the approval really is."""
    t = parse_rfc3339(status.get("checkedAt"))
    return datetime.fromtimestamp(t, UTC) if t is not None else None


def _write(decision: Decision, status: kopf.Status, patch: kopf.Patch, body: kopf.Body, logger: kopf.Logger) -> None:
    if not decision.patch:
        return
    for key, value in decision.patch.items():
        patch.status[key] = value
    if "phase" in decision.patch:
        logger.info("BootImage phase %s -> %s", status.get("phase") or "unset", decision.patch["phase"])
    if decision.warning is not None:
        kopf.warn(body, reason=decision.warning[0], message=decision.warning[1])
