"""`select_from_chain` weighs each committer with the stake and reputation the escrow kept at its commit
(decision 0115), never with the registry's values of the moment it is asked, and does not drop a committer
that was slashed or left after committing. The chain here is a fake ChainView; the VRF, the commitments and
the selection are the real code (e2e/chain/test_chain_grinding_e2e.py runs the same on anvil)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import pytest

from trustcap import vrf
from trustcap.chain.escrow import NodeInfo, TaskInfo
from trustcap.sortition import Reveal, SortitionError, commitment, participate, select_from_chain, selection_alpha

TASK = hashlib.sha256(b"task").digest()
SEED = hashlib.sha256(b"seed").digest()
FUNDED = 100
HEAVY, LIGHT = 10**30, 1  # a stake ratio no draw overturns (P ~ 1e-30)


@dataclass
class View:
    k: int = 1
    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    commits: dict[str, bytes] = field(default_factory=dict)
    kept: dict[str, tuple[int, int]] = field(default_factory=dict)

    def task(self, task_id: bytes) -> TaskInfo | None:
        return TaskInfo(payer="0x" + "99" * 20, payment=1, k=self.k, deadline=0, state="Funded",
                        funded_block=FUNDED, executor="0x" + "00" * 20, attestation_id=b"\0" * 32, verifiers=())

    def block_hash(self, number: int) -> bytes | None:
        return SEED if number == FUNDED + 1 else None

    def commitment(self, task_id: bytes, node: str) -> bytes | None:
        return self.commits.get(node)

    def committers(self, task_id: bytes) -> list[str]:
        return list(self.commits)

    def committed_weight(self, task_id: bytes, node: str) -> tuple[int, int] | None:
        return self.kept.get(node)

    def node(self, address: str) -> NodeInfo | None:
        return self.nodes.get(address)


def _node(view: View, i: int, *, kept: int, now: int, active: bool = True) -> Reveal:
    address = "0x" + f"{i:02x}" * 20
    secret = hashlib.sha256(f"vrf {i}".encode()).digest()
    c, r = participate(address, secret, selection_alpha(TASK.hex(), SEED))
    view.nodes[address] = NodeInfo(address=address, vrf_public_key=vrf.public_key(secret), stake=now,
                                   reputation_bp=0, active=active)
    view.commits[address] = c
    view.kept[address] = (kept, 0)
    return r


def test_the_weight_kept_at_the_commit_decides_not_the_registrys_of_now() -> None:
    """The attack on weights read when checked: between the commit and a check, the registry's stakes change
    (a slash, a settlement's reputation). Before 0115 the check weighed the new values, so a later broker or
    `trustcap verify capsule` could rank the draw otherwise than the scheduler did."""
    view = View()
    reveals = [_node(view, 1, kept=HEAVY, now=LIGHT), _node(view, 2, kept=LIGHT, now=HEAVY)]
    sel = select_from_chain(view, TASK, reveals)
    assert sel.executor == "0x" + "01" * 20 and sel.committee == ("0x" + "02" * 20,)


def test_control_swapping_the_kept_weights_swaps_the_selection() -> None:
    view = View()
    reveals = [_node(view, 1, kept=LIGHT, now=HEAVY), _node(view, 2, kept=HEAVY, now=LIGHT)]
    assert select_from_chain(view, TASK, reveals).executor == "0x" + "02" * 20


def test_a_committer_slashed_below_the_minimum_after_its_commit_still_counts() -> None:
    """Active was checked by the contract at the commit; asking again would let a later slash change who had
    been selected (the contract's `assign` does not ask it either, decision 0096)."""
    view = View()
    reveals = [_node(view, 1, kept=HEAVY, now=0, active=False), _node(view, 2, kept=LIGHT, now=LIGHT)]
    assert select_from_chain(view, TASK, reveals).executor == "0x" + "01" * 20


def test_a_committer_without_a_kept_weight_is_skipped_and_named() -> None:
    view = View()
    reveals = [_node(view, 1, kept=HEAVY, now=HEAVY), _node(view, 2, kept=LIGHT, now=LIGHT),
               _node(view, 3, kept=LIGHT, now=LIGHT)]
    del view.kept["0x" + "03" * 20]
    sel = select_from_chain(view, TASK, reveals)
    assert sel.skipped == ("0x" + "03" * 20,)
    del view.kept["0x" + "02" * 20]
    with pytest.raises(SortitionError, match="no commitment on chain"):
        select_from_chain(view, TASK, reveals)


def test_a_reveal_that_does_not_open_the_commitment_still_counts_nothing() -> None:
    view = View()
    good = [_node(view, 1, kept=LIGHT, now=LIGHT), _node(view, 2, kept=LIGHT, now=LIGHT)]
    forged = Reveal(good[0].node_id, good[0].pi, b"\x01" * 32)
    assert commitment(selection_alpha(TASK.hex(), SEED), forged.node_id, forged.pi, forged.salt) != \
        view.commits[forged.node_id]
    with pytest.raises(SortitionError, match="reveal does not open its commitment"):
        select_from_chain(view, TASK, [forged, good[1]])
