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
An unreachable chain never changes the status: "unknown" is not "revoked" (nor "approved").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import kopf
from trustcap.operator.conditions import READY, ConditionStatus, set_condition, utcnow

from trustcap.bootimage import BootImageSpecError, image_id_of_spec
from trustcap.chain.bootimages import ApprovalHistory, BootImageRegistry
from trustcap.chain.client import Deployment
from trustcap.chain.errors import ChainError

__all__ = ["Decision", "decide", "needs_history"]

log = logging.getLogger("trustcap.operator.bootimage")

GROUP: Final = "trustcap.io"
VERSION: Final = "v1alpha1"
POLL_S: Final = float(os.environ.get("TRUSTCAP_BOOTIMAGE_POLL_SECONDS", "5"))
RPC_TIMEOUT_S: Final = 5.0

PENDING: Final = "Pending"
APPROVED: Final = "Approved"
REVOKED: Final = "Revoked"

REASON_APPROVED_ON_CHAIN: Final = "ApprovedOnChain"
REASON_AWAITING_CHAIN_APPROVAL: Final = "AwaitingChainApproval"
REASON_REVOKED_ON_CHAIN: Final = "RevokedOnChain"
REASON_INVALID_SPEC: Final = "InvalidSpec"


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

_registry: BootImageRegistry | None = None


@kopf.on.startup()
def start_bootimage_approval(logger: kopf.Logger, **_: Any) -> None:
    """Configured the way the chain-writer is (TRUSTCAP_CHAIN_DEPLOYMENT, TRUSTCAP_CHAIN_RPC); without
    them the chain is not this operator's to read and BootImage status stays whoever else writes it."""
    global _registry
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
    _registry = BootImageRegistry(rpc, dep.registry, timeout=RPC_TIMEOUT_S)
    logger.info("BootImage approval from chain: NodeRegistry %s via %s, every %ss", dep.registry, rpc, POLL_S)


def _configured(**_: Any) -> bool:
    return _registry is not None


@kopf.timer(GROUP, VERSION, "bootimages", interval=POLL_S, when=_configured)
def sync_bootimage(spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, body: kopf.Body, patch: kopf.Patch,
                   logger: kopf.Logger, **_: Any) -> None:
    """One poll: ask the chain, write only what changed. Idempotent; a restart simply asks again."""
    registry = _registry
    if registry is None:
        return
    generation = int(meta.get("generation") or 0)
    approved: bool | None = None
    history: ApprovalHistory | None = None
    try:
        iid = image_id_of_spec(spec)
    except BootImageSpecError:
        iid = None  # decide() writes the condition naming the field
    if iid is not None:
        try:
            approved = registry.is_approved(iid)
            if needs_history(status, "0x" + iid.hex(), approved):
                history = registry.history(iid)
        except ChainError as exc:
            logger.warning("chain unreachable, keeping the BootImage status (phase %s) and retrying in %ss: %s",
                           status.get("phase") or "unset", POLL_S, exc)
            return
    decision = decide(spec, status, generation=generation, approved=approved, history=history, now=utcnow())
    if not decision.patch:
        return
    for key, value in decision.patch.items():
        patch.status[key] = value
    if "phase" in decision.patch:
        logger.info("BootImage phase %s -> %s", status.get("phase") or "unset", decision.patch["phase"])
    if decision.warning is not None:
        kopf.warn(body, reason=decision.warning[0], message=decision.warning[1])
