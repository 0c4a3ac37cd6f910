"""Issue 12 item 7 on a real anvil (decision 0115): the eligible set of a task's draw is fixed before its seed.

A node's VRF key is fixed at `register`, and its seed is the hash of the block after the funding block. Before
0115 a party that saw the seed could register fresh keys until one drew low and commit with it: the commit
window was still open. Now `commit` refuses a node registered after the funding block (`RegisteredAfterSeed`),
and the weight a committer is drawn with (stake and reputation) is kept with its commitment, so a slash or a
settlement after the commit moves nobody's draw.

The honest nodes here hold real ECVRF keys and commit real proofs, so `select_from_chain` ranks them exactly as
every broker, co-signer and `trustcap verify capsule` would.
"""

from __future__ import annotations

import hashlib
import os

from chainkit import (
    COMMIT_WINDOW,
    ETH,
    EXECUTOR,
    OWNER,
    PAYER,
    Chain,
    assign,
    close_commits,
    escrow,
    node_commit,
    post_verdict,
    reverts,
)
from chainkit import seed_of as seed_after_funding

from trustcap import vrf
from trustcap.chain.anvil import Anvil
from trustcap.chain.client import ChainClient
from trustcap.chain.escrow import deploy_network
from trustcap.chain.keys import KeySigner
from trustcap.sortition import Reveal, commitment, draw, select_from_chain, selection_alpha, weight

#: the grinder's budget: the issue's attack won 9 or 10 capsules in 10 with 200 keys against 10 honest nodes
GRIND_KEYS = 200


class Node:
    """A node with a fresh chain account (funded on anvil when it registers) and a real VRF key."""

    def __init__(self, label: str) -> None:
        self.signer = KeySigner(hashlib.sha256(os.urandom(32) + label.encode()).digest())
        self.vrf_secret = hashlib.sha256(b"vrf " + os.urandom(32)).digest()
        self.vrf_public = vrf.public_key(self.vrf_secret)

    @property
    def address(self) -> str:
        return self.signer.address.lower()

    def register(self, chain: Chain) -> None:
        chain.anvil.rpc("anvil_setBalance", [self.signer.address, hex(100 * ETH)])
        chain.client(self.signer).register_node(chain.d, self.vrf_public, os.urandom(32), 2 * ETH)

    def reveal(self, task: bytes, seed: bytes) -> tuple[bytes, Reveal]:
        alpha = selection_alpha(task.hex(), seed)
        pi, salt = vrf.prove(self.vrf_secret, alpha), os.urandom(32)
        return commitment(alpha, self.address, pi, salt), Reveal(self.address, pi, salt)

    def commit(self, chain: Chain, task: bytes, seed: bytes) -> Reveal:
        c, r = self.reveal(task, seed)
        escrow(chain, self.signer).commit(task, c)
        return r


def _honest(chain: Chain, n: int = 4) -> list[Node]:
    nodes = [Node(f"honest {i}") for i in range(n)]
    for node in nodes:
        node.register(chain)
    return nodes


def _fund(chain: Chain, k: int = 3) -> tuple[bytes, bytes]:
    task = os.urandom(32)
    deadline = int(chain.owner.w3.eth.get_block("latest")["timestamp"]) + 3600
    escrow(chain, PAYER).fund(task, k, deadline, ETH)
    return task, seed_after_funding(chain, task)


def _fresh_chain(anvil: Anvil) -> Chain:
    """Contracts with no node registered yet (chainkit's own nodes hold a dummy VRF key)."""
    d = deploy_network(anvil.url, OWNER, [], deposit=2 * ETH, quorum=2, min_deposit=ETH, leave_delay=3600,
                       slash_amount=3 * ETH // 2, commit_window=COMMIT_WINDOW)
    return Chain(anvil, ChainClient(anvil.url, OWNER), d)


def test_keys_registered_after_seeing_the_seed_cannot_commit(anvil: Anvil) -> None:
    """The attack: four honest nodes commit; the grinder reads the seed, makes fresh VRF keys until one draws
    lower than every honest node (it would execute), registers it with the minimum deposit and commits while
    the window is open. Before 0115 that commit was accepted and `select_from_chain` named the grinder."""
    chain = _fresh_chain(anvil)
    honest = _honest(chain)
    task, seed = _fund(chain)
    alpha = selection_alpha(task.hex(), seed)
    reveals = [node.commit(chain, task, seed) for node in honest]
    stake_weight = weight(2 * ETH, 0)
    best_honest = min(draw(vrf.verify(n.vrf_public, r.pi, alpha), stake_weight)
                      for n, r in zip(honest, reveals, strict=True))
    winner = None
    for i in range(GRIND_KEYS):
        candidate = Node(f"grinder {i}")
        if draw(vrf.evaluate(candidate.vrf_secret, alpha), stake_weight) < best_honest:
            winner = candidate
            break
    assert winner is not None, f"no ground key in {GRIND_KEYS} beat the honest draws (probability ~(4/5)^200)"
    winner.register(chain)  # in a block after the seed block: the key was made from the seed
    c, grinder_reveal = winner.reveal(task, seed)
    refusal = reverts(lambda: escrow(chain, winner.signer).commit(task, c), "RegisteredAfterSeed")
    info = escrow(chain).task(task)
    assert info is not None and refusal.error_args[2] == info.funded_block + 1  # names the seed block
    assert winner.address not in escrow(chain).committers(task)
    close_commits(chain, task)
    sel = select_from_chain(escrow(chain), task, [*reveals, grinder_reveal])
    assert sel.executor in {n.address for n in honest} and winner.address not in sel.committee


def test_many_fresh_keys_after_the_seed_are_all_refused(anvil: Anvil) -> None:
    """A grinder that registers a batch of fresh keys in the seed block's successors gets none of them in."""
    chain = _fresh_chain(anvil)
    _honest(chain)
    task, seed = _fund(chain)
    fresh = [Node(f"sybil {i}") for i in range(8)]
    for node in fresh:
        node.register(chain)
        c, _ = node.reveal(task, seed)
        reverts(lambda c=c, node=node: escrow(chain, node.signer).commit(task, c), "RegisteredAfterSeed")
    assert escrow(chain).committers(task) == []


def test_control_a_node_registered_before_the_funding_block_commits_and_can_be_drawn(anvil: Anvil) -> None:
    """Positive control: the same fresh-key flow, registered before the task is funded, is accepted and ranked."""
    chain = _fresh_chain(anvil)
    honest = _honest(chain)
    early = Node("early")
    early.register(chain)
    task, seed = _fund(chain)
    reveals = [node.commit(chain, task, seed) for node in [*honest, early]]
    assert early.address in escrow(chain).committers(task)
    close_commits(chain, task)
    sel = select_from_chain(escrow(chain), task, reveals)
    assert {sel.executor, *sel.committee} <= {n.address for n in [*honest, early]} and len(sel.committee) == 3


def test_the_draw_weighs_the_stake_and_reputation_kept_at_the_commit(anvil: Anvil) -> None:
    """The attack on reading weights when checked: the selected executor of task A is slashed below the minimum
    by another task B after A's commits. Before 0115 `select_from_chain` read the registry's stake and Active
    flag of now and skipped it, so a check after the slash named another executor than the scheduler had (and a
    broker or co-signer refused the real task). Now the weight kept at the commit decides, and A is unchanged."""
    chain = _fresh_chain(anvil)
    honest = _honest(chain)
    task_a, seed_a = _fund(chain)
    reveals_a = [node.commit(chain, task_a, seed_a) for node in honest]
    close_commits(chain, task_a)
    view = escrow(chain)
    before = select_from_chain(view, task_a, reveals_a)
    x = next(n for n in honest if n.address == before.executor)
    kept = view.committed_weight(task_a, x.address)
    assert kept == (2 * ETH, 0)
    # task B: x executes, and two of its committee fail it; the slash takes 1.5 of its 2 ETH
    task_b, _seed_b = _fund(chain)
    others = [n for n in honest if n is not x]
    for node in [x, *others]:
        node_commit(chain, task_b, node.signer)
    close_commits(chain, task_b)
    att = os.urandom(32)
    assign(chain, task_b, att, executor=x.signer, committee=[n.signer for n in others])
    view.settle(task_b, [post_verdict(chain, n.signer, att, passed=False, node=x.signer.address) for n in others[:2]])
    now = view.node(x.address)
    assert now is not None and now.stake == ETH // 2 and not now.active  # the registry's values moved
    assert view.committed_weight(task_a, x.address) == kept  # the draw's did not
    after = select_from_chain(view, task_a, reveals_a)
    assert (after.executor, after.committee) == (before.executor, before.committee)
    assert view.committed_weight(task_a, "0x" + "00" * 20) is None  # no commitment, no weight


def test_control_the_kept_weight_is_the_registrys_at_the_commit(chain: Chain) -> None:
    """The kept weight is what the registry and the reputation held at the commit, not a value of the caller's."""
    task = os.urandom(32)
    escrow(chain, PAYER).fund(task, 3, int(chain.owner.w3.eth.get_block("latest")["timestamp"]) + 3600, ETH)
    node_commit(chain, task, EXECUTOR)
    got = escrow(chain).node(EXECUTOR.address)
    assert got is not None
    assert escrow(chain).committed_weight(task, EXECUTOR.address) == (got.stake, got.reputation_bp)
