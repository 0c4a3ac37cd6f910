"""Issue 12 items 3 to 6 as attacks on a real anvil (decision 0096). Each attack test has its positive control,
and each attack succeeded against the contracts before 0096 (the docstrings say what it did then).

- assign binds only nodes of the revealed sortition: committed inside the commit window (closed on the chain's
  clock), after the seed existed, each with a reveal that opens its commitment; the reveals land on chain.
- an executor cannot escape a slash by leaving: its deposit is locked from its commitment, it stays assignable
  and slashable after another task slashed it below the minimum, and unselected committers are released.
- fabricated outcomes move no reputation, a round's id cannot be taken by anyone but the coordinator, and a
  quorum front-running a batch's root (a forged epoch or count) neither hides the real verdicts nor wedges
  the chain-writer.
- the operator refuses an escrow whose committee size, payer, amount, deadline or state differs from the
  capsule, and sees no escrow funded under another id.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from chainkit import (
    COMMITTEE,
    ETH,
    EXECUTOR,
    OUTSIDER,
    PAYER,
    VERIFIERS,
    WRITER,
    Chain,
    advance,
    assign,
    block_time,
    close_commits,
    deploy,
    deposit_of,
    escrow,
    funded,
    make_verdict,
    new_epoch,
    node_commit,
    post_verdict,
    reveals,
    reverts,
    seed_of,
    task_deadline,
)
from web3.logs import DISCARD

from trustcap.capsule.ids import capsule_id, task_id
from trustcap.chain.anvil import Anvil
from trustcap.chain.errors import ChainError
from trustcap.chain.journal import Journal
from trustcap.chain.keys import KeySigner
from trustcap.chain.typed import sign_batch
from trustcap.chain.writer import Writer
from trustcap.evidence.verdict import SignedVerdict, Verdict, verdict_id
from trustcap.operator import capsule as cap
from trustcap.sortition import Reveal, commitment, selection_alpha


def _locks(chain: Chain, node: KeySigner) -> int:
    reg = chain.owner.contract("NodeRegistry", chain.d.registry)
    return int(reg.functions.locks(node.address).call())


def _leave(chain: Chain, node: KeySigner) -> dict[str, Any]:
    me = chain.client(node)
    return me.transact(me.contract("NodeRegistry", chain.d.registry).functions.requestLeave())


def _fails(chain: Chain, att: bytes) -> list[SignedVerdict]:
    return [post_verdict(chain, v, att, passed=False) for v in COMMITTEE[:2]]


def _passes(chain: Chain, att: bytes) -> list[SignedVerdict]:
    return [post_verdict(chain, v, att, passed=True) for v in COMMITTEE[:2]]


def _score(chain: Chain, node: str) -> int:
    return int(chain.owner.contract("Reputation", chain.d.reputation).functions.scoreOf(node).call())


# -- item 3: assign binds only the revealed sortition -----------------------------------------------------
def test_a_commit_after_the_window_is_refused_so_nobody_joins_after_seeing_the_reveals(chain: Chain) -> None:
    """Before 0096 a node could commit until assign (after the run), so it could wait for the others' reveals
    and join only when its draw would win; the brokers reading committers later saw another selection."""
    task = funded(chain, committers=VERIFIERS[:3])
    deadline, seed = escrow(chain).selection(task)
    assert seed == seed_of(chain, task) and deadline > block_time(chain)
    advance(chain, deadline + 1 - block_time(chain))
    err = reverts(lambda: node_commit(chain, task, VERIFIERS[3]), "CommitWindowClosed")
    assert err.error_args[1] == deadline
    assert escrow(chain).committers(task) == [v.address.lower() for v in VERIFIERS[:3]]
    other = funded(chain, committers=VERIFIERS[:3])  # control: inside its window the same node commits
    node_commit(chain, other, VERIFIERS[3])
    assert VERIFIERS[3].address.lower() in escrow(chain).committers(other)


def test_a_commit_before_the_seed_block_exists_is_refused(chain: Chain) -> None:
    """The seed is the hash of the block after funding: a commitment in that very block was made without it
    (before 0096 commit took any non-zero value at once, so a node could commit before the draw existed)."""
    task = os.urandom(32)
    escrow(chain, PAYER).fund(task, 3, task_deadline(chain), ETH)
    c = os.urandom(32)
    err = reverts(lambda: escrow(chain, EXECUTOR).commit(task, c), "SeedNotKnown")
    info = escrow(chain).task(task)
    assert info is not None and err.error_args[1] == info.funded_block + 1
    seed_of(chain, task)  # control: once the seed block has a successor, the same commit goes through
    escrow(chain, EXECUTOR).commit(task, c)
    assert escrow(chain).commitment(task, EXECUTOR.address) == c
    assert escrow(chain).selection(task)[1] == escrow(chain).block_hash(info.funded_block + 1)


def test_assign_before_the_commit_deadline_is_refused(chain: Chain) -> None:
    task = funded(chain)
    deadline, _ = escrow(chain).selection(task)
    att = os.urandom(32)
    err = reverts(lambda: assign(chain, task, att), "CommitWindowOpen")
    assert err.error_args[1] == deadline
    close_commits(chain, task)
    assign(chain, task, att)  # control
    assert escrow(chain).task(task).state == "Assigned"  # type: ignore[union-attr]


@pytest.mark.parametrize("who", [pytest.param(0, id="executor"), pytest.param(2, id="verifier")])
def test_a_committed_node_whose_reveal_does_not_open_its_commitment_is_not_assigned(chain: Chain, who: int) -> None:
    """Before 0096 assign took any committed node: a coordinator could bind a node that never revealed (it
    was skipped by selection) or whose reveal opens nothing. Now each participant's reveal must open it."""
    task = funded(chain)
    close_commits(chain, task)
    nodes = [EXECUTOR, *COMMITTEE]
    mine = {r.node_id: r for r in reveals(task)}
    opening = [mine[n.address.lower()] for n in nodes]
    forged = list(opening)
    forged[who] = Reveal(opening[who].node_id, os.urandom(81), opening[who].salt)
    err = reverts(lambda: assign(chain, task, os.urandom(32), opening=forged), "RevealMismatch")
    assert err.error_args[0].lower() == nodes[who].address.lower()
    swapped = [opening[1], opening[0], *opening[2:]]  # each reveal must be its own node's
    reverts(lambda: assign(chain, task, os.urandom(32), opening=swapped), "RevealMismatch")
    reverts(lambda: assign(chain, task, os.urandom(32), opening=opening[:3]), "WrongRevealCount")
    receipt = assign(chain, task, os.urandom(32), opening=opening)  # control: the real reveals
    assert receipt["status"] == 1


def test_assign_publishes_every_participants_reveal_and_each_opens_its_on_chain_commitment(chain: Chain) -> None:
    """What the off-chain checkers (brokers, co-signers, verify capsule) recompute the VRF selection from: the
    reveals are on chain, each opening its node's commitment under the seed the chain kept."""
    task = funded(chain)
    close_commits(chain, task)
    view = escrow(chain)
    receipt = view.assign(task, os.urandom(32), EXECUTOR.address, [v.address for v in COMMITTEE], reveals(task))
    c = chain.owner.contract("TaskEscrow", chain.d.escrow)
    events = c.events.Revealed().process_receipt(receipt, errors=DISCARD)  # the registry's events are not these
    assert [str(e["args"]["node"]).lower() for e in events] == [n.address.lower() for n in [EXECUTOR, *COMMITTEE]]
    _, seed = view.selection(task)
    alpha = selection_alpha(task.hex(), seed)
    for e in events:
        node = str(e["args"]["node"]).lower()
        assert commitment(alpha, node, bytes(e["args"]["pi"]), bytes(e["args"]["salt"])) == view.commitment(task, node)


def test_the_python_escrow_refuses_to_assign_a_node_without_an_opening_reveal(chain: Chain) -> None:
    task = funded(chain)
    close_commits(chain, task)
    view = escrow(chain)
    partial = [r for r in reveals(task) if r.node_id != COMMITTEE[1].address.lower()]
    with pytest.raises(ChainError, match=f"{COMMITTEE[1].address.lower()} has no reveal"):
        view.assign(task, os.urandom(32), EXECUTOR.address, [v.address for v in COMMITTEE], partial)
    with pytest.raises(ChainError, match=f"{OUTSIDER.address.lower()} has no commitment on chain"):
        view.assign(task, os.urandom(32), EXECUTOR.address, [*(v.address for v in COMMITTEE[:2]), OUTSIDER.address],
                    reveals(task))
    assert view.task(task).state == "Funded"  # type: ignore[union-attr]


# -- item 4: no escape from a slash -----------------------------------------------------------------------
def test_an_executor_cannot_leave_between_selection_and_assignment(chain: Chain) -> None:
    """The executor learns its role at selection, long before assign (after the run). Before 0096 it could
    requestLeave then: assign reverted NotActiveNode, nothing could slash it, and after leaveDelay it took
    its whole deposit back. Now the commitment locked the deposit."""
    task = funded(chain)
    reverts(lambda: _leave(chain, EXECUTOR), "DepositIsLocked")
    close_commits(chain, task)
    att = os.urandom(32)
    assign(chain, task, att)
    before = deposit_of(chain, EXECUTOR.address)
    escrow(chain).settle(task, _fails(chain, att))
    assert deposit_of(chain, EXECUTOR.address) == before - ETH  # the slash landed
    assert escrow(chain).task(task).state == "Slashed"  # type: ignore[union-attr]
    _leave(chain, EXECUTOR)  # control: with the task closed, leaving works


def test_assign_releases_the_committers_it_does_not_name_and_cancel_releases_all(chain: Chain) -> None:
    extra = VERIFIERS[4]  # PAYER doubles as a fifth node here
    client = chain.client(extra)
    client.register_node(chain.d, b"\x02" + os.urandom(32), os.urandom(32), 2 * ETH)
    task = funded(chain, committers=[*VERIFIERS[:4], extra])
    assert _locks(chain, extra) == 1
    close_commits(chain, task)
    assign(chain, task, os.urandom(32))
    assert _locks(chain, extra) == 0 and _locks(chain, EXECUTOR) == 1
    other = funded(chain)
    assert _locks(chain, COMMITTEE[0]) == 2
    escrow(chain).cancel(other)
    assert _locks(chain, COMMITTEE[0]) == 1  # only the assigned task still holds it


def test_an_executor_slashed_below_the_minimum_elsewhere_is_still_assigned_and_slashed(anvil: Anvil) -> None:
    """Before 0096 assign demanded an Active executor: one slashed below the minimum deposit by a first task
    could no longer be assigned to a second it had run, so that task's slash never came. Now a commitment
    (made while Active, locked since) is what assign asks, and the slash takes what is left."""
    chain = deploy(anvil, slash_amount=3 * ETH // 2)
    first, second = funded(chain), funded(chain)
    close_commits(chain, first)
    att1, att2 = os.urandom(32), os.urandom(32)
    assign(chain, first, att1)
    escrow(chain).settle(first, _fails(chain, att1))
    assert deposit_of(chain, EXECUTOR.address) == ETH // 2
    node = escrow(chain).node(EXECUTOR.address)
    assert node is not None and not node.active
    close_commits(chain, second)
    assign(chain, second, att2)
    escrow(chain).settle(second, _fails(chain, att2))
    assert deposit_of(chain, EXECUTOR.address) == 0
    info = escrow(chain).task(second)
    assert info is not None and info.state == "Slashed"


# -- item 5: reputation and front-runs --------------------------------------------------------------------
def test_fabricated_outcomes_neither_farm_nor_wipe_reputation(chain: Chain) -> None:
    task = funded(chain)
    close_commits(chain, task)
    att = os.urandom(32)
    outsider = chain.client(OUTSIDER)
    rep = outsider.contract("Reputation", chain.d.reputation)
    reverts(lambda: outsider.transact(rep.functions.record(EXECUTOR.address, att, True)), "NotRecorder")
    # a payer with its own task cannot bind the real round's id: only the coordinator assigns
    reverts(lambda: assign(chain, task, att, signer=PAYER), "NotCoordinator")
    assign(chain, task, att)
    before = _score(chain, EXECUTOR.address)
    # a "failed" outcome signed by registered nodes outside the committee wipes nothing
    fake = [post_verdict(chain, s, att, passed=False) for s in (EXECUTOR, VERIFIERS[4])]
    reverts(lambda: escrow(chain, OUTSIDER).settle(task, fake), "NotInCommittee")
    # one member's failed verdict, repeated, is one vote
    one = post_verdict(chain, COMMITTEE[0], att, passed=False)
    reverts(lambda: escrow(chain, OUTSIDER).settle(task, [one, one]), "DuplicateVerifier")
    escrow(chain, OUTSIDER).settle(task, _passes(chain, att))  # control: the real outcome counts
    assert _score(chain, EXECUTOR.address) == before + 1
    other = funded(chain)
    close_commits(chain, other)
    reverts(lambda: assign(chain, other, att), "AttestationAlreadyAssigned")  # a round counts once


def _sealed(chain: Chain, tmp_path: Path, n: int = 3) -> tuple[Writer, Any, list[Verdict]]:
    """A writer with one sealed, not yet sent batch of `n` verdicts (signed by its development quorum)."""
    epoch = new_epoch()
    writer = Writer(chain.client(WRITER), chain.d, Journal(tmp_path / "journal.sqlite"), VERIFIERS[:3])
    verdicts = [make_verdict(epoch=epoch) for _ in range(n)]
    for v in verdicts:
        writer.add(v)
    writer.seal()
    (batch,) = writer.journal.unconfirmed()
    return writer, batch, verdicts


def _all_provable(chain: Chain, writer: Writer, root: bytes, verdicts: list[Verdict]) -> None:
    for v in verdicts:
        rec = writer.record("0x" + verdict_id(v, chain.domain).hex())
        assert rec is not None, "the writer has no record of a real verdict"
        assert rec.root == "0x" + root.hex()
        assert chain.owner.is_included(chain.d, v, root, [bytes.fromhex(p[2:]) for p in rec.proof])


def _record_forged(chain: Chain, epoch: int, root: bytes, count: int) -> None:
    """A colluding batch quorum records the real root under a forged (epoch, count) first."""
    log = chain.owner.contract("AttestationLog", chain.d.log)
    sigs = sign_batch(VERIFIERS[:3], epoch, root, count, chain.d.chain_id, chain.d.log)
    chain.client(OUTSIDER).transact(log.functions.recordBatch(epoch, root, count, sigs))


def test_a_root_front_run_under_a_forged_epoch_does_not_hide_the_real_verdicts(chain: Chain, tmp_path: Path) -> None:
    """Before 0096 a root was recorded once whatever its epoch: a quorum that recorded the real root under
    another epoch first made the real batch RootAlreadyRecorded forever (the writer failed on it) and every
    real verdict unprovable (isIncluded wants the verdict's own epoch)."""
    writer, batch, verdicts = _sealed(chain, tmp_path)
    _record_forged(chain, batch.epoch + 1, batch.root, batch.count)
    assert not chain.owner.is_included(chain.d, verdicts[0], batch.root, [])  # forged epoch: nothing proves
    writer.run(timeout=60)
    (row,) = writer.journal.batches()
    assert row.state == "confirmed" and writer.stats["taken"] == 0  # the real batch itself was recorded
    assert chain.owner.find_batch(chain.d, bytes.fromhex(batch.batch_id[2:]), batch.root) is not None
    _all_provable(chain, writer, batch.root, verdicts)


def test_a_root_front_run_under_a_forged_count_does_not_wedge_the_writer(chain: Chain, tmp_path: Path) -> None:
    """The same root and epoch under another count: the contract refuses the real batch id, but every real
    verdict is provable under the forged record, so the writer confirms from it instead of failing forever."""
    writer, batch, verdicts = _sealed(chain, tmp_path)
    _record_forged(chain, batch.epoch, batch.root, batch.count + 1)
    writer.run(timeout=60)
    assert writer.stats["taken"] >= 1
    (row,) = writer.journal.batches()
    assert row.state == "confirmed"
    _all_provable(chain, writer, batch.root, verdicts)


def test_a_copied_batch_transaction_sent_first_is_the_writers_own_record(chain: Chain, tmp_path: Path) -> None:
    writer, batch, verdicts = _sealed(chain, tmp_path)
    log = chain.owner.contract("AttestationLog", chain.d.log)
    chain.client(OUTSIDER).transact(log.functions.recordBatch(batch.epoch, batch.root, batch.count, batch.signatures))
    writer.run(timeout=60)
    (row,) = writer.journal.batches()
    assert row.state == "confirmed" and writer.stats["taken"] == 0
    assert writer.stats["sent"] == 0  # found recorded before anything was signed
    _all_provable(chain, writer, batch.root, verdicts)


# -- item 6: the escrow against the capsule ---------------------------------------------------------------
def _capsule(k: int = 3, timeout: int = 600) -> dict[str, Any]:
    return {"metadata": {"namespace": "alice", "name": "psi", "uid": "5f1c-uid"},
            "spec": {"committee": {"size": k}, "timeoutSeconds": timeout,
                     "payment": {"payer": PAYER.address, "amountWei": str(ETH)}}}


@pytest.mark.parametrize(("case", "field"), [
    pytest.param("k", "spec.committee.size", id="another-committee-size"),
    pytest.param("amount", "spec.payment.amountWei", id="less-payment"),
    pytest.param("payer", "spec.payment.payer", id="another-payer"),
    pytest.param("deadline", "spec.timeoutSeconds", id="deadline-too-early"),
    pytest.param("state", "not Funded", id="cancelled"),
])
def test_an_escrow_that_differs_from_the_capsule_is_refused_before_scheduling(
        chain: Chain, case: str, field: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's check (Driver._escrow_problem) on what the chain really holds: each field the payer
    could get wrong, or set to pay less or settle on fewer verdicts than the capsule asks, is named."""
    monkeypatch.setattr(cap, "_now", lambda: block_time(chain))  # the shared anvil's clock runs ahead
    tid = os.urandom(32)  # each case its own task on the shared anvil
    payer = OUTSIDER if case == "payer" else PAYER
    deadline = task_deadline(chain, 300 if case == "deadline" else 3600)
    escrow(chain, payer).fund(tid, 5 if case == "k" else 3, deadline, ETH // 2 if case == "amount" else ETH)
    if case == "state":
        escrow(chain).cancel(tid)
    problem = cap.Driver._escrow_problem(_capsule()["spec"], escrow(chain).task(tid))
    assert field in problem, problem
    good = os.urandom(32)  # control: the escrow the capsule asks for
    escrow(chain, PAYER).fund(good, 3, task_deadline(chain, 3600), ETH)
    assert cap.Driver._escrow_problem(_capsule()["spec"], escrow(chain).task(good)) == ""


def test_an_escrow_funded_under_another_id_is_not_the_capsules(chain: Chain) -> None:
    """The operator looks the escrow up by the capsule's task id (namespace, name and the object's uid): one
    funded under the capsule id, or under the task id of an earlier object of the same name, is not seen."""
    meta = _capsule()["metadata"]
    cid = capsule_id(meta["namespace"], meta["name"])
    mine = cap.Driver.task_id(_capsule())
    assert mine == task_id(cid, meta["uid"])
    for wrong in (cid, task_id(cid, meta["uid"] + "-earlier")):
        escrow(chain, PAYER).fund(wrong, 3, task_deadline(chain), ETH)
    assert escrow(chain).task(mine) is None
    escrow(chain, PAYER).fund(mine, 3, task_deadline(chain), ETH)  # control
    assert escrow(chain).task(mine) is not None


def test_a_capsule_asking_more_verdicts_than_the_escrow_settles_on_is_refused(
        chain: Chain, monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest lets a capsule ask for more than ceil(2k/3) verdicts (size 3, quorum 3: unanimous); the
    escrow settles on ceil(2k/3) = 2, so scheduling it would let two verdicts pay or slash a run whose owner
    asked for three."""
    monkeypatch.setattr(cap, "_now", lambda: block_time(chain))
    tid = os.urandom(32)
    escrow(chain, PAYER).fund(tid, 3, task_deadline(chain, 3600), ETH)
    spec = _capsule()["spec"]
    spec["committee"]["quorum"] = 3
    assert "spec.committee.quorum" in cap.Driver._escrow_problem(spec, escrow(chain).task(tid))
    spec["committee"]["quorum"] = 2  # control: the escrow's own quorum is accepted
    assert cap.Driver._escrow_problem(spec, escrow(chain).task(tid)) == ""
