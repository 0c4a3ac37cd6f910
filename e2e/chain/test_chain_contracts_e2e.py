"""The contracts on a real anvil: a quorum-signed batch is recorded once and proves its verdicts; every
forged, replayed or under-signed batch, every forged proof and every slash without a proven failed
post-execution attestation is refused, and each refusal names its custom error."""

from __future__ import annotations

import os

import pytest
from chainkit import ETH, OUTSIDER, OWNER, VERIFIERS, Chain, make_verdict, new_epoch, record, reverts

from trustcap.chain.typed import batch_digest, sign_batch, verdict_tuple
from trustcap.evidence.verdict import Verdict, verdict_id

_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def _high_s(sig: bytes) -> bytes:
    s = int.from_bytes(sig[32:64], "big")
    return sig[:32] + (_N - s).to_bytes(32, "big") + bytes([55 - sig[64]])  # 27 <-> 28


# -- AttestationLog ---------------------------------------------------------------------------------------
def test_quorum_signed_batch_is_recorded_once_and_proves_each_verdict(chain: Chain) -> None:
    epoch = new_epoch()
    verdicts = [make_verdict(epoch=epoch) for _ in range(7)]
    tree = record(chain, verdicts, epoch=epoch)
    log = chain.owner.contract("AttestationLog", chain.d.log)
    rec = log.functions.batchOfRoot(tree.root, epoch).call()
    assert rec[0] == epoch and rec[1] == 7
    for i, v in enumerate(verdicts):
        assert chain.owner.is_included(chain.d, v, tree.root, tree.proof(i)), f"verdict {i} not provable"
        assert log.functions.verdictId(verdict_tuple(v)).call() == verdict_id(v, chain.domain)
    # the contract's digest is the one our signers sign (same EIP-712 domain: this chain, this contract)
    assert log.functions.batchDigest(epoch, tree.root, 7).call() == batch_digest(
        epoch, tree.root, 7, chain.d.chain_id, chain.d.log)


def _batch_args(chain: Chain, case: str) -> tuple[int, bytes, int, list[bytes]]:
    epoch = new_epoch()
    tree_root = os.urandom(32)
    count = 3
    d = chain.d
    good = sign_batch(VERIFIERS[:3], epoch, tree_root, count, d.chain_id, d.log)
    if case == "unregistered-verifier":
        sigs = sign_batch([*VERIFIERS[:2], OUTSIDER], epoch, tree_root, count, d.chain_id, d.log)
    elif case == "too-few-signatures":
        sigs = good[:2]
    elif case == "same-signature-twice":
        sigs = [good[0], good[0], good[1]]
    elif case == "signers-out-of-order":
        sigs = [good[1], good[0], good[2]]
    elif case == "high-s-signature":
        sigs = [good[0], _high_s(good[1]), good[2]]
    elif case == "other-chain-id":
        sigs = sign_batch(VERIFIERS[:3], epoch, tree_root, count, d.chain_id + 1, d.log)
    elif case == "other-contract-address":
        sigs = sign_batch(VERIFIERS[:3], epoch, tree_root, count, d.chain_id, d.registry)
    elif case == "signed-other-count":
        sigs = sign_batch(VERIFIERS[:3], epoch, tree_root, count + 1, d.chain_id, d.log)
    elif case == "empty-batch":
        count, sigs = 0, sign_batch(VERIFIERS[:3], epoch, tree_root, 0, d.chain_id, d.log)
    elif case == "garbage-signature":
        sigs = [good[0], good[1], os.urandom(64)]
    else:  # pragma: no cover - table and cases in one place
        raise AssertionError(case)
    return epoch, tree_root, count, sigs


@pytest.mark.parametrize(
    ("case", "error"),
    [
        pytest.param("unregistered-verifier", "UnknownVerifier", id="unregistered-verifier"),
        pytest.param("too-few-signatures", "InsufficientSignatures", id="too-few-signatures"),
        pytest.param("same-signature-twice", "DuplicateSigner", id="same-signature-twice"),
        pytest.param("signers-out-of-order", "SignersNotAscending", id="signers-out-of-order"),
        pytest.param("high-s-signature", "ECDSAInvalidSignatureS", id="high-s-signature"),
        pytest.param("other-chain-id", "UnknownVerifier", id="signed-for-other-chain-id"),
        pytest.param("other-contract-address", "UnknownVerifier", id="signed-for-other-contract"),
        pytest.param("signed-other-count", "UnknownVerifier", id="signature-over-other-batch"),
        pytest.param("empty-batch", "EmptyBatch", id="empty-batch"),
        pytest.param("garbage-signature", "ECDSAInvalidSignatureLength", id="garbage-signature"),
    ],
)
def test_forged_or_undersigned_batch_is_refused(chain: Chain, case: str, error: str) -> None:
    epoch, root, count, sigs = _batch_args(chain, case)
    log = chain.owner.contract("AttestationLog", chain.d.log)
    reverts(lambda: chain.owner.transact(log.functions.recordBatch(epoch, root, count, sigs)), error)
    assert log.functions.rootOfBatch(log.functions.batchId(epoch, root, count).call()).call() == b"\0" * 32


def test_replayed_batch_and_reused_root_are_refused(chain: Chain) -> None:
    epoch = new_epoch()
    verdicts = [make_verdict(epoch=epoch) for _ in range(3)]
    tree = record(chain, verdicts, epoch=epoch)
    log = chain.owner.contract("AttestationLog", chain.d.log)
    sigs = sign_batch(VERIFIERS[:3], epoch, tree.root, 3, chain.d.chain_id, chain.d.log)
    reverts(lambda: chain.owner.transact(log.functions.recordBatch(epoch, tree.root, 3, sigs)),
            "BatchAlreadyRecorded")
    # the same root and epoch under another count: a different batch id, still refused
    sigs2 = sign_batch(VERIFIERS[:3], epoch, tree.root, 4, chain.d.chain_id, chain.d.log)
    reverts(lambda: chain.owner.transact(log.functions.recordBatch(epoch, tree.root, 4, sigs2)),
            "RootAlreadyRecorded")


def test_a_verifier_that_is_leaving_no_longer_counts(chain: Chain) -> None:
    leaver = chain.client(VERIFIERS[2])
    leaver.transact(leaver.contract("NodeRegistry", chain.d.registry).functions.requestLeave())
    epoch = new_epoch()
    refused = reverts(lambda: record(chain, [make_verdict(epoch=epoch)], epoch=epoch), "UnknownVerifier")
    assert refused.error_args == (VERIFIERS[2].address,)


def _forge(case: str, verdicts: list[Verdict], tree: object, root: bytes) -> tuple[Verdict, bytes, list[bytes]]:
    proof = tree.proof(0)  # type: ignore[attr-defined]
    v = verdicts[0]
    if case == "verdict-not-in-batch":
        return make_verdict(epoch=v.epoch), root, proof
    if case == "flipped-proof-byte":
        bad = bytearray(proof[0])
        bad[0] ^= 1
        return v, root, [bytes(bad), *proof[1:]]
    if case == "proof-of-another-leaf":
        return v, root, tree.proof(1)  # type: ignore[attr-defined]
    if case == "verdict-field-changed":
        return v.model_copy(update={"passed": not v.passed}), root, proof
    if case == "root-not-recorded":
        return v, os.urandom(32), proof
    if case == "epoch-does-not-match-batch":
        return v.model_copy(update={"epoch": v.epoch + 1}), root, proof
    if case == "inner-node-as-leaf":
        return v, root, proof[1:]
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param("verdict-not-in-batch", id="verdict-not-in-batch"),
        pytest.param("flipped-proof-byte", id="flipped-proof-byte"),
        pytest.param("proof-of-another-leaf", id="proof-of-another-leaf"),
        pytest.param("verdict-field-changed", id="verdict-field-changed"),
        pytest.param("root-not-recorded", id="root-not-recorded"),
        pytest.param("epoch-does-not-match-batch", id="epoch-mismatch"),
        pytest.param("inner-node-as-leaf", id="truncated-proof"),
    ],
)
def test_forged_inclusion_proof_is_refused(chain: Chain, case: str) -> None:
    epoch = new_epoch()
    verdicts = [make_verdict(epoch=epoch) for _ in range(4)]
    tree = record(chain, verdicts, epoch=epoch)
    assert chain.owner.is_included(chain.d, verdicts[0], tree.root, tree.proof(0))  # the honest one passes
    v, root, proof = _forge(case, verdicts, tree, tree.root)
    assert not chain.owner.is_included(chain.d, v, root, proof)


# -- NodeRegistry -----------------------------------------------------------------------------------------
def test_registry_leave_waits_for_the_delay_and_owner_governs_boot_images(chain: Chain) -> None:
    me = chain.client(VERIFIERS[3])
    reg = me.contract("NodeRegistry", chain.d.registry)
    reverts(lambda: me.transact(reg.functions.withdraw()), "LeaveNotRequested")
    me.transact(reg.functions.requestLeave())
    reverts(lambda: me.transact(reg.functions.withdraw()), "LeaveDelayNotOver")
    chain.anvil.rpc("evm_increaseTime", [3601])
    chain.anvil.rpc("evm_mine")
    before = me.w3.eth.get_balance(me.signer.address)
    me.transact(reg.functions.withdraw())
    assert me.w3.eth.get_balance(me.signer.address) > before + ETH  # the 2 ETH deposit came back (minus gas)
    reverts(lambda: me.transact(reg.functions.register(b"\x02" * 33, b"\x00" * 32)), "DepositTooLow")
    digest = os.urandom(32)
    reverts(lambda: me.transact(reg.functions.approveBootImage(digest)), "OwnableUnauthorizedAccount")
    chain.owner.transact(chain.owner.contract("NodeRegistry", chain.d.registry).functions.approveBootImage(digest))
    assert reg.functions.approvedBootImage(digest).call()
    reverts(lambda: chain.client(OUTSIDER).transact(reg.functions.register(b"\x02" * 10, b"\x00" * 32)),
            "DepositTooLow")


def test_slash_only_through_the_escrow(chain: Chain) -> None:
    outsider = chain.client(OUTSIDER)
    reg = outsider.contract("NodeRegistry", chain.d.registry)
    reverts(lambda: outsider.transact(reg.functions.slash(VERIFIERS[0].address, ETH, OUTSIDER.address)),
            "NotSlasher")
    reverts(lambda: chain.owner.transact(
        chain.owner.contract("NodeRegistry", chain.d.registry).functions.setSlasher(OWNER.address)),
        "SlasherAlreadySet")
