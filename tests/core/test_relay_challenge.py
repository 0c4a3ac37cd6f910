"""The signed relay challenge (trustcap.evidence.challenge): what a verifier signs is bound to its
domain, nonce, node, own address and time; any change breaks the signature, and malformed fields are named."""

from __future__ import annotations

from typing import Any

import pytest

from trustcap import canonical
from trustcap.chain.keys import KeySigner
from trustcap.evidence import (
    CHALLENGE_DOMAIN,
    ChallengeFormatError,
    SignatureError,
    challenge_digest,
    sign_challenge,
    verify_challenge,
)
from trustcap.evidence.wipeproof import DOMAIN as WIPE_DOMAIN

SIGNER = KeySigner("0x" + "4b" * 32)
NONCE = bytes(range(32))


def good() -> dict[str, Any]:
    return sign_challenge(NONCE, "hpc-1", SIGNER, issued_at=1_700_000_000)


def test_sign_then_verify_names_the_signer_and_binds_every_field() -> None:
    doc = good()
    c = verify_challenge(doc)
    assert (c.nonce, c.node, c.verifier, c.issued_at) == (NONCE, "hpc-1", SIGNER.address, 1_700_000_000)
    assert c.digest == canonical.digest({"domain": CHALLENGE_DOMAIN, "nonce": "0x" + NONCE.hex(), "node": "hpc-1",
                                         "verifier": SIGNER.address, "issuedAt": 1_700_000_000})
    assert CHALLENGE_DOMAIN != WIPE_DOMAIN


@pytest.mark.parametrize(("field", "value"), [
    pytest.param("nonce", "0x" + "ff" * 32, id="nonce"),
    pytest.param("node", "hpc-2", id="node"),
    pytest.param("verifier", KeySigner("0x" + "5c" * 32).address, id="verifier"),
    pytest.param("issuedAt", 1_700_000_001, id="issued-at"),
])
def test_changing_any_signed_field_breaks_the_signature(field: str, value: Any) -> None:
    doc = {**good(), field: value}
    with pytest.raises(SignatureError):
        verify_challenge(doc)


def test_the_digest_depends_on_each_field() -> None:
    base = {"nonce": NONCE, "node": "n", "verifier": SIGNER.address, "issued_at": 1}
    digests = {challenge_digest(**base)}
    for key, value in (("nonce", bytes(32)), ("node", "m"), ("verifier", "0x" + "00" * 20), ("issued_at", 2)):
        digests.add(challenge_digest(**{**base, key: value}))
    assert len(digests) == 5


@pytest.mark.parametrize(("doc", "field"), [
    pytest.param([], "body", id="not-an-object"),
    pytest.param({**good(), "extra": 1}, "extra", id="unknown-field"),
    pytest.param({k: v for k, v in good().items() if k != "issuedAt"}, "issuedAt", id="missing-issued-at"),
    pytest.param({**good(), "issuedAt": -1}, "issuedAt", id="negative-time"),
    pytest.param({**good(), "issuedAt": 1.5}, "issuedAt", id="float-time"),
    pytest.param({**good(), "issuedAt": 2**53}, "issuedAt", id="time-beyond-i-json"),
    pytest.param({**good(), "node": "x" * 254}, "node", id="node-too-long"),
    pytest.param({**good(), "verifier": SIGNER.address.lower()}, "verifier", id="verifier-lowercase"),
    pytest.param({**good(), "signature": "0x" + "zz" * 65}, "signature", id="signature-not-hex"),
])
def test_malformed_challenges_name_the_field(doc: Any, field: str) -> None:
    with pytest.raises(ChallengeFormatError) as info:
        verify_challenge(doc)
    assert info.value.field == field and f"field {field!r}" in str(info.value)


def test_signing_refuses_a_short_nonce_or_empty_node() -> None:
    with pytest.raises(ChallengeFormatError, match="'nonce'"):
        sign_challenge(b"\x00" * 31, "hpc-1", SIGNER, issued_at=1)
    with pytest.raises(ChallengeFormatError, match="'node'"):
        sign_challenge(NONCE, "", SIGNER, issued_at=1)


# --- capsule rounds (decision 0090) ------------------------------------------------------------------------
CAPSULE = {"taskId": "0x" + "7a" * 32, "round": "0x" + "3c" * 32, "phase": "pre"}


def capsule_challenge(**override: Any) -> dict[str, Any]:
    return sign_challenge(NONCE, "hpc-1", SIGNER, issued_at=1_700_000_000, capsule={**CAPSULE, **override})


def test_a_challenge_without_capsule_hashes_exactly_as_before() -> None:
    # the pre-capsule digest, written out: the monitor's and a lab verifier's challenges must not change
    old = canonical.digest({"domain": CHALLENGE_DOMAIN, "nonce": "0x" + NONCE.hex(), "node": "hpc-1",
                            "verifier": SIGNER.address, "issuedAt": 1_700_000_000})
    doc = good()
    assert "capsule" not in doc
    c = verify_challenge(doc)
    assert c.digest == old and c.capsule is None
    assert challenge_digest(nonce=NONCE, node="hpc-1", verifier=SIGNER.address, issued_at=1_700_000_000,
                            capsule=None) == old


def test_a_capsule_challenge_signs_its_capsule_and_returns_it() -> None:
    doc = capsule_challenge()
    c = verify_challenge(doc)
    assert c.capsule == CAPSULE
    assert c.digest == canonical.digest({"domain": CHALLENGE_DOMAIN, "nonce": "0x" + NONCE.hex(), "node": "hpc-1",
                                         "verifier": SIGNER.address, "issuedAt": 1_700_000_000, "capsule": CAPSULE})
    assert c.digest != verify_challenge(good()).digest


@pytest.mark.parametrize(("field", "value"), [
    pytest.param("taskId", "0x" + "7b" * 32, id="other-task"),
    pytest.param("round", "0x" + "3d" * 32, id="other-round"),
    pytest.param("phase", "post", id="other-phase"),
])
def test_tampering_with_the_capsule_breaks_the_signature(field: str, value: str) -> None:
    doc = capsule_challenge()
    assert verify_challenge(doc).capsule == CAPSULE  # positive control: the untouched one verifies
    doc["capsule"] = {**doc["capsule"], field: value}
    with pytest.raises(SignatureError):
        verify_challenge(doc)


def test_dropping_the_capsule_breaks_the_signature() -> None:
    doc = capsule_challenge()
    del doc["capsule"]
    with pytest.raises(SignatureError):
        verify_challenge(doc)


def test_adding_a_capsule_to_a_plain_challenge_breaks_the_signature() -> None:
    with pytest.raises(SignatureError):
        verify_challenge({**good(), "capsule": dict(CAPSULE)})


@pytest.mark.parametrize(("capsule", "field"), [
    pytest.param(None, "capsule", id="null"),
    pytest.param("r-1", "capsule", id="not-an-object"),
    pytest.param({**CAPSULE, "extra": 1}, "capsule.extra", id="unknown-field"),
    pytest.param({k: v for k, v in CAPSULE.items() if k != "round"}, "capsule.round", id="missing-round"),
    pytest.param({**CAPSULE, "taskId": "0x" + "7A" * 32}, "capsule.taskId", id="task-uppercase"),
    pytest.param({**CAPSULE, "taskId": "0x" + "7a" * 31}, "capsule.taskId", id="task-short"),
    pytest.param({**CAPSULE, "round": ""}, "capsule.round", id="round-empty"),
    pytest.param({**CAPSULE, "round": "R/1"}, "capsule.round", id="round-not-a-name"),
    pytest.param({**CAPSULE, "round": "r" * 254}, "capsule.round", id="round-too-long"),
    pytest.param({**CAPSULE, "phase": "boot"}, "capsule.phase", id="phase-boot"),
])
def test_malformed_capsules_name_the_field(capsule: Any, field: str) -> None:
    with pytest.raises(ChallengeFormatError) as info:
        verify_challenge({**capsule_challenge(), "capsule": capsule})
    assert info.value.field == field
    if capsule is not None and not isinstance(capsule, str):
        with pytest.raises(ChallengeFormatError) as signing:
            sign_challenge(NONCE, "hpc-1", SIGNER, issued_at=1, capsule=capsule)
        assert signing.value.field == field
