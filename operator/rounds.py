"""Attestation rounds of a capsule: how the operator opens one and decides its quorum.

The operator never attests: each committee gateway challenges the executor with its own nonce and writes
its own signed verdict into `status.verdicts` (decision 0090). The operator only counts. It counts a
verdict when its EIP-712 signature verifies under the chain's domain, its signer is the `verifier` it
names, that verifier is a member of the round's committee (once), and the verdict is about this round
(attestationId = the round nonce), this executor and this phase, reached under this round's policy
(policyDigest). A round passes with `quorum` such verdicts that passed; it fails as soon as a pass can no
longer be reached; it expires at its timeout.

A round is opened under the policy of the node it attests (`round_policy_digest`, decision 0116): the
HPCNode's declared `spec.policy.digest`, or the operator's TRUSTCAP_POLICY_DIGEST for a node that declares
none. Each committee member refuses to sign a round under a policy other than the one it appraises with.

    gateway G_i --SSA status.verdicts[verifier=G_i]--> Attestation <--count-- operator --result--> status.result
                                                                                 └─> chain-writer records it
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from pydantic import ValidationError

from trustcap.chain.escrow import quorum_of as quorum_of  # re-exported: the one definition, as TaskEscrow counts
from trustcap.evidence.errors import EvidenceError
from trustcap.evidence.verdict import Domain, Phase, SignedVerdict, verify_verdict
from trustcap.forms import hex_digest
from trustcap.operator.errors import OperatorError

PASSED: Final = "Passed"
FAILED: Final = "Failed"
EXPIRED: Final = "Expired"


def round_name(task_id: bytes, phase: str, index: int = 0) -> str:
    base = f"r-{task_id.hex()[:16]}-{phase}"
    return f"{base}-{index}" if index else base


def round_policy_digest(node: Mapping[str, Any] | None, default: str) -> str:
    """The policyDigest (0x-hex) a round about `node` (its HPCNode object, None when there is none) is
    opened under: the node's declared `spec.policy.digest`, else `default` (the operator's
    TRUSTCAP_POLICY_DIGEST). A declared digest that is not a sha256 is an OperatorError naming the node:
    opening the round under another policy would attest the node under rules it never declared. So is
    no digest at all: a round under a made-up one (all zeros) is one no committee member signs."""
    declared = (((node or {}).get("spec") or {}).get("policy") or {}).get("digest")
    name = ((node or {}).get("metadata") or {}).get("name", "?")
    if declared is not None:
        digest = hex_digest(declared)
        if digest is None:
            raise OperatorError(f"HPCNode {name}: spec.policy.digest {str(declared)[:80]!r} is not a sha256 digest "
                                "(sha256:<64 hex>): fix the node's declared policy")
        return digest
    if not default:
        raise OperatorError(f"HPCNode {name} declares no spec.policy.digest and TRUSTCAP_POLICY_DIGEST is not set, so "
                            "no round can say which rules its committee applies: declare the node's policy digest, "
                            "or set TRUSTCAP_POLICY_DIGEST to the digest of the attestation policy the gateways apply")
    digest = hex_digest(default)
    if digest is None:
        raise OperatorError(f"TRUSTCAP_POLICY_DIGEST {str(default)[:80]!r} is not a sha256 digest (0x<64 hex>): set "
                            f"it to the digest of the policy the committees apply, or declare spec.policy.digest "
                            f"on HPCNode {name}")
    return digest


def new_round(*, name: str, capsule: Mapping[str, Any], task_id: bytes, executor: str, node: str, phase: str,
              epoch: int, committee: Sequence[Mapping[str, str]], quorum: int, policy_digest: str,
              timeout_s: int) -> dict[str, Any]:
    """An Attestation body for one round; its nonce (the verdicts' attestationId) is fresh and random."""
    meta = capsule["metadata"]
    return {
        "apiVersion": "trustcap.io/v1alpha1", "kind": "Attestation",
        "metadata": {"name": name, "labels": {"trustcap.io/task": task_id.hex()[:16], "trustcap.io/round": phase}},
        "spec": {
            "capsuleRef": {"namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]},
            "taskId": "0x" + task_id.hex(), "node": node, "executor": executor, "phase": phase,
            "nonce": "0x" + secrets.token_bytes(32).hex(), "epoch": epoch, "policyDigest": policy_digest,
            "committee": {"members": [dict(m) for m in committee], "quorum": quorum},
            "timeoutSeconds": timeout_s,
        },
    }


@dataclass
class Tally:
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # "verifier: why" for each verdict not counted
    signed: list[SignedVerdict] = field(default_factory=list)  # the counted verdicts

    def result(self, members: int, quorum: int, *, expired: bool) -> str | None:
        if len(self.passed) >= quorum:
            return PASSED
        if members - len(self.failed) < quorum:
            return FAILED  # a pass can no longer be reached
        return EXPIRED if expired else None


def tally(att: Mapping[str, Any], domain: Domain) -> Tally:
    spec = att["spec"]
    members = {str(m["address"]).lower() for m in spec["committee"]["members"]}
    phase = int(Phase[str(spec["phase"]).upper()])
    nonce = str(spec["nonce"]).lower()
    executor = str(spec["executor"]).lower()
    policy = str(spec.get("policyDigest", "")).lower()
    out = Tally()
    seen: set[str] = set()
    for item in (att.get("status") or {}).get("verdicts") or []:
        who = str(item.get("verifier", "?")).lower()
        why = _refusal(item, who, members, seen, domain, nonce, executor, phase, policy)
        if why:
            out.refused.append(f"{who}: {why}")
            continue
        seen.add(who)
        signed = SignedVerdict.model_validate(item["verdict"])
        out.signed.append(signed)
        (out.passed if signed.verdict.passed else out.failed).append(who)
    return out


def _refusal(item: Mapping[str, Any], who: str, members: set[str], seen: set[str], domain: Domain, nonce: str,
             executor: str, phase: int, policy: str) -> str:
    if who not in members:
        return "not a member of this round's committee"
    if who in seen:
        return "a second verdict from the same verifier"
    try:
        signed = SignedVerdict.model_validate(item.get("verdict"))
        signer = verify_verdict(signed, domain=domain)
    except (ValidationError, EvidenceError, TypeError, ValueError) as exc:
        return f"verdict does not verify: {exc}"
    v = signed.verdict
    checks = (
        (signer.lower() == who, f"signed by {signer}, not by the verifier it names"),
        (v.attestation_id.lower() == nonce, "about another round (attestationId)"),
        (v.node.lower() == executor, "about another node"),
        (v.phase == phase, "about another phase"),
        # A verdict reached under other rules says nothing about this round's: it is not counted either way.
        (v.policy_digest.lower() == policy, f"reached under another policy ({v.policy_digest}, not the round's)"),
        (bool(item.get("passed")) == v.passed, "its passed field disagrees with the signed verdict"),
    )
    for ok, why in checks:
        if not ok:
            return why
    return ""


def expired(att: Mapping[str, Any], created_at: float, now: float | None = None) -> bool:
    return (now or time.time()) > created_at + float(att["spec"].get("timeoutSeconds", 30))
