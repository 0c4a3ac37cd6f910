"""A signed wipe proof states what it does not cover, and that statement is signed (issue 12 item 19).

A recipient reads `clean: true` next to `notCovered`; the attacks are a proof shorn of its stated limits
(after signing, or by a signer that never stated them) and one whose limits were edited. Each has the
positive control of the same proof as signed.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from trustcap.chain.keys import KeySigner
from trustcap.evidence.errors import EvidenceFormatError, SignatureError
from trustcap.evidence.wipeproof import NOT_COVERED, sign_wipe_proof, verify_wipe_proof, wipe_proof_digest

GATEWAY = KeySigner("0x" + "3c" * 32)


def _proof(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"version": 1, "level": "reboot", "node": "hpc-1", "gateway": GATEWAY.address,
                            "request": "r1", "reason": "policy", "clean": True,
                            "checks": {"powerCycled": True, "newBootKey": True, "approvedImage": True,
                                       "linkCycled": True},
                            "error": ""}
    return {**base, **over}


def test_a_reboot_proof_states_that_ram_and_disks_are_not_wiped() -> None:
    proof = verify_wipe_proof(sign_wipe_proof(_proof(), GATEWAY), GATEWAY.address)
    gaps = " ".join(proof["notCovered"])
    assert "RAM" in gaps and "local disks" in gaps
    assert proof["notCovered"][:len(NOT_COVERED["reboot"])] == list(NOT_COVERED["reboot"])


def test_the_signer_keeps_the_levels_gaps_and_adds_the_callers() -> None:
    extra = "the capsule's network peers: what it sent is out of reach"
    proof = sign_wipe_proof(_proof(notCovered=[NOT_COVERED["reboot"][0], extra]), GATEWAY)["proof"]
    assert proof["notCovered"] == [*NOT_COVERED["reboot"], extra]
    proof = sign_wipe_proof(_proof(notCovered=[]), GATEWAY)["proof"]  # an empty list does not remove them
    assert proof["notCovered"] == list(NOT_COVERED["reboot"])


def test_the_callers_proof_is_not_changed() -> None:
    mine = _proof()
    sign_wipe_proof(mine, GATEWAY)
    assert "notCovered" not in mine


def _drop(signed: dict[str, Any]) -> None:
    del signed["proof"]["notCovered"]


def _empty(signed: dict[str, Any]) -> None:
    signed["proof"]["notCovered"] = []


def _shorten(signed: dict[str, Any]) -> None:
    signed["proof"]["notCovered"] = signed["proof"]["notCovered"][1:]


def _reword(signed: dict[str, Any]) -> None:
    signed["proof"]["notCovered"] = ["nothing of note"]


@pytest.mark.parametrize(("attack", "error"), [
    pytest.param(_drop, EvidenceFormatError, id="limits-removed"),
    pytest.param(_empty, EvidenceFormatError, id="limits-emptied"),
    pytest.param(_shorten, SignatureError, id="a-limit-dropped"),
    pytest.param(_reword, SignatureError, id="limits-reworded"),
])
def test_a_proof_shorn_or_edited_of_its_limits_does_not_verify(attack: Any, error: type[Exception]) -> None:
    signed = sign_wipe_proof(_proof(), GATEWAY)
    assert verify_wipe_proof(copy.deepcopy(signed), GATEWAY.address)["clean"] is True  # control
    attack(signed)
    with pytest.raises(error):
        verify_wipe_proof(signed, GATEWAY.address)


def test_a_signer_that_never_stated_the_limits_is_refused() -> None:
    """A proof signed over a body with no notCovered (as the signer did before item 19) verifies its
    signature, but not as a wipe proof: it claims more than any wipe does."""
    bare = _proof()
    signed = {"proof": bare, "signature": "0x" + GATEWAY.sign_digest(wipe_proof_digest(bare)).hex()}
    with pytest.raises(EvidenceFormatError, match="notCovered"):
        verify_wipe_proof(signed, GATEWAY.address)


@pytest.mark.parametrize("given", [
    pytest.param(None, id="none-given"),
    pytest.param([], id="empty"),
])
def test_a_level_with_no_standing_gaps_must_list_its_own(given: Any) -> None:
    proof = _proof(level="scratch") if given is None else _proof(level="scratch", notCovered=given)
    with pytest.raises(EvidenceFormatError, match="must state what it does not cover"):
        sign_wipe_proof(proof, GATEWAY)
    signed = sign_wipe_proof(_proof(level="scratch", notCovered=["RAM"]), GATEWAY)  # control
    assert verify_wipe_proof(signed, GATEWAY.address)["notCovered"] == ["RAM"]


@pytest.mark.parametrize("bad", [
    pytest.param("RAM", id="a-string-not-a-list"),
    pytest.param([""], id="an-empty-entry"),
    pytest.param([1], id="not-text"),
])
def test_malformed_limits_are_refused_when_signing(bad: Any) -> None:
    with pytest.raises(EvidenceFormatError, match="notCovered"):
        sign_wipe_proof(_proof(notCovered=bad), GATEWAY)


_ALL = {"powerCycled": True, "newBootKey": True, "approvedImage": True, "linkCycled": True}


@pytest.mark.parametrize(("checks", "why"), [
    pytest.param({**_ALL, "linkCycled": None}, "linkCycled not true", id="carrier-not-watched"),
    pytest.param({**_ALL, "newBootKey": False}, "newBootKey false", id="a-check-failed"),
    pytest.param({k: v for k, v in _ALL.items() if k != "linkCycled"}, "linkCycled not true",
                 id="carrier-check-absent"),
    pytest.param({k: v for k, v in _ALL.items() if k != "approvedImage"}, "approvedImage not true",
                 id="image-check-absent"),
    pytest.param({**_ALL, "matchesBaseline": False}, "matchesBaseline false", id="an-optional-check-failed"),
])
def test_a_clean_claim_its_checks_do_not_show_is_refused(checks: dict[str, Any], why: str) -> None:
    """What a recipient accepts as a clean reboot: the gateway signed the claim, but the claim must follow
    from the checks it signed with it. An older gateway, or one that calls an unwatched carrier a pass,
    is refused by the verifier even though its signature holds; the signer refuses to make one."""
    control = sign_wipe_proof(_proof(), GATEWAY)
    assert verify_wipe_proof(control, GATEWAY.address)["clean"] is True  # positive control
    body = {**_proof(checks=checks), "notCovered": list(NOT_COVERED["reboot"])}
    signed = {"proof": body, "signature": "0x" + GATEWAY.sign_digest(wipe_proof_digest(body)).hex()}
    with pytest.raises(EvidenceFormatError, match=why):
        verify_wipe_proof(signed, GATEWAY.address)
    with pytest.raises(EvidenceFormatError, match=why):
        sign_wipe_proof(_proof(checks=checks), GATEWAY)
    assert verify_wipe_proof(sign_wipe_proof(_proof(checks=checks, clean=False), GATEWAY),
                             GATEWAY.address)["clean"] is False  # the same checks, honestly not clean


@pytest.mark.parametrize(("over", "why"), [
    pytest.param({"clean": 1, "checks": {**_ALL, "linkCycled": None}}, "clean is true or false", id="clean-1"),
    pytest.param({"checks": {**_ALL, "newBootKey": 0}}, "true | false | null", id="check-0"),
    pytest.param({"level": "Reboot", "checks": {"powerCycled": True}}, "level is 'reboot'", id="level-case"),
])
def test_a_clean_claim_in_a_shape_that_slips_past_the_rules_is_refused(over: dict[str, Any], why: str) -> None:
    """The same claim rule, attacked through JSON shapes: 1 for true, 0 for false, a level in capitals that
    no rule names. Signed by the gateway, still refused; the control is the honest proof above."""
    body = {**_proof(**over), "notCovered": list(NOT_COVERED["reboot"])}
    signed = {"proof": body, "signature": "0x" + GATEWAY.sign_digest(wipe_proof_digest(body)).hex()}
    with pytest.raises(EvidenceFormatError, match=why):
        verify_wipe_proof(signed, GATEWAY.address)
