"""The gateway's part in selection (trustcap.gateway.participant) against a fake chain and a fake cluster.

The chain (our ChainView and Escrow wrappers) and the Kubernetes adapter are faked; the trust roots, the
VRF, the commitments, `select_from_chain` and the operator's own reveal reader are the real code. The fake
chain refuses what TaskEscrow refuses: a second commit, a commit to a task that is not Funded.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from trustcap import sortition
from trustcap.capsule.ids import capsule_id, task_id
from trustcap.chain.errors import ContractReverted
from trustcap.chain.escrow import NodeInfo, TaskInfo
from trustcap.evidence.verdict import Domain
from trustcap.gateway.participant import REVEAL_LABEL, Participant, reveal_name
from trustcap.operator.capsule import Driver, Settings
from trustcap.trustroot import SoftwareTrustRoot

NS = "trustcap-system"
FUNDED_BLOCK = 100
SEED = hashlib.sha256(b"block 101").digest()
K = 3


class FakeChain:
    """TaskEscrow and NodeRegistry state as the contracts keep it (reads are ChainView's)."""

    def __init__(self) -> None:
        self.tasks: dict[bytes, TaskInfo] = {}
        self.nodes: dict[str, NodeInfo] = {}
        self.commitments: dict[tuple[bytes, str], bytes] = {}
        self.order: dict[bytes, list[str]] = {}
        self.commits: list[tuple[str, bytes]] = []  # (sender, task) of every accepted commit

    def fund(self, task: bytes, *, state: str = "Funded") -> None:
        self.tasks[task] = TaskInfo(payer="0x" + "aa" * 20, payment=1, k=K, deadline=2**40, state=state,
                                    funded_block=FUNDED_BLOCK, executor="0x" + "00" * 20,
                                    attestation_id=b"\0" * 32, verifiers=())

    def register(self, root: SoftwareTrustRoot) -> None:
        addr = root.address.lower()
        self.nodes[addr] = NodeInfo(address=addr, vrf_public_key=root.vrf_public_key(), stake=10**18,
                                    reputation_bp=5000, active=True)


class FakeEscrow:
    """`trustcap.chain.escrow.Escrow` as one node's signer: commit writes, the rest reads the chain."""

    def __init__(self, chain: FakeChain, sender: str) -> None:
        self.chain, self.sender = chain, sender.lower()

    def commit(self, task: bytes, c: bytes) -> dict[str, Any]:
        info = self.chain.tasks.get(task)
        if info is None or info.state != "Funded":
            raise ContractReverted("execution reverted: NotFunded", "NotFunded")
        if (task, self.sender) in self.chain.commitments:
            raise ContractReverted("execution reverted: AlreadyCommitted", "AlreadyCommitted")
        self.chain.commitments[(task, self.sender)] = c
        self.chain.order.setdefault(task, []).append(self.sender)
        self.chain.commits.append((self.sender, task))
        return {"status": 1}

    def task(self, task: bytes) -> TaskInfo | None:
        return self.chain.tasks.get(task)

    def block_hash(self, number: int) -> bytes | None:
        return SEED if number == FUNDED_BLOCK + 1 else None

    def commitment(self, task: bytes, node: str) -> bytes | None:
        return self.chain.commitments.get((task, node.lower()))

    def committers(self, task: bytes) -> list[str]:
        return list(self.chain.order.get(task, []))

    def committed_weight(self, task: bytes, node: str) -> tuple[int, int] | None:
        """What the escrow kept at the commit (decision 0115); this fake's stakes never move after it."""
        n = self.chain.nodes.get(node.lower())
        return None if n is None or (task, node.lower()) not in self.chain.commitments else (n.stake, n.reputation_bp)

    def node(self, address: str) -> NodeInfo | None:
        return self.chain.nodes.get(address.lower())

    def domain(self) -> Domain:
        return Domain(chain_id=31337, verifying_contract="0x" + "11" * 20)


class FakeKube:
    """Capsules and Secrets in memory, with the adapter's calls (and the operator's `secrets`)."""

    def __init__(self) -> None:
        self.objects: list[dict[str, Any]] = []
        self.secret_store: dict[tuple[str, str], tuple[dict[str, str], dict[str, str]]] = {}
        self.creates = 0

    def capsules(self) -> list[dict[str, Any]]:
        return [dict(c) for c in self.objects]

    def secret(self, namespace: str, name: str) -> dict[str, str] | None:
        got = self.secret_store.get((namespace, name))
        return dict(got[1]) if got else None

    def create_secret(self, namespace: str, name: str, labels: Mapping[str, str], data: Mapping[str, str]) -> bool:
        if (namespace, name) in self.secret_store:
            return False
        self.creates += 1
        self.secret_store[(namespace, name)] = (dict(labels), dict(data))
        return True

    def secrets(self, namespace: str, label_selector: str) -> list[dict[str, str]]:
        key, _, value = label_selector.partition("=")
        return [dict(d) for (ns, _n), (labels, d) in self.secret_store.items()
                if ns == namespace and labels.get(key) == value]


def _capsule(name: str = "psi", *, phase: str = "Pending", seed: bytes | None = SEED,
             uid: str = "uid-1") -> dict[str, Any]:
    tid = task_id(capsule_id("team-a", name), uid)
    status: dict[str, Any] = {"phase": phase, "taskId": "0x" + tid.hex()}
    if seed is not None:
        status["vrf"] = {"seed": "0x" + seed.hex(), "seedBlock": FUNDED_BLOCK + 1}
    return {"metadata": {"namespace": "team-a", "name": name, "uid": uid}, "status": status}


def _tid(capsule: Mapping[str, Any]) -> bytes:
    return bytes.fromhex(capsule["status"]["taskId"][2:])


@pytest.fixture
def roots(tmp_path: Path) -> Iterator[list[SoftwareTrustRoot]]:
    out = []
    for i in range(K + 1):
        (tmp_path / f"tr{i}").mkdir()
        out.append(SoftwareTrustRoot.create(tmp_path / f"tr{i}", os.urandom(32)))
    yield out
    for r in out:
        r.close()


@pytest.fixture
def chain(roots: list[SoftwareTrustRoot]) -> FakeChain:
    c = FakeChain()
    for r in roots:
        c.register(r)
    return c


def _participant(root: SoftwareTrustRoot, chain: FakeChain, kube: FakeKube, **kw: Any) -> Participant:
    return Participant(root, FakeEscrow(chain, root.address), kube, namespace=NS, **kw)


def test_commits_once_and_reveals_what_the_operator_and_the_chain_accept(
        roots: list[SoftwareTrustRoot], chain: FakeChain) -> None:
    kube = FakeKube()
    capsule = _capsule()
    kube.objects.append(capsule)
    tid = _tid(capsule)
    chain.fund(tid)
    gateways = [_participant(r, chain, kube) for r in roots]
    assert [g.step() for g in gateways] == [1] * len(roots)
    assert [g.step() for g in gateways] == [0] * len(roots)  # a second pass commits nothing
    assert len(chain.commits) == len(roots)

    me = roots[0].address.lower()
    labels, data = kube.secret_store[(NS, reveal_name(tid, me))]
    assert labels == {REVEAL_LABEL: tid.hex()[:16]}
    assert reveal_name(tid, me) == f"reveal-{tid.hex()[:16]}-{me[2:]}"
    assert data["node"] == me

    # the operator's own reader parses every reveal, and the chain-only selection accepts all of them
    reveals = Driver(Settings(system_namespace=NS), kube)._reveals(tid)
    assert sorted(r.node_id for r in reveals) == sorted(r.address.lower() for r in roots)
    sel = sortition.select_from_chain(FakeEscrow(chain, me), tid, reveals)
    assert sel.skipped == ()
    assert {sel.executor, *sel.committee} == {r.address.lower() for r in roots}


def test_a_reveal_that_does_not_open_the_commitment_is_skipped(roots: list[SoftwareTrustRoot],
                                                               chain: FakeChain) -> None:
    """Positive control for the test above: select_from_chain does reject a reveal that is not the committed one."""
    kube = FakeKube()
    capsule = _capsule()
    kube.objects.append(capsule)
    tid = _tid(capsule)
    chain.fund(tid)
    for r in roots:
        _participant(r, chain, kube).step()
    me = roots[0].address.lower()
    reveals = Driver(Settings(system_namespace=NS), kube)._reveals(tid)
    tampered = [sortition.Reveal(r.node_id, r.pi, b"\1" * 32) if r.node_id == me else r for r in reveals]
    with pytest.raises(sortition.SortitionError, match="needs k \\+ 1"):
        sortition.select_from_chain(FakeEscrow(chain, me), tid, tampered)


@pytest.mark.parametrize(("capsule", "state"), [
    pytest.param(_capsule(phase="Scheduled"), "Funded", id="not-pending"),
    pytest.param(_capsule(seed=None), "Funded", id="no-seed-yet"),
    pytest.param(_capsule(), None, id="unfunded"),
    pytest.param(_capsule(), "Cancelled", id="cancelled"),
    pytest.param(_capsule(seed=b"\7" * 32), "Funded", id="seed-not-the-chains"),
])
def test_no_commit(roots: list[SoftwareTrustRoot], chain: FakeChain, capsule: dict[str, Any],
                   state: str | None) -> None:
    kube = FakeKube()
    kube.objects.append(capsule)
    if state is not None:
        chain.fund(_tid(capsule), state=state)
    assert _participant(roots[0], chain, kube).step() == 0
    assert chain.commits == []


def test_no_commit_when_not_eligible_or_the_task_id_is_not_the_capsules(roots: list[SoftwareTrustRoot],
                                                                        chain: FakeChain) -> None:
    kube = FakeKube()
    capsule = _capsule()
    kube.objects.append(capsule)
    chain.fund(_tid(capsule))
    assert _participant(roots[0], chain, kube, eligible=lambda: False).step() == 0
    forged = _capsule(uid="uid-other")
    forged["status"]["taskId"] = capsule["status"]["taskId"]  # another object's task
    kube.objects[:] = [forged]
    assert _participant(roots[0], chain, kube).step() == 0
    assert chain.commits == []
    kube.objects[:] = [capsule]  # positive control: the same gateway, the real capsule
    assert _participant(roots[0], chain, kube).step() == 1


def test_a_restarted_gateway_does_not_commit_twice(roots: list[SoftwareTrustRoot], chain: FakeChain) -> None:
    kube = FakeKube()
    capsule = _capsule()
    kube.objects.append(capsule)
    tid = _tid(capsule)
    chain.fund(tid)
    assert _participant(roots[0], chain, kube).step() == 1
    assert _participant(roots[0], chain, kube).step() == 0  # a fresh process: the chain says committed
    assert len(chain.commits) == 1 and kube.creates == 1


def test_restart_between_reveal_and_commit_commits_the_revealed_draw(roots: list[SoftwareTrustRoot],
                                                                     chain: FakeChain) -> None:
    kube = FakeKube()
    capsule = _capsule()
    kube.objects.append(capsule)
    tid = _tid(capsule)
    chain.fund(tid)
    me = roots[0].address.lower()

    class Crash(Exception):
        pass

    escrow = FakeEscrow(chain, me)

    def crash(task: bytes, c: bytes) -> dict[str, Any]:
        raise Crash("the process died before its commit was sent")

    first = Participant(roots[0], escrow, kube, namespace=NS)
    escrow.commit = crash  # type: ignore[method-assign]
    with pytest.raises(Crash):
        first.step()
    assert (NS, reveal_name(tid, me)) in kube.secret_store and chain.commits == []
    assert _participant(roots[0], chain, kube).step() == 1
    # the commitment on chain opens with the Secret written before the crash
    reveals = Driver(Settings(system_namespace=NS), kube)._reveals(tid)
    mine = next(r for r in reveals if r.node_id == me)
    alpha = sortition.selection_alpha(tid.hex(), SEED)
    assert chain.commitments[(tid, me)] == sortition.commitment(alpha, me, mine.pi, mine.salt)


def test_a_refused_commit_of_a_committed_node_is_done(roots: list[SoftwareTrustRoot], chain: FakeChain) -> None:
    """The chain refuses a second commit (a lost receipt, a twin instance): treated as done, not retried."""
    kube = FakeKube()
    capsule = _capsule()
    kube.objects.append(capsule)
    tid = _tid(capsule)
    chain.fund(tid)
    me = roots[0].address.lower()
    escrow = FakeEscrow(chain, me)
    real_commit = escrow.commit
    calls: list[bytes] = []

    def racing(task: bytes, c: bytes) -> dict[str, Any]:
        calls.append(task)
        real_commit(task, c)  # another instance got there first
        return real_commit(task, c)

    escrow.commit = racing  # type: ignore[method-assign]
    escrow.commitment = lambda task, node: None if not calls else chain.commitments.get((task, node))  # type: ignore[method-assign]
    g = Participant(roots[0], escrow, kube, namespace=NS)
    assert g.step() == 0
    assert g.step() == 0 and len(calls) == 1 and len(chain.commits) == 1


def test_a_node_registered_after_the_seed_stops_trying_the_task(roots: list[SoftwareTrustRoot],
                                                                chain: FakeChain) -> None:
    """The chain refuses a commit from a node registered after the funding block (decision 0115): that task
    can never take this node, so it is done, not retried every poll; any other refusal still is."""
    kube = FakeKube()
    capsule = _capsule()
    kube.objects.append(capsule)
    chain.fund(_tid(capsule))
    escrow = FakeEscrow(chain, roots[0].address)
    calls: list[bytes] = []

    def refused(task: bytes, c: bytes) -> dict[str, Any]:
        calls.append(task)
        raise ContractReverted("execution reverted: RegisteredAfterSeed", "RegisteredAfterSeed")

    escrow.commit = refused  # type: ignore[method-assign]
    g = Participant(roots[0], escrow, kube, namespace=NS)
    assert g.step() == 0 and g.step() == 0 and len(calls) == 1

    other_calls: list[bytes] = []

    def other(task: bytes, c: bytes) -> dict[str, Any]:  # control: any other refusal is retried next pass
        other_calls.append(task)
        raise ContractReverted("execution reverted: NotFunded", "NotFunded")

    kube.objects[:] = [_capsule("other", uid="uid-2")]
    chain.fund(_tid(kube.objects[0]))
    escrow.commit = other  # type: ignore[method-assign]
    assert g.step() == 0 and g.step() == 0 and len(other_calls) == 2


def test_loop_starts_and_stops(roots: list[SoftwareTrustRoot], chain: FakeChain) -> None:
    kube = FakeKube()
    capsule = _capsule()
    kube.objects.append(capsule)
    chain.fund(_tid(capsule))
    g = _participant(roots[0], chain, kube, poll_s=0.01)
    g.start()
    try:
        for _ in range(500):
            if chain.commits:
                break
            time.sleep(0.01)
    finally:
        g.stop(timeout_s=5)
    assert len(chain.commits) == 1
    assert not g.running and g._thread is None
