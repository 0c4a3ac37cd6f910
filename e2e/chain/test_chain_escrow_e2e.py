"""TaskEscrow, NodeRegistry and Reputation on a real anvil: money moves only on ceil(2k/3) distinct committee
members' post-round verdicts, each signature recovered by the contract itself; a minority, one party's
many verdicts, or outsiders' signatures move nothing; assign binds only committed, registered, distinct
nodes; a slash never blocks a settlement; an assigned node cannot pull its deposit; reputation follows
settlements only. Each attack has its positive control in the same test."""

from __future__ import annotations

import os

import pytest
from chainkit import (
    COMMITTEE,
    ETH,
    EXECUTOR,
    OUTSIDER,
    PAYER,
    VERIFIERS,
    Chain,
    advance,
    assign,
    assigned,
    close_commits,
    deploy,
    deposit_of,
    escrow,
    funded,
    node_commit,
    post_verdict,
    reverts,
    seed_of,
    task_deadline,
)

from trustcap.chain.anvil import Anvil
from trustcap.evidence.verdict import SignedVerdict

SHARE = 7000  # executor share in basis points (deploy_all's default)


def _owed(chain: Chain, who: str) -> int:
    return int(chain.owner.contract("TaskEscrow", chain.d.escrow).functions.owed(who).call())


def _score(chain: Chain, node: str) -> int:
    return int(chain.owner.contract("Reputation", chain.d.reputation).functions.scoreOf(node).call())


def _votes(chain: Chain, att: bytes, passed: list[bool]) -> list[SignedVerdict]:
    return [post_verdict(chain, s, att, passed=p) for s, p in zip(COMMITTEE, passed, strict=False)]


# -- the honest paths ------------------------------------------------------------------------------------
def test_passed_quorum_pays_executor_and_committee_and_raises_reputation(chain: Chain) -> None:
    task, att = assigned(chain)
    before = _score(chain, EXECUTOR.address)
    escrow(chain, OUTSIDER).settle(task, _votes(chain, att, [True, True]))  # anyone may settle
    info = escrow(chain).task(task)
    assert info is not None and info.state == "Paid"
    assert _owed(chain, EXECUTOR.address) == ETH * SHARE // 10_000
    for v in COMMITTEE:  # the whole committee is paid, also the member whose verdict was not needed
        assert _owed(chain, v.address) == (ETH - ETH * SHARE // 10_000) // 3
    assert _score(chain, EXECUTOR.address) == before + 1
    reverts(lambda: escrow(chain).settle(task, _votes(chain, att, [True, True])), "WrongState")  # paid once
    ex = chain.client(EXECUTOR)
    balance = ex.w3.eth.get_balance(EXECUTOR.address)
    ex.transact(ex.contract("TaskEscrow", chain.d.escrow).functions.withdraw())
    assert ex.w3.eth.get_balance(EXECUTOR.address) > balance + ETH // 2
    assert deposit_of(chain, EXECUTOR.address) == 2 * ETH


def test_failed_quorum_refunds_slashes_and_wipes_reputation(chain: Chain) -> None:
    task, att = assigned(chain)
    escrow(chain).settle(task, _votes(chain, att, [True, True]))  # some earned reputation first
    assert _score(chain, EXECUTOR.address) >= 1
    task, att = assigned(chain)
    escrow(chain).settle(task, _votes(chain, att, [False, True, False]))  # a passing minority does not save it
    info = escrow(chain).task(task)
    assert info is not None and info.state == "Slashed"
    assert _owed(chain, PAYER.address) == 2 * ETH  # payment back + 1 ETH slashed deposit
    assert deposit_of(chain, EXECUTOR.address) == ETH
    assert _score(chain, EXECUTOR.address) == 0


# -- settlement attacks ----------------------------------------------------------------------------------
def test_a_losing_minority_can_neither_slash_nor_pay(chain: Chain) -> None:
    task, att = assigned(chain)
    deposit = deposit_of(chain, EXECUTOR.address)
    err = reverts(lambda: escrow(chain).settle(task, _votes(chain, att, [False])), "NoQuorum")
    assert err.error_args == (0, 1, 2)
    reverts(lambda: escrow(chain).settle(task, _votes(chain, att, [True])), "NoQuorum")
    # the minority's verdict beside one of the other side: 1 against 1, still no quorum either way
    reverts(lambda: escrow(chain).settle(task, _votes(chain, att, [False, True])), "NoQuorum")
    assert deposit_of(chain, EXECUTOR.address) == deposit
    assert escrow(chain).task(task).state == "Assigned"  # type: ignore[union-attr]
    escrow(chain).settle(task, _votes(chain, att, [True, True, False]))  # control: the majority settles
    assert escrow(chain).task(task).state == "Paid"  # type: ignore[union-attr]


def test_one_verifiers_five_verdicts_count_once(chain: Chain) -> None:
    task, att = assigned(chain)
    five = [post_verdict(chain, COMMITTEE[0], att, passed=False, issued_at=1_700_000_000 + i) for i in range(5)]
    assert len({s.signature for s in five}) == 5  # five distinct, validly signed verdicts
    deposit = deposit_of(chain, EXECUTOR.address)
    err = reverts(lambda: escrow(chain).settle(task, five), "DuplicateVerifier")
    assert err.error_args == (1, COMMITTEE[0].address)
    reverts(lambda: escrow(chain).settle(task, five[:1]), "NoQuorum")  # one verifier alone is no quorum
    assert deposit_of(chain, EXECUTOR.address) == deposit
    escrow(chain).settle(task, [five[0], post_verdict(chain, COMMITTEE[1], att, passed=False)])  # control
    assert escrow(chain).task(task).state == "Slashed"  # type: ignore[union-attr]


@pytest.mark.parametrize("case", [
    pytest.param("registered-node-outside-committee", id="registered-non-member"),
    pytest.param("unregistered-account", id="unregistered-signer"),
    pytest.param("the-executor-itself", id="executor-signs"),
])
def test_a_non_committee_signer_counts_nothing(chain: Chain, case: str) -> None:
    outsider = {"registered-node-outside-committee": VERIFIERS[4], "unregistered-account": OUTSIDER,
                "the-executor-itself": EXECUTOR}[case]
    if case == "registered-node-outside-committee":
        chain.client(VERIFIERS[4]).register_node(chain.d, b"\x02" * 33, b"\x01" * 32, 2 * ETH)
    task, att = assigned(chain)
    forged = post_verdict(chain, outsider, att, passed=False)
    err = reverts(lambda: escrow(chain).settle(task, [forged, *_votes(chain, att, [False])]), "NotInCommittee")
    assert err.error_args == (0, outsider.address)
    # an outsider's signature over a verdict that names a committee member is not that member's
    named = post_verdict(chain, outsider, att, passed=False, verifier=COMMITTEE[1].address)
    err = reverts(lambda: escrow(chain).settle(task, [*_votes(chain, att, [False]), named]), "BadSignature")
    assert err.error_args == (1, COMMITTEE[1].address)
    escrow(chain).settle(task, _votes(chain, att, [False, False]))  # control: two members slash
    assert escrow(chain).task(task).state == "Slashed"  # type: ignore[union-attr]


def _tamper(chain: Chain, att: bytes, case: str) -> tuple[SignedVerdict, str]:
    good = post_verdict(chain, COMMITTEE[0], att, passed=False)
    v = good.verdict
    if case == "zero-signature":
        return good.model_copy(update={"signature": "0x" + "00" * 65}), "BadSignature"
    if case == "flipped-outcome":
        return good.model_copy(update={"verdict": v.model_copy(update={"passed": True})}), "BadSignature"
    if case == "other-round":
        return post_verdict(chain, COMMITTEE[0], os.urandom(32), passed=False), "WrongAttestation"
    if case == "other-node":
        return post_verdict(chain, COMMITTEE[0], att, passed=False, node=COMMITTEE[2].address), "WrongNode"
    if case == "pre-round":
        return post_verdict(chain, COMMITTEE[0], att, passed=False, phase=1), "WrongPhase"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["zero-signature", "flipped-outcome", "other-round", "other-node", "pre-round"])
def test_a_verdict_that_is_not_the_rounds_or_not_signed_is_refused(chain: Chain, case: str) -> None:
    task, att = assigned(chain)
    bad, error = _tamper(chain, att, case)
    reverts(lambda: escrow(chain).settle(task, [bad, post_verdict(chain, COMMITTEE[1], att, passed=False)]), error)
    assert deposit_of(chain, EXECUTOR.address) == 2 * ETH
    escrow(chain).settle(task, _votes(chain, att, [False, False]))
    assert escrow(chain).task(task).state == "Slashed"  # type: ignore[union-attr]


# -- assign ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("case", "error"), [
    pytest.param("uncommitted-verifier", "NotCommitted", id="uncommitted-verifier"),
    pytest.param("unregistered-verifier", "NotCommitted", id="unregistered-verifier"),  # it cannot commit
    pytest.param("duplicate-verifier", "DuplicateNode", id="duplicate-verifier"),
    pytest.param("executor-in-committee", "ExecutorInCommittee", id="executor-in-committee"),
    pytest.param("uncommitted-executor", "NotCommitted", id="uncommitted-executor"),
    pytest.param("committee-too-small", "WrongCommitteeSize", id="committee-too-small"),
])
def test_assign_binds_only_distinct_registered_committed_nodes(chain: Chain, case: str, error: str) -> None:
    executor, committee = EXECUTOR.address, [v.address for v in COMMITTEE]
    committers = list(VERIFIERS[:4])
    if case == "uncommitted-verifier":
        committers.remove(COMMITTEE[2])
    elif case == "unregistered-verifier":
        committee[2] = OUTSIDER.address
    elif case == "duplicate-verifier":
        committee[2] = committee[0]
    elif case == "executor-in-committee":
        committee[2] = executor
    elif case == "uncommitted-executor":
        committers.remove(EXECUTOR)
    elif case == "committee-too-small":
        committee = committee[:2]
    task = funded(chain, committers=committers)
    close_commits(chain, task)
    reverts(lambda: assign(chain, task, os.urandom(32), executor, committee), error)
    assert escrow(chain).task(task).state == "Funded"  # type: ignore[union-attr]
    if case != "uncommitted-executor" and case != "uncommitted-verifier":  # control on the same task
        assign(chain, task, os.urandom(32))
        assert escrow(chain).task(task).state == "Assigned"  # type: ignore[union-attr]


def test_only_the_coordinator_assigns_or_cancels_and_one_attestation_settles_one_task(chain: Chain) -> None:
    task = funded(chain)
    att = os.urandom(32)
    close_commits(chain, task)
    reverts(lambda: assign(chain, task, att, signer=PAYER), "NotCoordinator")
    reverts(lambda: escrow(chain, PAYER).cancel(task), "NotCoordinator")
    reverts(lambda: escrow(chain, PAYER).fund(task, 3, task_deadline(chain), ETH), "TaskExists")
    assign(chain, task, att)
    other = funded(chain)
    close_commits(chain, other)
    reverts(lambda: assign(chain, other, att), "AttestationAlreadyAssigned")
    reverts(lambda: escrow(chain).cancel(task), "WrongState")  # assigned: only settle or the deadline close it
    escrow(chain).cancel(other)
    info = escrow(chain).task(other)
    assert info is not None and info.state == "Cancelled" and _owed(chain, PAYER.address) == ETH


@pytest.mark.parametrize(("k", "error"), [(2, "InvalidCommitteeSize"), (4, "InvalidCommitteeSize"),
                                         (1, "InvalidCommitteeSize"), (33, "InvalidCommitteeSize")])
def test_fund_takes_an_odd_committee_of_3_to_31(chain: Chain, k: int, error: str) -> None:
    reverts(lambda: escrow(chain, PAYER).fund(os.urandom(32), k, task_deadline(chain), ETH), error)
    task = os.urandom(32)
    receipt = escrow(chain, PAYER).fund(task, 31, task_deadline(chain), ETH)
    info = escrow(chain).task(task)
    assert info is not None and info.k == 31 and info.funded_block == receipt["blockNumber"]
    assert info.payer == PAYER.address.lower() and info.payment == ETH and info.state == "Funded"


def test_commit_once_by_an_active_node_while_funded(chain: Chain) -> None:
    task = funded(chain, committers=[])
    seed_of(chain, task)  # commits wait for the seed block
    c = os.urandom(32)
    reverts(lambda: escrow(chain, OUTSIDER).commit(task, c), "NotActiveNode")
    reverts(lambda: escrow(chain, EXECUTOR).commit(task, b"\0" * 32), "InvalidCommitment")
    escrow(chain, EXECUTOR).commit(task, c)
    reverts(lambda: escrow(chain, EXECUTOR).commit(task, os.urandom(32)), "AlreadyCommitted")
    view = escrow(chain)
    assert view.commitment(task, EXECUTOR.address) == c
    assert view.commitment(task, COMMITTEE[0].address) is None
    assert view.committers(task) == [EXECUTOR.address.lower()]
    reverts(lambda: escrow(chain, OUTSIDER).commit(os.urandom(32), c), "WrongState")  # no such task


# -- deposits ------------------------------------------------------------------------------------------
def test_a_slash_of_a_node_with_too_little_left_still_settles(anvil: Anvil) -> None:
    chain = deploy(anvil, slash_amount=3 * ETH)  # more than any node's 2 ETH deposit
    first, att1 = assigned(chain)
    second, att2 = assigned(chain)  # the same executor on two tasks at once
    escrow(chain).settle(first, _votes(chain, att1, [False, False]))
    assert deposit_of(chain, EXECUTOR.address) == 0
    assert _owed(chain, PAYER.address) == ETH + 2 * ETH  # payment + all that was left
    escrow(chain).settle(second, _votes(chain, att2, [False, False]))  # nothing left: settles all the same
    info = escrow(chain).task(second)
    assert info is not None and info.state == "Slashed"
    assert _owed(chain, PAYER.address) == 2 * ETH + 2 * ETH
    node = escrow(chain).node(EXECUTOR.address)
    assert node is not None and node.stake == 0 and not node.active


def test_a_node_with_an_assigned_task_cannot_withdraw(chain: Chain) -> None:
    task, att = assigned(chain)
    for who in (EXECUTOR, COMMITTEE[1]):
        me = chain.client(who)
        reg = me.contract("NodeRegistry", chain.d.registry)
        reverts(lambda: me.transact(reg.functions.requestLeave()), "DepositIsLocked")  # noqa: B023
    escrow(chain).settle(task, _votes(chain, att, [True, True]))
    me = chain.client(EXECUTOR)  # control: settled, the same node leaves and withdraws after the delay
    reg = me.contract("NodeRegistry", chain.d.registry)
    me.transact(reg.functions.requestLeave())
    advance(chain, 3601)
    me.transact(reg.functions.withdraw())
    assert escrow(chain).node(EXECUTOR.address) is None


def test_a_node_that_asked_to_leave_cannot_commit_and_a_committed_node_cannot_leave(chain: Chain) -> None:
    """A node that requested leave is no longer active, so it cannot commit (nor be assigned); one that
    committed cannot start leaving. Either way the deposit a settlement may slash stays in the registry."""
    task = funded(chain, committers=VERIFIERS[:3])
    late = chain.client(COMMITTEE[2])
    late.transact(late.contract("NodeRegistry", chain.d.registry).functions.requestLeave())
    reverts(lambda: node_commit(chain, task, COMMITTEE[2]), "NotActiveNode")
    me = chain.client(EXECUTOR)
    reverts(lambda: me.transact(me.contract("NodeRegistry", chain.d.registry).functions.requestLeave()),
            "DepositIsLocked")


def test_only_the_escrow_locks_slashes_and_records_reputation(chain: Chain) -> None:
    outsider = chain.client(OUTSIDER)
    reg = outsider.contract("NodeRegistry", chain.d.registry)
    rep = outsider.contract("Reputation", chain.d.reputation)
    reverts(lambda: outsider.transact(reg.functions.lock(EXECUTOR.address)), "NotSlasher")
    reverts(lambda: outsider.transact(reg.functions.unlock(EXECUTOR.address)), "NotSlasher")
    reverts(lambda: outsider.transact(reg.functions.slash(EXECUTOR.address, ETH, OUTSIDER.address)), "NotSlasher")
    reverts(lambda: outsider.transact(rep.functions.record(EXECUTOR.address, os.urandom(32), False)), "NotRecorder")
    reverts(lambda: chain.owner.transact(chain.owner.contract("Reputation", chain.d.reputation).functions.setRecorder(
        OUTSIDER.address)), "RecorderAlreadySet")


def test_reputation_rises_slowly_and_a_failure_lasts_years(chain: Chain) -> None:
    node = EXECUTOR.address
    for _ in range(3):
        task, att = assigned(chain)
        escrow(chain).settle(task, _votes(chain, att, [True, True]))
    assert _score(chain, node) == 3
    task, att = assigned(chain)
    escrow(chain).settle(task, _votes(chain, att, [False, False]))
    assert _score(chain, node) == 0
    advance(chain, 365 * 86400)  # a year later, and clean rounds since
    for _ in range(5):
        task, att = assigned(chain, seconds=3600)
        escrow(chain).settle(task, _votes(chain, att, [True, True]))
    assert _score(chain, node) == 0, "a caught node must not regain reputation within a year"
    advance(chain, 700 * 86400)  # ~3 years after: penalty 1000 decayed at 1/day
    assert _score(chain, node) == 5
    info = escrow(chain).node(node)
    assert info is not None and info.reputation_bp == 5 * 10_000 // 1000
