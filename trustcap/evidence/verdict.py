"""Verdicts: a verifier's signed judgement of one quote, as EIP-712 typed data a contract can check.

The AttestationLog contract recovers each verifier from its signature (ecrecover over the EIP-712
digest), so the encoding is the standard one, built by `eth_account.messages.encode_typed_data` rather
than by hand. The verdict's id is its hashStruct, unique per verdict; it is also what goes, as
`verdict_leaf(id)`, into the epoch's Merkle batch (`trustcap.merkle`).

The verdict names its verifier, and a verdict is valid only when that verifier signed it
(`verify_verdict`). Without the field, two verifiers' identical verdicts were one leaf, and nothing tied
a verdict to a committee seat: TaskEscrow.settle counts distinct `verifier`s of the task's committee,
each recovered from its own signature, so one party signing many verdicts (say with other issuedAt)
still counts once.

    Verdict(bytes32 attestationId,address node,address verifier,uint8 phase,bool passed,
            bytes32 quoteDigest,bytes32 policyDigest,uint64 epoch,uint64 issuedAt)
    domain: name "trustcap", version "1", chainId, verifyingContract = AttestationLog address
"""

from __future__ import annotations

from enum import IntEnum
from typing import Annotated, Any

from eth_account.messages import encode_typed_data
from eth_utils.crypto import keccak
from pydantic import BaseModel, ConfigDict, Field

from trustcap.evidence.errors import SignatureError, VerdictError
from trustcap.evidence.quote import Address, Hex32, Hex65, decode_wire
from trustcap.evidence.signing import Signer, recover_address

__all__ = [
    "Domain",
    "Phase",
    "SignedVerdict",
    "Verdict",
    "decode_signed_verdict",
    "encode_signed_verdict",
    "sign_verdict",
    "typed_data",
    "verdict_digest",
    "verdict_id",
    "verify_verdict",
]

MAX_VERDICT_BYTES = 16 * 1024
_U64 = 2**64 - 1

VERDICT_TYPES = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "Verdict": [
        {"name": "attestationId", "type": "bytes32"},
        {"name": "node", "type": "address"},
        {"name": "verifier", "type": "address"},
        {"name": "phase", "type": "uint8"},
        {"name": "passed", "type": "bool"},
        {"name": "quoteDigest", "type": "bytes32"},
        {"name": "policyDigest", "type": "bytes32"},
        {"name": "epoch", "type": "uint64"},
        {"name": "issuedAt", "type": "uint64"},
    ],
}


class Phase(IntEnum):
    BOOT = 0
    PRE = 1
    DURING = 2
    POST = 3
    WIPE = 4


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Domain(_Model):
    chain_id: Annotated[int, Field(ge=1, le=_U64)]
    verifying_contract: Address


class Verdict(_Model):
    attestation_id: Hex32
    node: Address
    verifier: Address
    phase: Annotated[int, Field(ge=0, le=4)]
    passed: bool
    quote_digest: Hex32
    policy_digest: Hex32
    epoch: Annotated[int, Field(ge=0, le=_U64)]
    issued_at: Annotated[int, Field(ge=0, le=_U64)]


class SignedVerdict(_Model):
    verdict: Verdict
    domain: Domain
    signature: Hex65


def typed_data(verdict: Verdict, domain: Domain) -> dict[str, Any]:
    """The full EIP-712 message (what eth_signTypedData_v4 would sign)."""
    return {
        "types": VERDICT_TYPES,
        "primaryType": "Verdict",
        "domain": {
            "name": "trustcap",
            "version": "1",
            "chainId": domain.chain_id,
            "verifyingContract": domain.verifying_contract,
        },
        "message": {
            "attestationId": bytes.fromhex(verdict.attestation_id[2:]),
            "node": verdict.node,
            "verifier": verdict.verifier,
            "phase": verdict.phase,
            "passed": verdict.passed,
            "quoteDigest": bytes.fromhex(verdict.quote_digest[2:]),
            "policyDigest": bytes.fromhex(verdict.policy_digest[2:]),
            "epoch": verdict.epoch,
            "issuedAt": verdict.issued_at,
        },
    }


def verdict_id(verdict: Verdict, domain: Domain) -> bytes:
    """hashStruct(verdict): the verdict's id, and the input of its Merkle leaf."""
    return bytes(encode_typed_data(full_message=typed_data(verdict, domain)).body)


def verdict_digest(verdict: Verdict, domain: Domain) -> bytes:
    """keccak256(0x19 0x01 || domainSeparator || hashStruct): what the verifier signs."""
    signable = encode_typed_data(full_message=typed_data(verdict, domain))
    return keccak(b"\x19" + bytes(signable.version) + bytes(signable.header) + bytes(signable.body))


def sign_verdict(verdict: Verdict, domain: Domain, signer: Signer) -> SignedVerdict:
    sig = signer.sign_digest(verdict_digest(verdict, domain))
    return SignedVerdict(verdict=verdict, domain=domain, signature="0x" + sig.hex())


def verify_verdict(signed: SignedVerdict, *, domain: Domain) -> str:
    """The EIP-55 address of the verifier that signed the verdict; VerdictError unless the verdict was
    made for `domain` (the deployment's: chain id and AttestationLog address) and signed by the verifier
    it names. What the chain checks at settlement, so a verdict that passes here settles there."""
    if signed.domain != domain:
        raise VerdictError(f"verdict was made for chain {signed.domain.chain_id} contract "
                           f"{signed.domain.verifying_contract}, not for the expected chain {domain.chain_id} "
                           f"contract {domain.verifying_contract}")
    try:
        signer = recover_address(verdict_digest(signed.verdict, domain), bytes.fromhex(signed.signature[2:]))
    except SignatureError as exc:
        raise VerdictError(f"verdict signature is not valid: {exc}") from exc
    if signer != signed.verdict.verifier:
        raise VerdictError(f"verdict names verifier {signed.verdict.verifier} but was signed by {signer}")
    return signer


def encode_signed_verdict(signed: SignedVerdict) -> bytes:
    from trustcap import canonical

    return canonical.encode(signed.model_dump())


def decode_signed_verdict(data: bytes) -> SignedVerdict:
    return decode_wire(SignedVerdict, data, what="signed verdict", limit=MAX_VERDICT_BYTES)
