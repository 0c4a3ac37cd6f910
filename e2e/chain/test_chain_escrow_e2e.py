"""TaskEscrow and Reputation on a real anvil: payment moves only on a quorum of included post-execution
verdicts of the bound attestation; a failed one refunds the payer and slashes the executor; there is no
other way to slash; a caught node's reputation stays gone for a very long time."""

from __future__ import annotations

import os

import pytest
from chainkit import ETH, OUTSIDER, VERIFIERS, Chain, make_verdict, new_epoch, record, reverts, task_deadline

from trustcap.chain.typed import verdict_tuple
from trustcap.evidence.verdict import Verdict, verdict_id

EXECUTOR = VERIFIERS[0]
PAYER = VERIFIERS[4]  # a funded account that is not registered


def _args(chain: Chain, vs: list[Verdict], *, recorded: bool = True) -> list[object]:
    """settle/record arguments for verdicts `vs` (one batch, ids ascending as the contract wants)."""
    vs = sorted(vs, key=lambda v: verdict_id(v, chain.domain))
    if recorded:
        tree = record(chain, vs, epoch=vs[0].epoch)
        root, proofs = tree.root, [tree.proof(i) for i in range(len(vs))]
    else:
        root, proofs = os.urandom(32), [[] for _ in vs]
    return [[verdict_tuple(v) for v in vs], [root] * len(vs), proofs]


def _verdicts(*, passed: bool, n: int = 3, phase: int = 3, node: str | None = None, attestation: bytes,
              epoch: int | None = None) -> list[Verdict]:
    e = epoch or new_epoch()
    return [make_verdict(epoch=e, passed=passed, phase=phase, node=node or EXECUTOR.address,
                         attestation=attestation) for _ in range(n)]


def _round(chain: Chain, *, passed: bool, n: int = 3, phase: int = 3, node: str | None = None,
           attestation: bytes | None = None, recorded: bool = True) -> tuple[bytes, list[object]]:
    """n verdicts of one attestation round, recorded in a batch; returns (attestationId, settle args)."""
    att = attestation or os.urandom(32)
    vs = _verdicts(passed=passed, n=n, phase=phase, node=node, attestation=att)
    return att, _args(chain, vs, recorded=recorded)


def _task(chain: Chain, att: bytes) -> bytes:
    task = os.urandom(32)
    payer = chain.client(PAYER)
    esc = payer.contract("TaskEscrow", chain.d.escrow)
    payer.transact(esc.functions.createTask(task, 2, task_deadline(chain)), value=ETH)
    chain.owner.transact(chain.owner.contract("TaskEscrow", chain.d.escrow).functions.assign(
        task, att, EXECUTOR.address, [v.address for v in VERIFIERS[1:4]]))
    return task


def test_passed_post_attestation_pays_executor_and_verifiers(chain: Chain) -> None:
    att, args = _round(chain, passed=True)
    task = _task(chain, att)
    esc = chain.owner.contract("TaskEscrow", chain.d.escrow)
    chain.owner.transact(esc.functions.settle(task, *args))
    assert esc.functions.owed(EXECUTOR.address).call() == ETH * 7000 // 10000
    assert esc.functions.owed(VERIFIERS[1].address).call() == (ETH - ETH * 7000 // 10000) // 3
    reverts(lambda: chain.owner.transact(esc.functions.settle(task, *args)), "WrongState")  # paid once
    ex = chain.client(EXECUTOR)
    before = ex.w3.eth.get_balance(EXECUTOR.address)
    ex.transact(ex.contract("TaskEscrow", chain.d.escrow).functions.withdraw())
    assert ex.w3.eth.get_balance(EXECUTOR.address) > before + ETH // 2
    reg = chain.owner.contract("NodeRegistry", chain.d.registry)
    assert reg.functions.nodeOf(EXECUTOR.address).call()[0] == 2 * ETH


def test_failed_post_attestation_refunds_and_slashes(chain: Chain) -> None:
    att, args = _round(chain, passed=False)
    task = _task(chain, att)
    esc = chain.owner.contract("TaskEscrow", chain.d.escrow)
    chain.owner.transact(esc.functions.settle(task, *args))
    assert esc.functions.owed(PAYER.address).call() == 2 * ETH  # payment back + 1 ETH slashed deposit
    reg = chain.owner.contract("NodeRegistry", chain.d.registry)
    assert reg.functions.nodeOf(EXECUTOR.address).call()[0] == ETH


def _bad_settlement(chain: Chain, case: str) -> tuple[bytes, list[object], str]:
    if case == "passed-verdicts-cannot-slash-twice":
        att, args = _round(chain, passed=True)
        task = _task(chain, att)
        chain.owner.transact(chain.owner.contract("TaskEscrow", chain.d.escrow).functions.settle(task, *args))
        _, failed = _round(chain, passed=False, attestation=att)
        return task, failed, "WrongState"
    if case == "failed-verdicts-not-recorded":
        att, args = _round(chain, passed=False, recorded=False)
        return _task(chain, att), args, "VerdictNotIncluded"
    if case == "failed-pre-not-post":
        att, args = _round(chain, passed=False, phase=1)
        return _task(chain, att), args, "WrongPhase"
    if case == "failed-verdicts-of-another-node":
        att, args = _round(chain, passed=False, node=VERIFIERS[1].address)
        return _task(chain, att), args, "WrongNode"
    if case == "failed-verdicts-of-another-attestation":
        _, args = _round(chain, passed=False)
        return _task(chain, os.urandom(32)), args, "WrongAttestation"
    if case == "one-dissenting-verdict":
        att, args = _round(chain, passed=False, n=1)
        return _task(chain, att), args, "InsufficientVerdicts"
    if case == "same-verdict-twice":
        att, args = _round(chain, passed=False, n=1)
        vs, roots, proofs = args
        return _task(chain, att), [vs * 2, roots * 2, proofs * 2], "VerdictsNotAscending"  # type: ignore[operator]
    if case == "mixed-outcomes":
        att = os.urandom(32)
        e = new_epoch()
        vs = _verdicts(passed=False, n=2, attestation=att, epoch=e) + _verdicts(passed=True, n=1, attestation=att,
                                                                               epoch=e)
        return _task(chain, att), _args(chain, vs), "InconsistentVerdicts"
    raise AssertionError(case)


@pytest.mark.parametrize("case", [
    pytest.param("passed-verdicts-cannot-slash-twice", id="settle-again-with-failed-after-paid"),
    pytest.param("failed-verdicts-not-recorded", id="failed-verdicts-not-on-chain"),
    pytest.param("failed-pre-not-post", id="failed-pre-execution-round"),
    pytest.param("failed-verdicts-of-another-node", id="another-node"),
    pytest.param("failed-verdicts-of-another-attestation", id="another-attestation"),
    pytest.param("one-dissenting-verdict", id="one-dissenting-verifier"),
    pytest.param("same-verdict-twice", id="same-verdict-twice"),
    pytest.param("mixed-outcomes", id="mixed-outcomes"),
])
def test_no_slash_without_a_proven_failed_post_attestation(chain: Chain, case: str) -> None:
    task, args, error = _bad_settlement(chain, case)
    reg = chain.owner.contract("NodeRegistry", chain.d.registry)
    deposit = reg.functions.nodeOf(EXECUTOR.address).call()[0]
    esc = chain.client(OUTSIDER).contract("TaskEscrow", chain.d.escrow)
    reverts(lambda: chain.client(OUTSIDER).transact(esc.functions.settle(task, *args)), error)
    assert reg.functions.nodeOf(EXECUTOR.address).call()[0] == deposit


def test_only_the_coordinator_binds_a_task(chain: Chain) -> None:
    payer = chain.client(PAYER)
    esc = payer.contract("TaskEscrow", chain.d.escrow)
    task = os.urandom(32)
    payer.transact(esc.functions.createTask(task, 2, task_deadline(chain)), value=ETH)
    reverts(lambda: payer.transact(esc.functions.assign(task, os.urandom(32), PAYER.address, [PAYER.address])),
            "NotCoordinator")
    reverts(lambda: payer.transact(esc.functions.createTask(task, 2, task_deadline(chain)), value=ETH), "TaskExists")


def test_reputation_rises_slowly_and_a_failure_lasts_years(chain: Chain) -> None:
    rep = chain.owner.contract("Reputation", chain.d.reputation)
    node = VERIFIERS[2].address
    for _ in range(3):
        _, args = _round(chain, passed=True, node=node)
        chain.owner.transact(rep.functions.record(*args))
    assert rep.functions.scoreOf(node).call() == 3
    reverts(lambda: chain.owner.transact(rep.functions.record(*args)), "AttestationAlreadyCounted")
    _, failed = _round(chain, passed=False, node=node)
    chain.owner.transact(rep.functions.record(*failed))
    assert rep.functions.scoreOf(node).call() == 0
    chain.anvil.rpc("evm_increaseTime", [365 * 86400])  # a year later, and clean rounds since
    for _ in range(5):
        _, args = _round(chain, passed=True, node=node)
        chain.owner.transact(rep.functions.record(*args))
    assert rep.functions.scoreOf(node).call() == 0, "a caught node must not regain reputation within a year"
    chain.anvil.rpc("evm_increaseTime", [700 * 86400])  # ~3 years after: penalty 1000 decayed at 1/day
    chain.anvil.rpc("evm_mine")
    assert rep.functions.scoreOf(node).call() == 5
