"""EIP-712 typed data of the chain: the Batch a verifier quorum signs, and Verdicts as the contract sees them.

    Batch(uint64 epoch,bytes32 root,uint32 count)
    domain: name "trustcap", version "1", chainId, verifyingContract = the AttestationLog address

The batch id is hashStruct(Batch): deterministic from (epoch, root, count), so a batch resent after a
crash has the same id and the contract recognises it as already recorded. Verdict ids and leaves come
from trustcap.evidence.verdict and trustcap.merkle (the shared interface), never re-derived here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from eth_abi import encode  # type: ignore[attr-defined]
from eth_utils.crypto import keccak

from trustcap.evidence.signing import Signer, recover_address
from trustcap.evidence.verdict import Verdict

__all__ = [
    "BATCH_TYPEHASH",
    "batch_digest",
    "batch_id",
    "domain_separator",
    "sign_batch",
    "verdict_tuple",
]

BATCH_TYPEHASH = keccak(text="Batch(uint64 epoch,bytes32 root,uint32 count)")
_DOMAIN_TYPEHASH = keccak(
    text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)


def domain_separator(chain_id: int, contract: str) -> bytes:
    return keccak(
        encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [_DOMAIN_TYPEHASH, keccak(text="trustcap"), keccak(text="1"), chain_id, contract],
        )
    )


def batch_id(epoch: int, root: bytes, count: int) -> bytes:
    return keccak(encode(["bytes32", "uint64", "bytes32", "uint32"], [BATCH_TYPEHASH, epoch, root, count]))


def batch_digest(epoch: int, root: bytes, count: int, chain_id: int, contract: str) -> bytes:
    return keccak(b"\x19\x01" + domain_separator(chain_id, contract) + batch_id(epoch, root, count))


def sign_batch(
    signers: Iterable[Signer], epoch: int, root: bytes, count: int, chain_id: int, contract: str
) -> list[bytes]:
    """Signatures of every signer, ordered by signer address ascending as the contract requires."""
    digest = batch_digest(epoch, root, count, chain_id, contract)
    sigs = [s.sign_digest(digest) for s in signers]
    return sorted(sigs, key=lambda sig: int(recover_address(digest, sig), 16))


def verdict_tuple(v: Verdict) -> tuple[bytes, str, str, int, bool, bytes, bytes, int, int]:
    """The AttestationLog.Verdict struct as web3 wants it (field order of the EIP-712 type)."""
    return (
        bytes.fromhex(v.attestation_id[2:]),
        v.node,
        v.verifier,
        v.phase,
        v.passed,
        bytes.fromhex(v.quote_digest[2:]),
        bytes.fromhex(v.policy_digest[2:]),
        v.epoch,
        v.issued_at,
    )


def proofs_arg(proofs: Sequence[Sequence[bytes]]) -> list[list[bytes]]:
    return [list(p) for p in proofs]
