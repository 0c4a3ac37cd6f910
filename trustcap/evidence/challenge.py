"""Signed relay challenges: a committee verifier proves who asks an executor's gateway for a quote.

Without this, anyone who reaches a gateway's relay can make its agent quote, as often as the relay's
in-flight bound allows. The verifier is another Pi gateway with a secp256k1 trust root (the `Signer`
interface), listed in the cluster as a Gateway object (`spec.address`), so it signs its request:

    {"nonce": "0x<64 hex>", "node": "<executor node id>", "verifier": "0x<EIP-55 address>",
     "issuedAt": <unix seconds>, "signature": "0x<65 bytes hex>"}

The signature is over `canonical.digest({"domain": DOMAIN, "nonce", "node", "verifier", "issuedAt"})`.
A capsule round's challenge (decision 0090) also carries `"capsule": {"taskId", "round", "phase"}`, and
then the digest covers it too (`{..., "capsule": {...}}`); a challenge without one hashes exactly as
before, so an idle-state challenge (the gateway monitor's, a lab verifier's) is unchanged.
Each signed field closes one hole: `domain` keeps the signature from being replayed as any other signed
statement (quote, verdict, wipe proof); `node` keeps a request for one executor from being replayed at
another executor's relay; `issuedAt` bounds how long a captured request stays usable; the digest is the
replay key the relay remembers for that window. `verifier` is signed too, so a signature cannot be
re-labelled with another member's address. `capsule` is signed so that a member of one round's committee
cannot have its request re-pointed at another task or round (the relay serves a capsule challenge only
to a member of the round it names; the agent binds its answer's `capsule_state` to it).

This module only parses, signs and verifies. Whether the verifier is a member, whether the node is the
relay's own, the time window and replay memory are the relay's (gateway/relay.py), because only it knows
its node, its clock and what it has seen.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from eth_utils.address import to_checksum_address

from trustcap import canonical
from trustcap.evidence.errors import ChallengeFormatError, SignatureError
from trustcap.evidence.signing import Signer, recover_address

__all__ = ["CAPSULE_FIELDS", "CAPSULE_PHASES", "CHALLENGE_DOMAIN", "CHALLENGE_FIELDS", "Challenge",
           "challenge_digest", "parse_capsule", "sign_challenge", "verify_challenge"]

CHALLENGE_DOMAIN: Final = "trustcap.relay-challenge.v1"
CHALLENGE_FIELDS: Final = ("nonce", "node", "verifier", "issuedAt", "signature")  # all required
OPTIONAL_FIELDS: Final = ("capsule",)
CAPSULE_FIELDS: Final = ("taskId", "round", "phase")
CAPSULE_PHASES: Final = ("pre", "during", "post")
MAX_NODE_LEN: Final = 253  # a Kubernetes object name
_NONCE = re.compile(r"^0x[0-9a-f]{64}$")
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_SIGNATURE = re.compile(r"^0x[0-9a-fA-F]{130}$")
_ROUND = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")  # an object name or a 0x-hex round id
_MAX_TIME = 2**53 - 1  # I-JSON: integers a JSON peer can hold exactly


@dataclass(frozen=True)
class Challenge:
    """A verified challenge: who asked (`verifier`, recovered from the signature), what, and when."""

    nonce: bytes
    node: str
    verifier: str
    issued_at: int
    digest: bytes  # the signed statement's digest: the relay's replay key
    capsule: dict[str, str] | None = None  # {taskId, round, phase} of a capsule round, else None


def challenge_digest(*, nonce: bytes, node: str, verifier: str, issued_at: int,
                     capsule: Mapping[str, str] | None = None) -> bytes:
    """The 32 bytes a verifier signs (and the relay recovers its signer from)."""
    doc: dict[str, Any] = {"domain": CHALLENGE_DOMAIN, "nonce": "0x" + bytes(nonce).hex(), "node": node,
                           "verifier": verifier, "issuedAt": issued_at}
    if capsule is not None:
        doc["capsule"] = {k: capsule[k] for k in CAPSULE_FIELDS}
    return canonical.digest(doc)


def parse_capsule(value: Any) -> dict[str, str]:
    """A challenge's `capsule` field, checked: {taskId: 0x + 32 bytes lowercase hex, round: the round's
    name or id (lowercase, 1..253 characters), phase: pre|during|post}; ChallengeFormatError names the field."""
    if not isinstance(value, Mapping):
        raise ChallengeFormatError("capsule", "must be an object {taskId, round, phase}")
    unknown = sorted(str(k)[:64] for k in set(value) - set(CAPSULE_FIELDS))
    if unknown:
        raise ChallengeFormatError(f"capsule.{unknown[0]}", f"unknown field(s) {unknown[:8]}")
    missing = [f for f in CAPSULE_FIELDS if f not in value]
    if missing:
        raise ChallengeFormatError(f"capsule.{missing[0]}", "missing (a capsule challenge needs taskId, round, phase)")
    task, rnd, phase = (value[f] for f in CAPSULE_FIELDS)
    if not isinstance(task, str) or not _NONCE.match(task):
        raise ChallengeFormatError("capsule.taskId", "must be 32 bytes of lowercase 0x-hex")
    if not isinstance(rnd, str) or not _ROUND.match(rnd):
        raise ChallengeFormatError("capsule.round", "must be a round's name or id: 1..253 of [a-z0-9.-]")
    if phase not in CAPSULE_PHASES:
        raise ChallengeFormatError("capsule.phase", f"must be one of {', '.join(CAPSULE_PHASES)}")
    return {"taskId": task, "round": rnd, "phase": phase}


def sign_challenge(nonce: bytes, node: str, signer: Signer, *, issued_at: int,
                   capsule: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The request body for `POST /v1/challenge`, signed by the verifier's trust root; with `capsule`
    ({taskId, round, phase}), a capsule round's challenge, the capsule inside the signed digest."""
    if len(nonce) != 32:
        raise ChallengeFormatError("nonce", "a challenge nonce is 32 bytes")
    if not isinstance(node, str) or not 0 < len(node) <= MAX_NODE_LEN:
        raise ChallengeFormatError("node", f"must be a node id of 1..{MAX_NODE_LEN} characters")
    checked = None if capsule is None else parse_capsule(capsule)
    digest = challenge_digest(nonce=nonce, node=node, verifier=signer.address, issued_at=issued_at, capsule=checked)
    doc: dict[str, Any] = {"nonce": "0x" + bytes(nonce).hex(), "node": node, "verifier": signer.address,
                           "issuedAt": issued_at, "signature": "0x" + signer.sign_digest(digest).hex()}
    if checked is not None:
        doc["capsule"] = checked
    return doc


def _parse(doc: Any) -> tuple[Challenge, bytes]:
    if not isinstance(doc, dict):
        raise ChallengeFormatError("body", "must be a JSON object with the fields "
                                           + ", ".join(repr(f) for f in CHALLENGE_FIELDS))
    unknown = sorted(set(doc) - set(CHALLENGE_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise ChallengeFormatError(str(unknown[0])[:64], f"unknown field(s) {[str(u)[:64] for u in unknown[:8]]}")
    missing = [f for f in CHALLENGE_FIELDS if f not in doc]
    if missing:
        raise ChallengeFormatError(missing[0], f"missing (a challenge needs {', '.join(CHALLENGE_FIELDS)})")
    nonce, node, verifier, issued_at, sig = (doc[f] for f in CHALLENGE_FIELDS)
    if not isinstance(nonce, str) or not _NONCE.match(nonce):
        raise ChallengeFormatError("nonce", "must be 32 bytes of lowercase 0x-hex")
    if not isinstance(node, str) or not 0 < len(node) <= MAX_NODE_LEN:
        raise ChallengeFormatError("node", f"must be a node id of 1..{MAX_NODE_LEN} characters")
    if not isinstance(verifier, str) or not _ADDRESS.match(verifier) or to_checksum_address(verifier) != verifier:
        raise ChallengeFormatError("verifier", "must be an EIP-55 (checksummed) 0x address")
    if isinstance(issued_at, bool) or not isinstance(issued_at, int) or not 0 <= issued_at <= _MAX_TIME:
        raise ChallengeFormatError("issuedAt", "must be an integer count of unix seconds")
    if not isinstance(sig, str) or not _SIGNATURE.match(sig):
        raise ChallengeFormatError("signature", "must be 0x + 65 bytes hex (r || s || v)")
    capsule = parse_capsule(doc["capsule"]) if "capsule" in doc else None
    digest = challenge_digest(nonce=bytes.fromhex(nonce[2:]), node=node, verifier=verifier, issued_at=issued_at,
                              capsule=capsule)
    return Challenge(bytes.fromhex(nonce[2:]), node, verifier, issued_at, digest, capsule), bytes.fromhex(sig[2:])


def verify_challenge(doc: Any) -> Challenge:
    """The challenge if its signature recovers to its own `verifier`.

    ChallengeFormatError (`.field` named) if it is malformed; SignatureError if the signature is bad or
    was made by anyone else. Membership, node, time and replay are the caller's checks."""
    challenge, sig = _parse(doc)
    signer = recover_address(challenge.digest, sig)
    if signer != challenge.verifier:
        raise SignatureError(f"challenge is signed by {signer}, not by verifier {challenge.verifier}")
    return challenge
