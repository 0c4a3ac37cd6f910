"""Gateway controller: a Gateway is Ready when the chain says it is registered, active and staked.

Scheduling needs it (decision 0090: the eligible set is the chain's, the Gateway object mirrors it for
people and dashboards). The operator is the only writer of `Gateway.status`; it reads the NodeRegistry
through the same chain view the capsule controller uses. Without a chain configured the timer does
nothing and says so once at startup (operator/capsule.py).
"""

from __future__ import annotations

from typing import Any, Final

import kopf
from trustcap.operator import conditions as cond

GROUP: Final = "trustcap.io"
VERSION: Final = "v1alpha1"
INTERVAL_S: Final = 10.0
REASON_REGISTERED: Final = "RegisteredAndStaked"
REASON_NOT_REGISTERED: Final = "NotRegistered"
REASON_INACTIVE: Final = "Inactive"
REASON_NO_STAKE: Final = "NoStake"


def judge(info: Any) -> tuple[str, cond.ConditionStatus, str, str]:
    """(phase, Ready status, reason, message) for a NodeRegistry entry (None: not registered)."""
    if info is None:
        return "Pending", "False", REASON_NOT_REGISTERED, "not registered in the NodeRegistry"
    if not info.active:
        return "Offline", "False", REASON_INACTIVE, "registered but not active (exited or slashed)"
    if int(info.stake) <= 0:
        return "Registered", "False", REASON_NO_STAKE, "registered with no stake left"
    return "Active", "True", REASON_REGISTERED, (f"registered and active on chain, stake {info.stake} wei, "
                                                 f"reputation {info.reputation_bp / 100:.2f} %")


@kopf.timer(GROUP, VERSION, "gateways", interval=INTERVAL_S, initial_delay=1.0, timeout=30.0)
def gateway_on_chain(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, memo: kopf.Memo,
                     patch: kopf.Patch, **_: Any) -> None:
    settings = getattr(memo, "capsules", None)
    escrow = getattr(settings, "escrow", None)
    if escrow is None:
        return
    info = escrow.node(str(spec.get("address", "")).lower())
    phase, ready, reason, message = judge(info)
    up = cond.set_condition(status.get("conditions") or [], type_=cond.READY, status=ready, reason=reason,
                            message=message, observed_generation=int(meta.get("generation") or 0), now=cond.utcnow())
    # Stake and reputation move without a phase change (a slash, a reputation update): the dashboards
    # read them from this status (operator/metrics.py), so a drift is written too.
    drift = info is not None and (status.get("bondedStakeWei") != str(info.stake)
                                  or status.get("reputation") != int(info.reputation_bp))
    if up.changed or status.get("phase") != phase or drift:
        patch.status["phase"] = phase
        patch.status["conditions"] = up.conditions
        patch.status["observedGeneration"] = int(meta.get("generation") or 0)
        if info is not None:
            patch.status["bondedStakeWei"] = str(info.stake)
            patch.status["reputation"] = int(info.reputation_bp)
        if up.flipped:
            kopf.event(body, type="Normal" if ready == "True" else "Warning", reason=reason, message=message)
