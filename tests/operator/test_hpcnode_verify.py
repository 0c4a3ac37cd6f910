"""The operator's verification of published enrolment evidence: every claim, each failure named.

Real keys and real signatures (software secp256k1 keys stand in for the agent's boot key and the
gateway's trust root); the clock is frozen; the Kubernetes side is the plain data the handler would
read from its indexes, so nothing here reaches a service.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from trustcap.agent.identity import BootKey
from trustcap.evidence import SignedQuote, encode_signed_quote, new_quote, sign_quote
from trustcap.operator import hpcnode

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
NODE = "hpc-a"
APPROVED = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32
NONCE = "0x" + "11" * 32
AGENT = BootKey(b"\x01" * 32)
GATEWAY = BootKey(b"\x02" * 32)
INTRUDER = BootKey(b"\x03" * 32)


def _signed(*, nonce: str = NONCE, issued: datetime = NOW - timedelta(seconds=3), node: str = NODE,
            boot: str = APPROVED, agent: BootKey = AGENT, gateway: BootKey = GATEWAY,
            agent_key: BootKey = AGENT) -> SignedQuote:
    quote = new_quote(nonce=bytes.fromhex(nonce[2:]), issued_at=int(issued.timestamp()), node_id=node,
                      gateway=GATEWAY.address, agent_key=agent_key.public_key(),
                      boot_image_digest=bytes.fromhex(boot[7:]), measurements={"kernel": "0x" + "22" * 32},
                      capsule_state={"phase": "idle"})
    return sign_quote(quote, agent, gateway)


def _enrolment(signed: SignedQuote, **override: Any) -> dict[str, Any]:
    doc = {"agentKey": signed.quote.agent_key, "bootImageDigest": "sha256:" + signed.quote.boot_image_digest[2:],
           "gateway": GATEWAY.address, "quote": encode_signed_quote(signed).decode(),
           "time": "2025-03-01T11:59:58Z"}
    doc.update(override)
    return doc


def _status(enrolment: dict[str, Any], **override: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"phase": "Booting", "enrolment": enrolment,
                           "enrolmentChallenge": {"nonce": NONCE, "issuedAt": "2025-03-01T11:59:00Z"}}
    doc.update(override)
    return doc


GW_SPEC = {"address": GATEWAY.address, "signingKey": "0x" + GATEWAY.public_key().hex()}
BI_STATUS = {"phase": "Approved", "imageDigest": APPROVED}


def _decide(status: dict[str, Any], *, gateway: dict[str, Any] | None = GW_SPEC,
            boot_image: dict[str, Any] | None = BI_STATUS) -> hpcnode.Decision | None:
    return hpcnode.decide(node_name=NODE, status=status, generation=1, gateway=gateway, boot_image=boot_image,
                          now=NOW)


def test_genuine_evidence_enrols_with_the_approved_digest() -> None:
    signed = _signed()
    status = _status(_enrolment(signed))
    decision = _decide(status)
    assert decision is not None and decision.enrolled and decision.warning is None
    s = decision.status
    assert s["phase"] == "Enrolled"
    assert s["agentKey"] == "0x" + AGENT.public_key().hex()
    assert s["lastQuote"]["bootImageDigest"] == APPROVED
    assert s["lastQuote"]["time"] == "2025-03-01T11:59:57Z"
    assert s["quarantineReason"] is None
    ready = [c for c in s["conditions"] if c["type"] == "Ready"]
    assert ready == [{"type": "Ready", "status": "False", "reason": "Enrolled", "message": ready[0]["message"],
                      "lastTransitionTime": "2025-03-01T12:00:00Z", "observedGeneration": 1}]
    assert s["enrolmentChecked"] == hpcnode.evidence_id(status["enrolment"])
    assert s["enrolmentChallenge"]["nonce"] != NONCE  # the nonce is spent: a replay cannot answer it again


def test_same_evidence_is_decided_once() -> None:
    status = _status(_enrolment(_signed()))
    first = _decide(status)
    assert first is not None
    after = {**status, **first.status}
    assert _decide(after) is None


def test_replayed_evidence_after_the_challenge_rotated_is_refused() -> None:
    """The operator rotates the challenge in the same patch; republishing the old quote (a new evidence id
    because the time differs) answers a spent nonce."""
    signed = _signed()
    first = _decide(_status(_enrolment(signed)))
    assert first is not None
    replay = {**_status(_enrolment(signed, time="2025-03-01T12:00:00Z")), **{
        "enrolmentChallenge": first.status["enrolmentChallenge"], "enrolmentChecked": first.status["enrolmentChecked"]}}
    decision = _decide(replay)
    assert decision is not None and not decision.enrolled
    assert "nonce.mismatch" in decision.failed_claims


Case = Callable[[], tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]]


def _case(status: dict[str, Any], gateway: dict[str, Any] | None = GW_SPEC,
          boot_image: dict[str, Any] | None = BI_STATUS) -> tuple[dict[str, Any], Any, Any]:
    return status, gateway, boot_image


FAILURES = [
    pytest.param(lambda: _case(_status(_enrolment(_signed(gateway=INTRUDER)))),
                 ["quote.signature.gateway"], id="forged-countersignature"),
    pytest.param(lambda: _case(_status(_enrolment(_signed(agent=INTRUDER)))),
                 ["quote.signature.agent"], id="agent-signature-by-another-key"),
    pytest.param(lambda: _case(_status(_enrolment(_signed(), agentKey="0x" + INTRUDER.public_key().hex()))),
                 ["quote.identity.agent_key", "quote.signature.agent"], id="reported-agent-key-differs"),
    pytest.param(lambda: _case(_status(_enrolment(_signed(boot=OTHER)))),
                 ["boot.digest.not_approved"], id="boot-digest-not-approved"),
    pytest.param(lambda: _case(_status(_enrolment(_signed(), bootImageDigest=APPROVED[:-2] + "00"))),
                 ["boot.digest.not_approved", "enrolment.boot_digest.mismatch"], id="reported-digest-not-quoted"),
    pytest.param(lambda: _case(_status(_enrolment(_signed(boot=OTHER), bootImageDigest=APPROVED))),
                 ["enrolment.boot_digest.mismatch", "boot.digest.not_approved"], id="reported-approved-quoted-other"),
    pytest.param(lambda: _case(_status(_enrolment(_signed())),
                               boot_image={"phase": "Pending", "imageDigest": APPROVED}),
                 ["boot.image.not_approved"], id="bootimage-pending"),
    pytest.param(lambda: _case(_status(_enrolment(_signed())), boot_image={"phase": "Approved"}),
                 ["boot.image.no_digest"], id="bootimage-without-digest"),
    pytest.param(lambda: _case(_status(_enrolment(_signed())), boot_image=None),
                 ["boot.image.missing"], id="bootimage-missing"),
    pytest.param(lambda: _case(_status(_enrolment(_signed(nonce="0x" + "99" * 32)))),
                 ["nonce.mismatch"], id="other-nonce"),
    pytest.param(lambda: _case(_status(_enrolment(_signed()), enrolmentChallenge=None)),
                 ["nonce.no_challenge"], id="no-challenge"),
    pytest.param(lambda: _case(_status(_enrolment(_signed(issued=NOW - timedelta(minutes=5))))),
                 ["quote.predates_challenge"], id="quote-older-than-challenge"),
    pytest.param(lambda: _case(_status(_enrolment(_signed(issued=NOW + timedelta(minutes=5))))),
                 ["quote.future"], id="quote-from-the-future"),
    pytest.param(lambda: _case(_status(_enrolment(_signed(node="hpc-b")))),
                 ["quote.identity.node"], id="quote-for-another-node"),
    pytest.param(lambda: _case(_status(_enrolment(_signed())), gateway=None),
                 ["gateway.missing"], id="gateway-missing"),
    pytest.param(lambda: _case(_status(_enrolment(_signed())),
                               gateway={"address": INTRUDER.address, "signingKey": GW_SPEC["signingKey"]}),
                 ["gateway.identity.inconsistent"], id="gateway-address-not-its-key"),
    pytest.param(lambda: _case(_status(_enrolment(_signed())),
                               gateway={"address": INTRUDER.address, "signingKey": "0x" + INTRUDER.public_key().hex()}),
                 ["quote.identity.gateway", "quote.signature.gateway"], id="countersigned-by-another-gateway"),
    pytest.param(lambda: _case(_status(_enrolment(_signed(), quote='{"quote": 1}'))),
                 ["enrolment.quote.malformed"], id="quote-malformed"),
    pytest.param(lambda: _case(_status(_enrolment(_signed(), agentKey="0x02zz"))),
                 ["enrolment.agent_key.malformed"], id="agent-key-malformed"),
    pytest.param(lambda: _case(_status(_enrolment(_signed(gateway=INTRUDER, boot=OTHER)))),
                 ["boot.digest.not_approved", "quote.signature.gateway"], id="forged-and-unapproved-both-named"),
]


@pytest.mark.parametrize(("make", "claims"), FAILURES)
def test_bad_evidence_quarantines_naming_every_failed_claim(make: Case, claims: list[str]) -> None:
    status, gateway, boot_image = make()
    decision = _decide(status, gateway=gateway, boot_image=boot_image)
    assert decision is not None and not decision.enrolled
    assert sorted(decision.failed_claims) == sorted(claims)
    s = decision.status
    assert s["phase"] == "Quarantined"
    for claim in claims:
        assert claim in s["quarantineReason"]
    assert len(s["quarantineReason"]) <= hpcnode.MAX_REASON
    ready = next(c for c in s["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Quarantined")
    assert decision.warning == ("Quarantined", s["quarantineReason"])
    assert "agentKey" not in s and "lastQuote" not in s  # nothing of the refused evidence is adopted


def test_quarantine_is_sticky_even_for_genuine_evidence() -> None:
    status = _status(_enrolment(_signed()), phase="Quarantined", quarantineReason="set by a person")
    decision = _decide(status)
    assert decision is not None and not decision.enrolled
    assert "phase" not in decision.status and "agentKey" not in decision.status
    assert decision.warning is not None and decision.warning[0] == "Quarantined"


def test_no_evidence_no_decision() -> None:
    assert _decide({"phase": "Registered"}) is None


def test_challenges_are_fresh_and_well_formed() -> None:
    a, b = hpcnode.new_challenge(NOW), hpcnode.new_challenge(NOW)
    assert a["nonce"] != b["nonce"] and len(a["nonce"]) == 66 and a["issuedAt"] == "2025-03-01T12:00:00Z"
