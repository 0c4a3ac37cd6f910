"""HPCNode enrolment: the operator verifies the evidence its gateway publishes, never the gateway's word.

A netbooted HPC's agent enrols with its gateway (one-time token, boot key, boot-image digest). The
gateway then asks the agent for a quote bound to a single-use nonce the *operator* issued, countersigns
it with its trust root and writes it into the HPCNode's status. The operator re-checks every claim
against what the cluster says (the Gateway's signing key, the BootImage's approved digest) and only then
calls the node `Enrolled`; anything wrong quarantines it with every failed claim named.

    operator (this module)        kube-apiserver (HPCNode status)      gateway (publish.py)        agent
     | create/resume: phase Registered,   |                                  |                        |
     | enrolmentChallenge{nonce,issuedAt}>|                                  |                        |
     |                                    |                                  |<-- HELLO + token ------| enrol
     |                                    |<-- read enrolmentChallenge ------|                        |
     |                                    |                                  |--- quote{nonce} ------>|
     |                                    |                                  |<-- quote, agent sig ---|
     |                                    |<-- status.enrolment{agentKey, bootImageDigest, quote       |
     |                                    |    (countersigned), policyDigest, time}; again every 600 s |
     | timer: unchecked evidence? ------->|                                  |                        |
     | verify: gateway sig -> Gateway.spec.signingKey, agent sig -> agentKey, nonce == challenge,       |
     |         boot digest == approved BootImage.status.imageDigest, dated after the challenge         |
     |-- phase Enrolled, agentKey, lastQuote, Ready=False/Enrolled   (or Quarantined + reason + event) |
     |-- enrolmentChecked = evidence id, a fresh enrolmentChallenge (the old nonce is spent)           |

Why a timer and not an update handler: kopf keeps status out of its diff base, so a status-only change
never reaches `on.update`/`on.field`; a short timer sees it and also retries after an operator restart.
Every step is idempotent: the evidence id (`enrolmentChecked`) and the spent challenge are written in the
same patch as the verdict, so an operator killed at any line decides the same evidence the same way.
Quarantine is sticky: only a person clears it (patching the phase), never the operator or the gateway.

The operator is the only writer of `status.phase` (decision 0113). A gateway writes its own sub-fields
and the operator derives the phase from them, in the same timer (`judge_reports`):
  quarantineRequest (its monitor's failed check)  -> Quarantined, quarantineReason = the request's message,
                                                     Ready False, a Warning event; each request acted on
                                                     once (`quarantineChecked`), so a person's clearing holds
  lastWipe.state InProgress, and no enrolment    -> Wiping (until the fresh boot's evidence is verified)
  verified since its startedAt
  unchecked evidence of a new agent key          -> Booting (while the operator waits for its references)
The chart's admission policy refuses every gateway write of the phase and of the operator's fields, and
a gateway's write to an HPCNode that is not its own (templates/admissionpolicy.yaml).

Trust expires (decision 0097): an Enrolled node stays Enrolled only while its freshest verified evidence
(the enrolment quote the operator checked, `status.lastQuote.time`, or the decision of a committee round
about it that passed) is younger than `TRUSTCAP_ENROLMENT_MAX_AGE_SECONDS`. Older, `judge_node_trust`
takes it back to Registered (a fresh challenge is already outstanding), Ready False `EnrolmentExpired`
naming the age: the gateway's next published quote enrols it again. And when the node's spec declares the
policy digest its verifiers must apply (`spec.policy.digest`), the digest the gateway reports it applies
(`status.enrolment.policyDigest`) must be that one, or the node is not Ready (`PolicyMismatch`).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TypeAlias, cast

import kopf
from pydantic import ValidationError

from trustcap import canonical
from trustcap.api import ATTESTATIONS, BOOTIMAGES, GATEWAYS, GROUP, HPCNODES, VERSION, HPCNodePhase
from trustcap.evidence import Report, Severity, SignedQuote, address_of, appraise_quote, quote_digest
from trustcap.evidence import failure as fid
from trustcap.evidence.errors import SignatureError
from trustcap.forms import parse_rfc3339, sha256_digest
from trustcap.operator import conditions as cond
from trustcap.operator.kube import seconds_setting

__all__ = [
    "ENROLMENT_MAX_AGE_S",
    "REASON_AWAITING_ENROLMENT",
    "REASON_ENROLLED",
    "REASON_ENROLMENT_EXPIRED",
    "REASON_POLICY_MISMATCH",
    "REASON_QUARANTINED",
    "REASON_WIPING",
    "Decision",
    "decide",
    "enrolment_max_age_s",
    "evidence_age",
    "evidence_id",
    "judge_reports",
    "judge_trust",
    "new_challenge",
    "policy_mismatch",
    "trust_patch",
    "verify_enrolment",
]


REASON_AWAITING_ENROLMENT: Final = "AwaitingEnrolment"
REASON_ENROLLED: Final = "Enrolled"
REASON_QUARANTINED: Final = "Quarantined"
REASON_TRUSTED: Final = "Trusted"
REASON_GATEWAY_NOT_ACTIVE: Final = "GatewayNotActive"
REASON_ATTESTATION_FAILED: Final = "AttestationFailed"
REASON_ENROLMENT_EXPIRED: Final = "EnrolmentExpired"
REASON_POLICY_MISMATCH: Final = "PolicyMismatch"
REASON_WIPING: Final = cond.REASON_WIPING
#: trustLevel (crds/hpcnode.yaml): the HPCs here netboot with no TPM of their own, so an enrolled node is 1
TRUST_NETBOOT_NO_TPM: Final = 1

PHASE_REGISTERED: Final = HPCNodePhase.REGISTERED
PHASE_BOOTING: Final = HPCNodePhase.BOOTING
PHASE_ENROLLED: Final = HPCNodePhase.ENROLLED
PHASE_QUARANTINED: Final = HPCNodePhase.QUARANTINED
PHASE_WIPING: Final = HPCNodePhase.WIPING

MAX_SKEW_S: Final = 5.0           # clocks of agent and operator may differ this much either way
REFERENCE_GRACE_S: Final = 30.0   # how long a missing Gateway/BootImage may still be on its way (watch lag)
TIMER_INTERVAL_S: Final = 2.0
HANDLER_TIMEOUT_S: Final = 60.0
MAX_REASON: Final = 1024          # the CRD's maxLength of quarantineReason
#: How old the freshest verified evidence of an Enrolled node may be. The gateway re-publishes a fresh
#: enrolment quote every TRUSTCAP_ENROLMENT_REFRESH_SECONDS (gateway/publish.py, default 600 s), so this is
#: three refresh periods: two refreshes may fail in a row before an idle, healthy node drops to Registered,
#: and a node nobody has heard from stays trusted at most 30 min (decisions 0097, 0113).
ENROLMENT_MAX_AGE_S: Final = 1800.0


def enrolment_max_age_s() -> float:
    """The operator setting TRUSTCAP_ENROLMENT_MAX_AGE_SECONDS (a positive number of seconds)."""
    return float(seconds_setting("TRUSTCAP_ENROLMENT_MAX_AGE_SECONDS", ENROLMENT_MAX_AGE_S))


def new_challenge(now: datetime) -> dict[str, str]:
    """A fresh single-use nonce for the next enrolment quote of this node."""
    return {"nonce": "0x" + secrets.token_bytes(32).hex(), "issuedAt": cond.format_time(now)}


def evidence_id(enrolment: Mapping[str, Any]) -> str:
    """The identity of one published enrolment (whatever its content, malformed included)."""
    return "sha256:" + canonical.digest(_plain(enrolment)).hex()


def _plain(value: Any) -> Any:
    """kopf hands out read-only mapping views; canonical encoding wants plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _parse_time(value: Any) -> datetime | None:
    t = parse_rfc3339(value)
    return datetime.fromtimestamp(t, UTC) if t is not None else None


def _hex_bytes(value: Any, n: int) -> bytes | None:
    if not isinstance(value, str) or not value.startswith("0x") or len(value) != 2 + 2 * n:
        return None
    try:
        return bytes.fromhex(value[2:])
    except ValueError:
        return None


def verify_enrolment(
    *,
    node_name: str,
    enrolment: Mapping[str, Any],
    challenge: Mapping[str, Any] | None,
    gateway: Mapping[str, Any] | None,
    boot_image: Mapping[str, Any] | None,
    now: datetime,
) -> tuple[Report, SignedQuote | None]:
    """Check every claim of the published enrolment; the report names each one that failed.

    `gateway` is the Gateway's spec (address, signingKey), `boot_image` the BootImage's status (phase,
    imageDigest), `challenge` this node's current enrolmentChallenge. None means "not found".
    """
    report = Report()
    signed: SignedQuote | None = None
    raw = enrolment.get("quote")
    try:
        if not isinstance(raw, str):
            raise ValueError("status.enrolment.quote is missing or not a string")
        signed = SignedQuote.model_validate_json(raw)
    except (ValueError, ValidationError) as exc:
        first = str(exc).splitlines()[0][:200]
        report.add("enrolment", "enrolment.quote.malformed", Severity.CRITICAL,
                   f"status.enrolment.quote is not a countersigned quote: {first}")

    agent_key = _hex_bytes(enrolment.get("agentKey"), 33)
    if agent_key is None:
        report.add("enrolment", "enrolment.agent_key.malformed", Severity.CRITICAL,
                   "status.enrolment.agentKey is not a 33-byte 0x-hex key")

    gateway_address = _gateway_address(gateway, report)

    approved = _approved_digest(boot_image, report)
    reported_boot = enrolment.get("bootImageDigest")
    if approved is not None and reported_boot != approved:
        report.add("boot", "boot.digest.not_approved", Severity.HIGH,
                   "the enrolled boot-image digest is not the approved one", expected=approved, got=reported_boot)

    nonce = _hex_bytes((challenge or {}).get("nonce"), 32)
    challenged_at = _parse_time((challenge or {}).get("issuedAt"))
    if signed is None:
        return report, None

    quote = signed.quote
    quoted_boot = "sha256:" + quote.boot_image_digest[2:]
    if quoted_boot != reported_boot:
        report.add("enrolment", "enrolment.boot_digest.mismatch", Severity.CRITICAL,
                   "status.enrolment.bootImageDigest differs from the digest in the signed quote",
                   reported=reported_boot, quoted=quoted_boot)
    if approved is not None and quoted_boot != approved and reported_boot == approved:
        report.add("boot", "boot.digest.not_approved", Severity.HIGH,
                   "the quoted boot-image digest is not the approved one", expected=approved, got=quoted_boot)

    # The evidence layer's own appraisal: signatures, identity, the operator's one outstanding challenge
    # (expected_nonce) and a quote dated after it (not_before). The operator re-judges stored evidence on
    # every pass, so there is no single-use registry; the evidence's age is judged by `evidence_age`.
    if nonce is None:
        report.add("nonce", "nonce.no_challenge", Severity.CRITICAL,
                   "this node has no outstanding enrolment challenge, so no quote can be fresh")
    appraisal = appraise_quote(
        signed, node_id=node_name,
        # no challenge is already a critical failure (nonce.no_challenge); the appraisal still needs a nonce
        expected_nonce=nonce if nonce is not None else bytes(32),
        agent_key=agent_key if agent_key is not None else b"",
        gateway_address=gateway_address or "0x0000000000000000000000000000000000000000",
        now=now.timestamp(), max_age_seconds=None, max_skew_seconds=MAX_SKEW_S,
        not_before=challenged_at.timestamp() if challenged_at is not None else None,
    )
    for failure in appraisal.failures:
        if gateway_address is None and failure.event_id in (fid.QUOTE_SIGNATURE_GATEWAY, fid.QUOTE_IDENTITY_GATEWAY):
            continue  # already reported as the missing or inconsistent Gateway
        elif agent_key is None and failure.event_id in (fid.QUOTE_SIGNATURE_AGENT, fid.QUOTE_IDENTITY_AGENT_KEY):
            continue  # already reported as the malformed agentKey
        elif nonce is None and failure.event_id in (fid.NONCE_UNKNOWN, fid.NONCE_MISMATCH):
            continue  # already reported as nonce.no_challenge
        else:
            report.failures.append(failure)
    return report, signed


def _gateway_address(gateway: Mapping[str, Any] | None, report: Report) -> str | None:
    """The address the countersignature must recover to: derived from the Gateway's signing key."""
    if gateway is None:
        report.add("gateway", "gateway.missing", Severity.CRITICAL, "the HPCNode's Gateway resource does not exist")
        return None
    key = _hex_bytes(gateway.get("signingKey"), 33)
    try:
        derived = address_of(key) if key is not None else None
    except SignatureError:
        derived = None
    if derived is None:
        report.add("gateway", "gateway.signing_key.malformed", Severity.CRITICAL,
                   "the Gateway's spec.signingKey is not a secp256k1 public key")
        return None
    declared = str(gateway.get("address", ""))
    if declared.lower() != derived.lower():
        report.add("gateway", "gateway.identity.inconsistent", Severity.CRITICAL,
                   "the Gateway's spec.address is not the address of its spec.signingKey",
                   declared=declared, derived=derived)
        return None
    return derived


def _approved_digest(boot_image: Mapping[str, Any] | None, report: Report) -> str | None:
    """The digest quotes must carry: `status.imageDigest` of a BootImage whose phase is Approved (the
    same rule netboot's `BootImageApproval` serves by)."""
    if boot_image is None:
        report.add("boot", "boot.image.missing", Severity.HIGH, "the HPCNode's BootImage resource does not exist")
        return None
    if boot_image.get("phase") != "Approved":
        report.add("boot", "boot.image.not_approved", Severity.HIGH,
                   f"the BootImage is not approved (phase {boot_image.get('phase') or 'unset'})")
        return None
    digest = boot_image.get("imageDigest")
    if not isinstance(digest, str) or not digest.startswith("sha256:"):
        report.add("boot", "boot.image.no_digest", Severity.HIGH, "the approved BootImage has no status.imageDigest")
        return None
    return digest


@dataclass(frozen=True)
class Decision:
    """What to write for one piece of evidence: the status patch and, when it failed, the event."""

    status: dict[str, Any]
    enrolled: bool
    warning: tuple[str, str] | None = None
    failed_claims: list[str] = field(default_factory=list)
    notice: tuple[str, str] | None = None  # a Normal event (progress), reason and message


def decide(
    *,
    node_name: str,
    status: Mapping[str, Any],
    generation: int,
    gateway: Mapping[str, Any] | None,
    boot_image: Mapping[str, Any] | None,
    now: datetime,
) -> Decision | None:
    """The status patch for the node's unchecked enrolment evidence, or None when there is nothing new."""
    enrolment = status.get("enrolment")
    if not isinstance(enrolment, Mapping):
        return None
    eid = evidence_id(enrolment)
    if status.get("enrolmentChecked") == eid:
        return None
    report, signed = verify_enrolment(node_name=node_name, enrolment=enrolment,
                                      challenge=status.get("enrolmentChallenge"), gateway=gateway,
                                      boot_image=boot_image, now=now)
    gen = max(generation, 0)
    patch: dict[str, Any] = {"enrolmentChecked": eid, "enrolmentChallenge": new_challenge(now)}
    sticky = status.get("phase") == PHASE_QUARANTINED
    if report.ok and signed is not None and not sticky:
        quote = signed.quote
        if status.get("phase") != PHASE_ENROLLED or status.get("agentKey") != quote.agent_key:
            message = "agent enrolled with an approved boot image; Ready after the first passed monitoring round"
            update = cond.set_condition(status.get("conditions"), type_=cond.READY, status="False",
                                        reason=REASON_ENROLLED, message=message, observed_generation=gen, now=now)
            patch["conditions"] = update.conditions
        # else: fresh evidence of the agent already enrolled only renews it (lastQuote.time, the age
        # `evidence_age` counts from); its Ready stays what `judge_trust` last said, no False/True flap.
        patch.update({
            "phase": PHASE_ENROLLED, "agentKey": quote.agent_key, "quarantineReason": None,
            "observedGeneration": gen,
            "lastQuote": {"digest": "sha256:" + quote_digest(quote).hex(),
                          "bootImageDigest": "sha256:" + quote.boot_image_digest[2:],
                          "time": cond.format_time(datetime.fromtimestamp(quote.issued_at, UTC))},
        })
        return Decision(status=patch, enrolled=True)
    if report.ok:  # genuine evidence, but a person quarantined this node: it stays quarantined
        reason = f"enrolment evidence arrived while quarantined; unchanged ({status.get('quarantineReason') or ''})"
        return Decision(status=patch, enrolled=False, warning=(REASON_QUARANTINED, reason[:MAX_REASON]))
    reason = ("enrolment refused: " + report.summary())[:MAX_REASON]
    update = cond.set_condition(status.get("conditions"), type_=cond.READY, status="False",
                                reason=REASON_QUARANTINED, message=reason, observed_generation=gen, now=now)
    patch.update({"phase": PHASE_QUARANTINED, "quarantineReason": reason, "observedGeneration": gen,
                  "conditions": update.conditions})
    return Decision(status=patch, enrolled=False, warning=(REASON_QUARANTINED, reason),
                    failed_claims=report.event_ids)


def judge_reports(*, status: Mapping[str, Any], generation: int, now: datetime) -> Decision | None:
    """The phase the gateway's own reports call for (decision 0113), or None when they call for nothing new.

    - A quarantine request not yet acted on (`quarantineChecked` is another id): Quarantined, naming the
      gateway's message, Ready False and a Warning. Already quarantined: only noted, the first reason
      stays. Each request is acted on once, so after a person clears the phase only a new request (the
      gateway's next failed check) quarantines the node again.
    - A wipe the gateway runs (`lastWipe.state` InProgress) that no verified enrolment postdates: Wiping,
      Ready False. The fresh boot's verified evidence (`decide`) then makes it Enrolled again.
    Quarantine is never lifted here, and a quarantined node is not moved to Wiping."""
    gen = max(generation, 0)
    phase = status.get("phase")
    request = status.get("quarantineRequest")
    if isinstance(request, Mapping):
        rid = evidence_id(request)
        if status.get("quarantineChecked") != rid:
            patch: dict[str, Any] = {"quarantineChecked": rid}
            if phase == PHASE_QUARANTINED:
                return Decision(status=patch, enrolled=False)
            reason = str(request.get("message") or request.get("reason") or "the gateway asked")[:MAX_REASON]
            update = cond.set_condition(status.get("conditions"), type_=cond.READY, status="False",
                                        reason=REASON_QUARANTINED, message=reason, observed_generation=gen, now=now)
            patch.update({"phase": PHASE_QUARANTINED, "quarantineReason": reason, "observedGeneration": gen,
                          "conditions": update.conditions})
            return Decision(status=patch, enrolled=False, warning=(REASON_QUARANTINED, reason))
    wipe = status.get("lastWipe")
    if not isinstance(wipe, Mapping) or wipe.get("state") != "InProgress" or phase in (PHASE_QUARANTINED,
                                                                                        PHASE_WIPING):
        return None
    started = _parse_time(wipe.get("startedAt"))
    quoted = _parse_time((status.get("lastQuote") or {}).get("time"))
    if started is None or (quoted is not None and quoted >= started):
        return None  # the fresh boot's evidence is already verified: the wipe is as good as done
    message = (f"its gateway is wiping it ({wipe.get('level') or 'Reboot'}, request {wipe.get('request') or '?'}, "
               f"since {cond.format_time(started)}); Enrolled again once the fresh boot's evidence is verified")
    update = cond.set_condition(status.get("conditions"), type_=cond.READY, status="False",
                                reason=REASON_WIPING, message=message, observed_generation=gen, now=now)
    return Decision(status={"phase": PHASE_WIPING, "observedGeneration": gen, "conditions": update.conditions},
                    enrolled=False, notice=(REASON_WIPING, message))


def evidence_age(status: Mapping[str, Any], last_round: Mapping[str, Any] | None,
                 now: datetime) -> tuple[float | None, str]:
    """(seconds since the freshest verified evidence of the node, what that evidence was); None: none dated.

    Counted: the enrolment quote the operator verified (`status.lastQuote.time`, written by `decide`) and
    the decision of the latest committee round about the node, when it passed. The gateway's own
    `status.enrolment.time` is not: it is the gateway's word, not something the operator checked."""
    candidates: list[tuple[datetime, str]] = []
    quoted = _parse_time((status.get("lastQuote") or {}).get("time"))
    if quoted is not None:
        candidates.append((quoted, "the verified enrolment quote"))
    if last_round is not None and (last_round.get("status") or {}).get("result") == "Passed":
        decided = _parse_time(last_round["status"].get("decidedAt"))
        if decided is not None:
            name = (last_round.get("metadata") or {}).get("name", "?")
            candidates.append((decided, f"committee round {name} (passed)"))
    if not candidates:
        return None, "no dated evidence"
    moment, what = max(candidates, key=lambda c: c[0])
    return (now - moment).total_seconds(), what


def policy_mismatch(spec: Mapping[str, Any], status: Mapping[str, Any]) -> str | None:
    """Why the policy the gateway applies is not the one the node declares, or None when it is (or the
    node declares none). A digest the gateway does not report is a mismatch: unknown rules are not the
    declared rules."""
    declared_raw = (spec.get("policy") or {}).get("digest")
    if declared_raw is None:
        return None
    declared = sha256_digest(declared_raw)
    if declared is None:
        return f"spec.policy.digest {str(declared_raw)[:80]!r} is not a sha256 digest"
    reported_raw = (status.get("enrolment") or {}).get("policyDigest")
    if reported_raw is None:
        return (f"the node declares policy {declared}, but its gateway reports no applied policy digest "
                "(status.enrolment.policyDigest): update the gateway so it publishes the digest of its --policy")
    reported = sha256_digest(reported_raw)
    if reported != declared:
        shown = reported if reported is not None else repr(str(reported_raw)[:80])
        return (f"its gateway applies policy {shown}, not the declared "
                f"spec.policy.digest {declared}: give the gateway the declared policy, or declare the one it runs")
    return None


def judge_trust(*, status: Mapping[str, Any], gateway: Mapping[str, Any] | None,
                last_round: Mapping[str, Any] | None, spec: Mapping[str, Any] | None = None,
                now: datetime | None = None,
                max_age_s: float = ENROLMENT_MAX_AGE_S) -> tuple[cond.ConditionStatus, str, str, int]:
    """(Ready status, reason, message, trustLevel) of an HPCNode the operator has enrolled.

    Ready = enrolled, its evidence younger than `max_age_s` (`evidence_age`; judged when `now` is given,
    which the timer always does), the policy its gateway applies the declared one (`policy_mismatch`),
    its gateway active and staked on chain (the Gateway controller's word), and the latest decided
    committee round about it not failed. Reason `EnrolmentExpired` tells the caller to take the node back
    to Registered. The trust level says what stands behind the node's claims: an enrolled HPC here is
    netbooted with no TPM of its own (1), whatever its gateway's root; the message names the root kind
    (software or zymkey), since a software root is never a Zymkey."""
    if status.get("phase") != PHASE_ENROLLED:
        return "False", "", "", 0  # not enrolled: the enrolment's word stands
    if now is not None:
        age, what = evidence_age(status, last_round, now)
        if age is None or age > max_age_s:
            told = "it has no dated evidence" if age is None else f"its freshest evidence ({what}) is {age:.0f} s old"
            return ("False", REASON_ENROLMENT_EXPIRED,
                    f"enrolment expired: {told}, over the maximum of {max_age_s:.0f} s "
                    "(TRUSTCAP_ENROLMENT_MAX_AGE_SECONDS); the gateway's next enrolment quote enrols it again "
                    "(reboot the HPC, or restart its gateway)", 0)
    mismatch = policy_mismatch(spec or {}, status)
    if mismatch is not None:
        return "False", REASON_POLICY_MISMATCH, f"enrolled, but {mismatch}", TRUST_NETBOOT_NO_TPM
    gw_status = (gateway or {}).get("status") or {}
    if not gw_status.get("phase"):
        return "False", "", "", 0  # no chain judged the gateway: the enrolment's word stands
    root = ((gateway or {}).get("spec") or {}).get("trustRoot", "unknown")
    if gw_status.get("phase") != "Active":
        return ("False", REASON_GATEWAY_NOT_ACTIVE,
                f"enrolled, but its gateway is {gw_status['phase']} on chain",
                TRUST_NETBOOT_NO_TPM)
    if last_round is not None and (last_round.get("status") or {}).get("result") in ("Failed", "Expired"):
        name = (last_round.get("metadata") or {}).get("name", "?")
        return ("False", REASON_ATTESTATION_FAILED,
                f"the committee did not pass it in round {name} ({last_round['status']['result']})",
                TRUST_NETBOOT_NO_TPM)
    rounds = f"; last round {last_round['metadata']['name']} passed" if last_round is not None else ""
    return ("True", REASON_TRUSTED,
            f"enrolled, netbooted (no TPM on the HPC), gateway active on chain with a {root} root{rounds}",
            TRUST_NETBOOT_NO_TPM)


def trust_patch(*, status: Mapping[str, Any], spec: Mapping[str, Any], generation: int,
                gateway: Mapping[str, Any] | None, last_round: Mapping[str, Any] | None, now: datetime,
                max_age_s: float) -> tuple[dict[str, Any], tuple[str, str, str] | None]:
    """The status patch `judge_node_trust` writes (empty: nothing changed) and the event on a flip
    (type, reason, message)."""
    ready, reason, message, level = judge_trust(status=status, gateway=gateway, last_round=last_round, spec=spec,
                                                now=now, max_age_s=max_age_s)
    if not reason:
        return {}, None
    up = cond.set_condition(status.get("conditions"), type_=cond.READY, status=ready,
                            reason=reason, message=message, observed_generation=generation, now=now)
    patch: dict[str, Any] = {}
    reputation = ((gateway or {}).get("status") or {}).get("reputation")
    if up.changed or status.get("trustLevel") != level or (reputation is not None
                                                          and status.get("reputation") != reputation):
        patch["conditions"] = up.conditions
        patch["trustLevel"] = level
        if reputation is not None:
            patch["reputation"] = int(reputation)
    if reason == REASON_ENROLMENT_EXPIRED:
        # Back to Registered: the gateway's eligibility (phase Enrolled) ends with it, and the challenge
        # the operator already issued is the one the next enrolment quote must answer.
        patch["phase"] = PHASE_REGISTERED
        if not status.get("enrolmentChallenge"):
            patch["enrolmentChallenge"] = new_challenge(now)
    event = ("Normal" if ready == "True" else "Warning", reason, message) if up.flipped or \
        reason == REASON_ENROLMENT_EXPIRED else None
    return patch, event


# -- kopf wiring ---------------------------------------------------------------------------------------

# kopf's indexes, injected into the timers as keyword arguments named after their functions: key -> the
# values every indexed object gave for it (one per object; a name is one object). kopf's handler protocols
# do not admit extra named parameters (its own TODO: index typing waits on ParamSpec), so the timers take
# them from **kwargs through `_index`, which names the one index type they all have.
NameIndex: TypeAlias = "kopf.Index[str, dict[str, Any]]"
INDEXES: Final = ("trustcap_gateways", "trustcap_bootimages", "trustcap_gateway_trust", "trustcap_node_rounds")


def _index(kwargs: Mapping[str, Any], name: str) -> NameIndex:
    """One of this module's kopf indexes from a handler's kwargs; a missing one is a wiring bug, named."""
    if name not in INDEXES or name not in kwargs:
        raise kopf.PermanentError(f"kopf index {name!r} was not injected: its @kopf.index is not registered")
    return cast("NameIndex", kwargs[name])


@kopf.index(GROUP, VERSION, GATEWAYS)
def trustcap_gateways(name: str, spec: kopf.Spec, **_: Any) -> dict[str, dict[str, Any]]:
    """Gateway name -> the identity fields a countersignature is checked against."""
    return {name: {"address": spec.get("address"), "signingKey": spec.get("signingKey")}}


@kopf.index(GROUP, VERSION, BOOTIMAGES)
def trustcap_bootimages(name: str, status: kopf.Status, **_: Any) -> dict[str, dict[str, Any]]:
    """BootImage name -> its approval state and the digest quotes must carry."""
    return {name: {"phase": status.get("phase"), "imageDigest": status.get("imageDigest")}}


def _one(index: Mapping[str, Iterable[dict[str, Any]]], key: Any) -> dict[str, Any] | None:
    if not isinstance(key, str) or key not in index:
        return None
    return next(iter(index[key]), None)


@kopf.on.resume(GROUP, VERSION, HPCNODES, timeout=HANDLER_TIMEOUT_S, retries=10, backoff=2)
@kopf.on.create(GROUP, VERSION, HPCNODES, timeout=HANDLER_TIMEOUT_S, retries=10, backoff=2)
def register_hpcnode(body: kopf.Body, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch,
                     logger: kopf.Logger, **_: Any) -> None:
    """Give a new node its phase, its Ready condition and its first enrolment challenge (once)."""
    now = cond.utcnow()
    if not status.get("enrolmentChallenge"):
        patch.status["enrolmentChallenge"] = new_challenge(now)
    if status.get("phase") or cond.get_condition(status.get("conditions"), cond.READY) is not None:
        return
    gen = int(meta.get("generation") or 0)
    message = "waiting for the node's agent to enrol through its gateway"
    update = cond.set_condition(status.get("conditions"), type_=cond.READY, status="False",
                                reason=REASON_AWAITING_ENROLMENT, message=message, observed_generation=gen, now=now)
    patch.status.update({"phase": PHASE_REGISTERED, "observedGeneration": gen, "conditions": update.conditions})
    logger.info("HPCNode registered; awaiting enrolment")
    kopf.warn(body, reason=REASON_AWAITING_ENROLMENT, message=message)


@kopf.timer(GROUP, VERSION, HPCNODES, interval=TIMER_INTERVAL_S, idle=None, timeout=30.0)
def judge_enrolment(body: kopf.Body, name: str, meta: kopf.Meta, spec: kopf.Spec, status: kopf.Status,
                    patch: kopf.Patch, logger: kopf.Logger, **kwargs: Any) -> None:
    """Verify newly published enrolment evidence and write the verdict (see the module docstring).

    The two indexes arrive as keyword arguments named after their functions (kopf's index injection).
    The gateway's reports are judged first (`judge_reports`), so a quarantine it asked for holds against
    evidence decided in the same tick."""
    now = cond.utcnow()
    generation = int(meta.get("generation") or 0)
    view: Mapping[str, Any] = status
    reported = judge_reports(status=status, generation=generation, now=now)
    if reported is not None:
        patch.status.update(reported.status)
        view = {**status, **reported.status}
        if "phase" in reported.status:
            logger.warning("phase %s from the gateway's report", reported.status["phase"])
        if reported.warning is not None:
            kopf.warn(body, reason=reported.warning[0], message=reported.warning[1])
        if reported.notice is not None:
            kopf.info(body, reason=reported.notice[0], message=reported.notice[1])
    enrolment = view.get("enrolment")
    if not isinstance(enrolment, Mapping) or view.get("enrolmentChecked") == evidence_id(enrolment):
        return
    gateway = _one(_index(kwargs, "trustcap_gateways"), spec.get("gateway"))
    boot_image = _one(_index(kwargs, "trustcap_bootimages"), spec.get("bootImage"))
    published = _parse_time(enrolment.get("time"))
    if (gateway is None or boot_image is None) and published is not None \
            and (now - published).total_seconds() < REFERENCE_GRACE_S:
        if view.get("phase") not in (PHASE_QUARANTINED, PHASE_BOOTING) and \
                enrolment.get("agentKey") != view.get("agentKey"):
            patch.status["phase"] = PHASE_BOOTING  # a new boot's evidence, not decided yet
        logger.info("enrolment evidence names a Gateway/BootImage not seen yet; waiting")
        return
    decision = decide(node_name=name, status=view, generation=generation,
                      gateway=gateway, boot_image=boot_image, now=now)
    if decision is None:
        return
    patch.status.update(decision.status)
    if decision.enrolled:
        logger.info("enrolment verified: phase Enrolled, agent key %s", decision.status["agentKey"][:12])
    else:
        logger.warning("enrolment refused; failed claims: %s", ", ".join(decision.failed_claims) or "none")
    if decision.warning is not None:
        kopf.warn(body, reason=decision.warning[0], message=decision.warning[1])


@kopf.index(GROUP, VERSION, GATEWAYS)
def trustcap_gateway_trust(name: str, spec: kopf.Spec, status: kopf.Status, **_: Any) -> dict[str, dict[str, Any]]:
    """Gateway name -> its root kind and its chain state as the Gateway controller judged it."""
    return {name: {"spec": {"trustRoot": spec.get("trustRoot", "unknown")},
                   "status": {"phase": status.get("phase"), "reputation": status.get("reputation")}}}


@kopf.index(GROUP, VERSION, ATTESTATIONS)
def trustcap_node_rounds(spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, **_: Any) -> dict[str, Any]:
    """The decided capsule rounds about each node (Attestation spec.node), for `judge_node_trust`."""
    if not status.get("result") or not spec.get("node"):
        return {}
    return {str(spec["node"]): {"metadata": {"name": meta.get("name")},
                                "status": {"result": status.get("result"), "decidedAt": status.get("decidedAt")}}}


@kopf.timer(GROUP, VERSION, HPCNODES, interval=10.0, initial_delay=2.0, idle=None, timeout=30.0)
def judge_node_trust(body: kopf.Body, name: str, meta: kopf.Meta, spec: kopf.Spec, status: kopf.Status,
                     patch: kopf.Patch, **kwargs: Any) -> None:
    """Ready, trustLevel and reputation of an enrolled node, from what the operator itself judged: the
    age of its evidence, the policy its gateway applies, the Gateway's chain state and the committee
    rounds about the node (the operator stays the only writer). Re-judged every 10 s, so an expiry needs
    no event to happen."""
    gateway = _one(_index(kwargs, "trustcap_gateway_trust"), spec.get("gateway"))
    decided = list(_index(kwargs, "trustcap_node_rounds").get(name, []))
    last = max(decided, key=lambda r: str(r["status"].get("decidedAt") or ""), default=None)
    update, event = trust_patch(status=status, spec=spec, generation=int(meta.get("generation") or 0),
                                gateway=gateway, last_round=last, now=cond.utcnow(), max_age_s=enrolment_max_age_s())
    for key, value in update.items():
        patch.status[key] = value
    if event is not None:
        kopf.event(body, type=event[0], reason=event[1], message=event[2])
