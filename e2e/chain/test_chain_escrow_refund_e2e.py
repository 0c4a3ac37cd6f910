"""TaskEscrow's timeout refund on a real anvil: a payment that was never assigned, or assigned but never
settled, goes back to its payer after the task's deadline, and only then; a refund never slashes, closes
the task for good, and cannot be taken twice; a late but proven quorum still settles until a refund
happens. Time moves with anvil's evm_increaseTime + evm_mine (chainkit.advance), never by sleeping.
Decision 0030, "Escrow deadline"."""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import pytest
from chainkit import (
    ETH,
    EXECUTOR,
    OUTSIDER,
    PAYER,
    VERIFIERS,
    Chain,
    advance,
    assign,
    block_time,
    close_commits,
    escrow,
    node_commit,
    post_verdict,
    reverts,
    task_deadline,
)
from web3 import Web3
from web3.contract import Contract
from web3.logs import DISCARD

from trustcap.chain.keys import KeySigner
from trustcap.evidence.verdict import SignedVerdict

COMMITTEE = [v.address for v in VERIFIERS[1:4]]
WINDOW = 600  # seconds from fund to the deadline in these tests
DAY = 86_400

# TaskEscrow.State, as the contract numbers it
FUNDED, ASSIGNED, PAID, SLASHED, REFUNDED = 1, 2, 3, 4, 5


def _esc(chain: Chain, signer: KeySigner | None = None) -> Contract:
    client = chain.owner if signer is None else chain.client(signer)
    return client.contract("TaskEscrow", chain.d.escrow)


def _fund(chain: Chain, *, window: int = WINDOW) -> tuple[bytes, int]:
    """A new task escrowing 1 ETH from PAYER with its deadline `window` seconds ahead: (taskId, deadline)."""
    task, deadline = os.urandom(32), task_deadline(chain, window)
    escrow(chain, PAYER).fund(task, 3, deadline, ETH)
    for node in VERIFIERS[:4]:
        node_commit(chain, task, node)
    return task, deadline


def _assign(chain: Chain, task: bytes, att: bytes) -> None:
    close_commits(chain, task)
    assign(chain, task, att)


def _quorum(chain: Chain, att: bytes, *, passed: bool) -> list[SignedVerdict]:
    """settle() arguments: the committee's three signed post-execution verdicts on `att` about the executor."""
    return [post_verdict(chain, v, att, passed=passed) for v in VERIFIERS[1:4]]


def _state(chain: Chain, task: bytes) -> int:
    return int(_esc(chain).functions.getTask(task).call()[4])


def _locks(chain: Chain, node: str) -> int:
    return int(chain.owner.contract("NodeRegistry", chain.d.registry).functions.locks(node).call())


def _deposit(chain: Chain) -> int:
    return int(chain.owner.contract("NodeRegistry", chain.d.registry).functions.nodeOf(EXECUTOR.address).call()[0])


def _balance(chain: Chain, address: str) -> int:
    return int(chain.owner.w3.eth.get_balance(Web3.to_checksum_address(address)))


def _refund(chain: Chain, task: bytes, signer: KeySigner = PAYER) -> dict[str, Any]:
    return chain.client(signer).transact(_esc(chain, signer).functions.refund(task))


@pytest.mark.parametrize("assigned", [
    pytest.param(False, id="never-assigned"),
    pytest.param(True, id="assigned-never-settled"),
])
def test_refund_after_the_deadline_credits_the_payer_exactly_and_withdraw_pays_it(
        chain: Chain, assigned: bool) -> None:
    task, deadline = _fund(chain)
    if assigned:
        _assign(chain, task, os.urandom(32))
    deposit = _deposit(chain)
    assert advance(chain, WINDOW + 1) > deadline
    receipt = _refund(chain, task)
    esc = _esc(chain)
    assert esc.functions.owed(PAYER.address).call() == ETH
    assert _state(chain, task) == REFUNDED
    events = esc.events.TaskRefunded().process_receipt(receipt, errors=DISCARD)  # the registry's unlocks too
    assert [(bytes(e["args"]["taskId"]), e["args"]["payer"], e["args"]["payment"]) for e in events] == [
        (task, PAYER.address, ETH)]
    assert _deposit(chain) == deposit, "a timeout must never slash the executor"
    assert esc.functions.owed(EXECUTOR.address).call() == 0
    assert all(esc.functions.owed(v).call() == 0 for v in COMMITTEE)
    assert _locks(chain, EXECUTOR.address) == 0 and all(_locks(chain, v) == 0 for v in COMMITTEE), \
        "a refunded task must release the deposits it locked"

    payer = chain.client(PAYER)
    before = _balance(chain, PAYER.address)
    r = payer.transact(_esc(chain, PAYER).functions.withdraw())
    fee = int(r["gasUsed"]) * int(r["effectiveGasPrice"])
    assert _balance(chain, PAYER.address) == before + ETH - fee
    assert esc.functions.owed(PAYER.address).call() == 0
    assert _balance(chain, chain.d.escrow) == 0, "the escrow must hold nothing after the withdrawal"


@pytest.mark.parametrize("assigned", [
    pytest.param(False, id="funded"),
    pytest.param(True, id="assigned"),
])
def test_refund_before_the_deadline_reverts_naming_it(chain: Chain, assigned: bool) -> None:
    task, deadline = _fund(chain)
    if assigned:
        _assign(chain, task, os.urandom(32))
        assert _locks(chain, EXECUTOR.address) == 1
    advance(chain, deadline - 60 - block_time(chain))  # close to the deadline, still before it
    err = reverts(lambda: _refund(chain, task), "DeadlineNotReached")
    assert err.error_args[0] == task and err.error_args[1] == deadline and err.error_args[2] <= deadline
    assert _state(chain, task) == (ASSIGNED if assigned else FUNDED)
    assert _esc(chain).functions.owed(PAYER.address).call() == 0


@pytest.mark.parametrize(("passed", "state"), [
    pytest.param(True, PAID, id="after-paid"),
    pytest.param(False, SLASHED, id="after-slashed"),
])
def test_refund_of_a_settled_task_reverts_naming_its_state(chain: Chain, passed: bool, state: int) -> None:
    att = os.urandom(32)
    args = _quorum(chain, att, passed=passed)
    task, _ = _fund(chain)
    _assign(chain, task, att)
    escrow(chain).settle(task, args)
    owed = _esc(chain).functions.owed(PAYER.address).call()
    advance(chain, WINDOW + 1)
    err = reverts(lambda: _refund(chain, task), "WrongState")
    assert err.error_args == (task, state)
    assert _esc(chain).functions.owed(PAYER.address).call() == owed, "a settled task paid the payer again"


def test_double_refund_reverts(chain: Chain) -> None:
    task, _ = _fund(chain)
    advance(chain, WINDOW + 1)
    _refund(chain, task)
    err = reverts(lambda: _refund(chain, task), "WrongState")
    assert err.error_args == (task, REFUNDED)
    assert _esc(chain).functions.owed(PAYER.address).call() == ETH


def test_settle_after_a_refund_reverts(chain: Chain) -> None:
    att = os.urandom(32)
    args = _quorum(chain, att, passed=True)
    task, _ = _fund(chain)
    _assign(chain, task, att)
    advance(chain, WINDOW + 1)
    _refund(chain, task)
    err = reverts(lambda: escrow(chain).settle(task, args), "WrongState")
    assert err.error_args == (task, REFUNDED)
    esc = _esc(chain)
    assert esc.functions.owed(EXECUTOR.address).call() == 0
    assert esc.functions.owed(PAYER.address).call() == ETH


def test_assign_after_a_refund_reverts(chain: Chain) -> None:
    task, _ = _fund(chain)
    advance(chain, WINDOW + 1)
    _refund(chain, task)
    err = reverts(lambda: _assign(chain, task, os.urandom(32)), "WrongState")
    assert err.error_args == (task, REFUNDED)


@pytest.mark.parametrize(("passed", "state"), [
    pytest.param(True, PAID, id="late-passed-quorum-pays"),
    pytest.param(False, SLASHED, id="late-failed-quorum-slashes"),
])
def test_a_late_settle_before_any_refund_still_works(chain: Chain, passed: bool, state: int) -> None:
    """Settlement wins until a refund: a proven outcome that arrives after the deadline is still the truth
    about the run, so it pays (or slashes) as it would have on time; the payer's refund then reverts."""
    att = os.urandom(32)
    args = _quorum(chain, att, passed=passed)
    task, deadline = _fund(chain)
    assert advance(chain, WINDOW + DAY) > deadline
    _assign(chain, task, att)  # the coordinator came back late: binding still works before a refund
    deposit = _deposit(chain)
    escrow(chain, OUTSIDER).settle(task, args)
    assert _state(chain, task) == state
    esc = _esc(chain)
    if passed:
        assert esc.functions.owed(EXECUTOR.address).call() == ETH * 7000 // 10000
        assert esc.functions.owed(PAYER.address).call() == 0
    else:
        assert esc.functions.owed(PAYER.address).call() == 2 * ETH  # payment back + 1 ETH slashed deposit
        assert _deposit(chain) == deposit - ETH
    reverts(lambda: _refund(chain, task), "WrongState")


def test_only_the_payer_can_refund(chain: Chain) -> None:
    """An outsider (or the executor, or the coordinator) cannot close a task early for the payer, nor
    race a late settlement: the refund is the payer's choice alone."""
    task, _ = _fund(chain)
    advance(chain, WINDOW + 1)
    for signer in (OUTSIDER, EXECUTOR):
        err = reverts(partial(_refund, chain, task, signer), "NotPayer")
        assert err.error_args == (signer.address, PAYER.address)
    reverts(lambda: chain.owner.transact(_esc(chain).functions.refund(task)), "NotPayer")
    assert _state(chain, task) == FUNDED
    _refund(chain, task)
    assert _esc(chain).functions.owed(PAYER.address).call() == ETH


def test_refund_of_an_unknown_task_reverts(chain: Chain) -> None:
    task = os.urandom(32)
    err = reverts(lambda: _refund(chain, task), "WrongState")
    assert err.error_args == (task, 0)


@pytest.mark.parametrize(("offset", "error"), [
    pytest.param(-3600, "DeadlineInPast", id="an-hour-ago"),
    pytest.param(None, "DeadlineInPast", id="zero"),
    pytest.param(0, "DeadlineInPast", id="the-latest-block-time"),
    pytest.param(30 * DAY + 3600, "DeadlineTooFar", id="thirty-days-and-an-hour"),
    pytest.param(3650 * DAY, "DeadlineTooFar", id="ten-years"),
    pytest.param(2**64 - 1, "DeadlineTooFar", id="max-uint64"),
])
def test_deadline_out_of_bounds_reverts_naming_it(chain: Chain, offset: int | None, error: str) -> None:
    now = block_time(chain)
    if offset is None:
        deadline = 0
    elif offset >= 2**63:
        deadline = offset
    else:
        deadline = now + offset
    task = os.urandom(32)
    payer = chain.client(PAYER)
    before = _balance(chain, PAYER.address)
    err = reverts(lambda: payer.transact(_esc(chain, PAYER).functions.fund(task, 3, deadline), value=ETH), error)
    assert err.error_args[0] == deadline
    if error == "DeadlineTooFar":
        assert now + 30 * DAY <= err.error_args[1] < deadline
    assert _state(chain, task) == 0
    assert _balance(chain, PAYER.address) == before, "a refused task must not take the payment"


@pytest.mark.parametrize("offset", [
    pytest.param(60, id="a-minute"),
    pytest.param(30 * DAY - 3600, id="just-inside-thirty-days"),
])
def test_deadline_within_bounds_is_stored(chain: Chain, offset: int) -> None:
    """The positive control for the bounds above: the same call with a sane deadline escrows, and the
    deadline is what getTask reports."""
    task, deadline = os.urandom(32), task_deadline(chain, offset)
    escrow(chain, PAYER).fund(task, 3, deadline, ETH)
    t = _esc(chain).functions.getTask(task).call()
    assert (t[0], t[1], t[2], t[3], t[4]) == (PAYER.address, ETH, 3, deadline, FUNDED)
