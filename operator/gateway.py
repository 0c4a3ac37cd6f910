"""Gateway controller: a Gateway is Ready when the chain says it is registered, active and staked, and
it is seen (`status.lastSeen`) while its own key answers at its endpoint.

Scheduling needs the first (decision 0090: the eligible set is the chain's, the Gateway object mirrors it
for people and dashboards). The operator is the only writer of `Gateway.status`; it reads the NodeRegistry
through the same chain view the capsule controller uses. Without a chain configured that timer does
nothing and says so once at startup (operator/capsule.py).

`lastSeen` is what the relays' verifier directories read to drop an offline gateway (gateway/verifiers.py,
decision 0114). It is the operator's own evidence, never the gateway's word about itself:

    operator (gateway_seen, every 15 s,          Gateway's relay (spec.endpoint)
    when lastSeen is 60 s old or missing)
      | nonce = 32 random bytes                   |
      |-- POST /v1/liveness {nonce} ------------->| its trust root signs
      |<-- {gateway, nonce, signature} -----------|   digest{domain, nonce, gateway}
      | the signature recovers to spec.address?   |
      |   yes: status.lastSeen = now (one write per 60 s at most)
      |   no, or no answer in 3 s: nothing written; lastSeen ages out of the directories

A Gateway whose key is elsewhere, or whose endpoint is dead, or an endpoint that answers with another
key, is never renewed. Nothing runs without an endpoint and an address.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import kopf
from eth_utils.address import to_checksum_address

from trustcap.api import GATEWAYS, GROUP, VERSION
from trustcap.evidence.errors import SignatureError
from trustcap.evidence.liveness import liveness_digest
from trustcap.evidence.signing import recover_address
from trustcap.forms import parse_rfc3339, rfc3339
from trustcap.operator import conditions as cond
from trustcap.operator.kube import seconds_setting

INTERVAL_S: Final = 10.0
REASON_REGISTERED: Final = "RegisteredAndStaked"
REASON_NOT_REGISTERED: Final = "NotRegistered"
REASON_INACTIVE: Final = "Inactive"
REASON_NO_STAKE: Final = "NoStake"
SEEN_PROBE_S: Final = 15.0  # how often a due Gateway is probed (a failed probe is retried this soon)
SEEN_INTERVAL_S: Final = 60.0  # at most one lastSeen write per Gateway per this (env: ..._SEEN_INTERVAL_SECONDS)
PROBE_TIMEOUT_S: Final = 3.0
MAX_ANSWER: Final = 4096
BUSY_RETRIES: Final = 1  # a 503 (the relay's trust root is busy) is asked once more before it counts
BUSY_WAIT_MAX_S: Final = 1.0
_ENDPOINT = re.compile(r"^[A-Za-z0-9.-]{1,253}:[0-9]{1,5}$|^\[[0-9A-Fa-f:.]{2,45}\]:[0-9]{1,5}$")

log = logging.getLogger("trustcap.operator.gateway")


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


@kopf.timer(GROUP, VERSION, GATEWAYS, interval=INTERVAL_S, initial_delay=1.0, timeout=30.0)
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


# --- lastSeen: the operator's own evidence that a Gateway is up ------------------------------------------
def probe_liveness(endpoint: Any, address: Any, *, timeout_s: float = PROBE_TIMEOUT_S,
                   nonce: bytes | None = None) -> str | None:
    """None when the key of `address` signed a fresh nonce of ours at `endpoint` (host:port); else why not."""
    if not isinstance(endpoint, str) or not _ENDPOINT.match(endpoint):
        return f"spec.endpoint {str(endpoint)[:64]!r} is not host:port"
    try:
        expected = str(to_checksum_address(str(address)))
    except ValueError:
        return f"spec.address {str(address)[:64]!r} is not an Ethereum address"
    nonce = os.urandom(32) if nonce is None else nonce
    url = f"http://{endpoint}/v1/liveness"
    req = urllib.request.Request(url, data=json.dumps({"nonce": "0x" + nonce.hex()}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    for attempt in range(1 + BUSY_RETRIES):
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 - http URL from host:port
                data: bytes = resp.read(MAX_ANSWER + 1)
            break
        except urllib.error.HTTPError as exc:
            # A trust root signs slowly and its relay answers at most one probe per interval: 503 with
            # Retry-After is "busy", not "down". Wait (bounded) and ask once more before calling it unseen.
            if exc.code != 503 or attempt == BUSY_RETRIES:
                return f"{endpoint} answered HTTP {exc.code} to the liveness probe"
            time.sleep(_retry_after(exc.headers.get("Retry-After")))
        except (urllib.error.URLError, OSError) as exc:
            return f"{endpoint} unreachable: {getattr(exc, 'reason', exc)}"
    if len(data) > MAX_ANSWER:
        return f"{endpoint} answered more than {MAX_ANSWER} bytes"
    try:
        doc = json.loads(data)
        claimed = str(doc["gateway"])
        signature = bytes.fromhex(str(doc["signature"]).removeprefix("0x"))
        if claimed.lower() != expected.lower():
            return f"{endpoint} answered as {claimed[:42]}, not the Gateway's {expected}"
        signer = recover_address(liveness_digest(nonce, expected), signature)
    except (ValueError, TypeError, KeyError, AttributeError, SignatureError) as exc:
        return f"{endpoint} answered no valid liveness signature: {type(exc).__name__}: {str(exc)[:120]}"
    if signer != expected:  # signed by another key, or over another nonce (a replayed answer)
        return f"{endpoint}'s answer is not signed by the Gateway's key {expected} over this probe's nonce"
    return None


def _retry_after(value: str | None) -> float:
    """The relay's Retry-After in seconds, clamped to (0, BUSY_WAIT_MAX_S]; a date or junk waits the most."""
    try:
        wait = float(value or BUSY_WAIT_MAX_S)
    except ValueError:
        return BUSY_WAIT_MAX_S
    return min(max(wait, 0.05), BUSY_WAIT_MAX_S) if math.isfinite(wait) else BUSY_WAIT_MAX_S


def record_seen(spec: Any, status: Any, patch: Any, *, now: float, interval_s: float = SEEN_INTERVAL_S,
                written_at: float | None = None,
                probe: Callable[[Any, Any], str | None] = probe_liveness) -> str | None:
    """Probe when `lastSeen` is missing or `interval_s` old (and this process has not written it within
    `interval_s`: a lagging watch must not double the writes), and write `status.lastSeen` only when the
    probe passes. Returns why it was not written (None: written, or not due)."""
    seen = parse_rfc3339(status.get("lastSeen"))
    if seen is not None and 0 <= now - seen < interval_s:
        return None
    if written_at is not None and 0 <= now - written_at < interval_s:
        return None
    why = probe(spec.get("endpoint"), spec.get("address"))
    if why is None:
        patch.status["lastSeen"] = rfc3339(now)
    return why


@dataclass
class _SeenBook:
    """Operator-wide, in kopf's memo (not a module global): what this process last wrote and saw."""

    written: dict[str, float] = field(default_factory=dict)  # Gateway name -> when it last wrote lastSeen
    unseen: dict[str, str | None] = field(default_factory=dict)  # Gateway name -> last probe failure


@kopf.timer(GROUP, VERSION, GATEWAYS, interval=SEEN_PROBE_S, initial_delay=2.0, timeout=30.0)
def gateway_seen(spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, patch: kopf.Patch, memo: kopf.Memo,
                 **_: Any) -> None:
    book: _SeenBook = memo.setdefault("gateway_seen", _SeenBook())
    name = str(meta.get("name", "?"))
    now = time.time()
    before = patch.status.get("lastSeen")
    why = record_seen(spec, status, patch, now=now, written_at=book.written.get(name),
                      interval_s=seconds_setting("TRUSTCAP_GATEWAY_SEEN_INTERVAL_SECONDS", SEEN_INTERVAL_S))
    if patch.status.get("lastSeen") != before:
        book.written[name] = now
    if why != book.unseen.get(name, None):
        if why is None:
            log.info("Gateway %s answers its liveness probe again", name)
        else:
            log.warning("Gateway %s not seen: %s; its lastSeen is not renewed and the verifier directories "
                        "drop it once it is too old", name, why)
    book.unseen[name] = why
