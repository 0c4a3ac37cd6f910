"""A verifier gateway co-signs a chain-writer batch only when every leaf is a counted verdict of a decided round
whose committee is the one the chain selected.

The cluster is a fake kube holding Attestation objects shaped as the operator opens them
(`rounds.new_round`) with the members' status.verdicts entries as the gateways write them, and the task's
reveal Secrets; the chain is a ChainView in memory holding five committed gateways with real VRF keys,
commitments and reveals, so the selection is really recomputed (select_from_chain). Verdicts are really
signed (EIP-712) and the co-signature is checked by recovering the batch digest. Every attack has its
positive control: the honest batch of the same rounds is signed first. The HTTP route is the real relay on
loopback, asked by the operator's own GatewayCosigner.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from trustcap import merkle
from trustcap.chain.errors import RpcUnavailable
from trustcap.chain.escrow import NodeInfo, TaskInfo
from trustcap.chain.keys import KeySigner
from trustcap.chain.typed import batch_digest
from trustcap.evidence import Domain
from trustcap.evidence.signing import recover_address
from trustcap.evidence.verdict import Phase, Verdict, sign_verdict, verdict_id
from trustcap.gateway.cosign import MAX_LEAVES, CosignService
from trustcap.gateway.participant import LifecycleError
from trustcap.gateway.relay import RelayService
from trustcap.gateway.verifiers import StaticDirectory
from trustcap.operator import rounds
from trustcap.operator.chainwriter import CosignRefused, GatewayCosigner
from trustcap.sortition import Reveal, participate, select_from_chain, selection_alpha
from trustcap.vrf import public_key as vrf_public_key

NS = "trustcap-system"
DOMAIN = Domain(chain_id=31337, verifying_contract="0x5FbDB2315678afecb367f032d93F642f64180aa3")
TASK = bytes.fromhex("7a" * 32)
SEED_BLOCK = 7
EPOCH = SEED_BLOCK


class FakeChain:
    """The escrow and registry as a ChainView, in memory; `down` makes every read fail as an RPC outage."""

    def __init__(self) -> None:
        self.tasks: dict[bytes, TaskInfo] = {}
        self.blocks: dict[int, bytes] = {}
        self.commitments: dict[tuple[bytes, str], bytes] = {}
        self.nodes: dict[str, NodeInfo] = {}
        self.down = False
        self.reads = 0

    def _read(self) -> None:
        self.reads += 1
        if self.down:
            raise RpcUnavailable("cannot reach the chain at http://127.0.0.1:8545: connection refused")

    def task(self, task_id: bytes) -> TaskInfo | None:
        self._read()
        return self.tasks.get(task_id)

    def block_hash(self, number: int) -> bytes | None:
        self._read()
        return self.blocks.get(number)

    def commitment(self, task_id: bytes, node: str) -> bytes | None:
        self._read()
        return self.commitments.get((task_id, node.lower()))

    def committers(self, task_id: bytes) -> list[str]:
        self._read()
        return [n for (t, n) in self.commitments if t == task_id]

    def committed_weight(self, task_id: bytes, node: str) -> tuple[int, int] | None:
        """What the escrow kept at the commit (decision 0115); this fake's stakes never move after it."""
        self._read()
        n = self.nodes.get(node.lower())
        return None if n is None or (task_id, node.lower()) not in self.commitments else (n.stake, n.reputation_bp)

    def node(self, address: str) -> NodeInfo | None:
        self._read()
        return self.nodes.get(address.lower())

    def domain(self) -> Domain:
        return DOMAIN


def _gateway(i: int) -> tuple[KeySigner, bytes]:
    return KeySigner("0x" + hashlib.sha256(f"gateway {i}".encode()).hexdigest()), hashlib.sha256(
        f"vrf {i}".encode()).digest()


def _committed_task(task: bytes, gateways: list[tuple[KeySigner, bytes]]) -> tuple[FakeChain, list[Reveal]]:
    """Five registered gateways committed to one funded task of k = 3, and their reveals."""
    chain = FakeChain()
    seed = hashlib.sha256(b"block %d" % SEED_BLOCK).digest()
    chain.blocks[SEED_BLOCK] = seed
    chain.tasks[task] = TaskInfo(payer="0x" + "11" * 20, payment=1, k=3, deadline=10**10, state="Funded",
                                 funded_block=SEED_BLOCK - 1, executor="0x" + "00" * 20, attestation_id=bytes(32),
                                 verifiers=())
    alpha = selection_alpha(task.hex(), seed)
    reveals = []
    for key, vrf_secret in gateways:
        addr = key.address.lower()
        c, r = participate(addr, vrf_secret, alpha)
        chain.commitments[(task, addr)] = c
        chain.nodes[addr] = NodeInfo(addr, vrf_public_key(vrf_secret), 10**18, 5000, True)
        reveals.append(r)
    return chain, reveals


GATEWAYS = [_gateway(i) for i in range(5)]
_CHAIN, REVEALS = _committed_task(TASK, GATEWAYS)
_SEL = select_from_chain(_CHAIN, TASK, REVEALS)
_BY_ADDR = {k.address.lower(): k for k, _ in GATEWAYS}
EXECUTOR = _BY_ADDR[_SEL.executor]  # the roles are the chain's draw, not chosen by the test
MEMBERS = [_BY_ADDR[a] for a in _SEL.committee]
OUTSIDER = next(k for k, _ in GATEWAYS if k not in (EXECUTOR, *MEMBERS))  # registered, committed, not drawn
SYBILS = [KeySigner("0x" + f"{0x60 + i:02x}" * 32) for i in range(3)]  # the operator's own keys, never committed
ME = MEMBERS[0]  # the co-signing gateway


class FakeKube:
    """The system namespace: Attestations, and the reveal Secrets the gateways wrote."""

    def __init__(self) -> None:
        self.rounds: dict[str, dict[str, Any]] = {}
        self.reveal_data: dict[str, list[dict[str, str]]] = {
            TASK.hex()[:16]: [{"node": r.node_id, "pi": r.pi.hex(), "salt": r.salt.hex()} for r in REVEALS]}
        self.down = False

    def attestations(self, namespace: str) -> list[dict[str, Any]]:
        assert namespace == NS
        if self.down:
            raise LifecycleError("cannot list Attestations in trustcap-system: 503 Service Unavailable")
        return [copy.deepcopy(a) for a in self.rounds.values()]

    def secrets(self, namespace: str, label_selector: str) -> list[dict[str, str]]:
        assert namespace == NS
        if self.down:
            raise LifecycleError("cannot list Secrets in trustcap-system: 503 Service Unavailable")
        label, _, value = label_selector.partition("=")
        assert label == "trustcap.io/reveal"
        return copy.deepcopy(self.reveal_data.get(value, []))


def _verdict(nonce: str, signer: KeySigner, *, passed: bool = True, phase: int = Phase.PRE,
             node: str | None = None) -> Verdict:
    return Verdict(attestation_id=nonce, node=node or EXECUTOR.address, verifier=signer.address, phase=phase,
                   passed=passed, quote_digest="0x" + "9a" * 32, policy_digest="0x" + "00" * 32, epoch=EPOCH,
                   issued_at=1_700_000_000)


def _entry(v: Verdict, signer: KeySigner) -> dict[str, Any]:
    signed = sign_verdict(v, DOMAIN, signer)
    return {"verifier": v.verifier.lower(), "passed": v.passed, "verdictId": "0x" + verdict_id(v, DOMAIN).hex(),
            "signature": signed.signature, "verdict": signed.model_dump(mode="json")}


class Lab:
    def __init__(self) -> None:
        self.kube = FakeKube()
        self.chain = copy.deepcopy(_CHAIN)
        self.service = self.new_service()

    def new_service(self) -> CosignService:
        return CosignService(ME, self.kube, namespace=NS, domain=DOMAIN, view=self.chain, reveals=self.kube)

    def decided(self, name: str, *, result: str = "Passed", signers: list[KeySigner] | None = None,
                members: list[KeySigner] | None = None, executor: KeySigner | None = None) -> list[Verdict]:
        """A decided pre round; its verdicts, each in status.verdicts, signed by its verifier."""
        capsule = {"metadata": {"namespace": "alice", "name": "psi", "uid": "uid-1"}}
        who_executes = executor or EXECUTOR
        att: dict[str, Any] = rounds.new_round(
            name=name, capsule=capsule, task_id=TASK, executor=who_executes.address.lower(),
            node="hpc-1", phase="pre", epoch=EPOCH, committee=[{"address": m.address.lower()} for m in members or
                                                               MEMBERS], quorum=2,
            policy_digest="0x" + "00" * 32, timeout_s=60)
        att["metadata"]["namespace"] = NS
        nonce = att["spec"]["nonce"]
        who = signers or members or MEMBERS
        vs = [_verdict(nonce, s, passed=result == "Passed", node=who_executes.address) for s in who]
        att["status"] = {"result": result, "verdicts": [_entry(v, s) for v, s in zip(vs, who, strict=True)]}
        self.kube.rounds[name] = att
        return vs


def body(leaves: list[Verdict], /, **over: Any) -> bytes:
    """The request the writer sends for these leaves, with `over` replacing its fields."""
    tree = merkle.MerkleTree([merkle.verdict_leaf(verdict_id(v, DOMAIN)) for v in leaves])
    doc: dict[str, Any] = {"epoch": EPOCH, "root": "0x" + tree.root.hex(), "count": len(leaves),
                           "chainId": DOMAIN.chain_id, "contract": DOMAIN.verifying_contract,
                           "leaves": [v.model_dump(mode="json") for v in leaves]}
    doc.update(over)
    return json.dumps(doc).encode()


def signed_by(answer: tuple[int, bytes], leaves: list[Verdict]) -> str:
    status, data = answer
    assert status == 200, data
    doc = json.loads(data)
    tree = merkle.MerkleTree([merkle.verdict_leaf(verdict_id(v, DOMAIN)) for v in leaves])
    digest = batch_digest(EPOCH, tree.root, len(leaves), DOMAIN.chain_id, DOMAIN.verifying_contract)
    signer = recover_address(digest, bytes.fromhex(doc["signature"][2:]))
    assert doc["address"] == signer.lower()
    return signer


def refused(answer: tuple[int, bytes], status: int, *words: str) -> dict[str, Any]:
    got, data = answer
    doc: dict[str, Any] = json.loads(data)
    assert got == status, doc
    assert "signature" not in doc
    for w in words:
        assert w in doc["error"], doc
    return doc


@pytest.fixture
def lab() -> Lab:
    return Lab()


def test_a_batch_of_counted_verdicts_of_decided_rounds_is_signed(lab: Lab) -> None:
    leaves = lab.decided("r-pre") + lab.decided("r-post", result="Failed")
    assert signed_by(lab.service.handle(body(leaves)), leaves) == ME.address
    assert signed_by(lab.service.handle(body(list(reversed(leaves)))), leaves) == ME.address  # order-free root
    assert lab.service.stats["signed"] == 2


def _not_in_round(lab: Lab, leaves: list[Verdict]) -> list[Verdict]:
    """A member's verdict for the round that the round does not hold (say, the opposite of its entry)."""
    return [leaves[0], leaves[1].model_copy(update={"passed": False})]


def _undecided(lab: Lab, leaves: list[Verdict]) -> list[Verdict]:
    del lab.kube.rounds["r"]["status"]["result"]
    return leaves


def _pending(lab: Lab, leaves: list[Verdict]) -> list[Verdict]:
    lab.kube.rounds["r"]["status"]["result"] = "Pending"
    return leaves


def _forged_signature(lab: Lab, leaves: list[Verdict]) -> list[Verdict]:
    """The entry holds the leaf, but its signature is the outsider's, not the named verifier's."""
    entry = lab.kube.rounds["r"]["status"]["verdicts"][1]
    entry["verdict"]["signature"] = sign_verdict(leaves[1], DOMAIN, OUTSIDER).signature
    return leaves


def _non_member(lab: Lab, leaves: list[Verdict]) -> list[Verdict]:
    """An outsider's own, validly signed verdict, written into the round's status."""
    v = _verdict(leaves[0].attestation_id, OUTSIDER)
    lab.kube.rounds["r"]["status"]["verdicts"].append(_entry(v, OUTSIDER))
    return [*leaves, v]


def _other_domain(lab: Lab, leaves: list[Verdict]) -> list[Verdict]:
    other = Domain(chain_id=1, verifying_contract=DOMAIN.verifying_contract)
    lab.kube.rounds["r"]["status"]["verdicts"][1]["verdict"] = sign_verdict(leaves[1], other,
                                                                            MEMBERS[1]).model_dump(mode="json")
    return leaves


def _unknown_round(lab: Lab, leaves: list[Verdict]) -> list[Verdict]:
    return [*leaves, _verdict("0x" + "ee" * 32, MEMBERS[1])]


def _other_node(lab: Lab, leaves: list[Verdict]) -> list[Verdict]:
    v = _verdict(leaves[0].attestation_id, MEMBERS[1], node=OUTSIDER.address)
    lab.kube.rounds["r"]["status"]["verdicts"][1] = _entry(v, MEMBERS[1])
    return [leaves[0], v]


def _twice(lab: Lab, leaves: list[Verdict]) -> list[Verdict]:
    return [*leaves, leaves[0]]


def _other_epoch(lab: Lab, leaves: list[Verdict]) -> list[Verdict]:
    v = leaves[1].model_copy(update={"epoch": EPOCH + 1})
    lab.kube.rounds["r"]["status"]["verdicts"][1] = _entry(v, MEMBERS[1])
    return [leaves[0], v]


@pytest.mark.parametrize("attack, bad, why", [
    pytest.param(_not_in_round, 1, "not among round r's status.verdicts", id="verdict-not-in-the-round"),
    pytest.param(_undecided, 0, "is not decided", id="undecided-round"),
    pytest.param(_pending, 0, "is not decided", id="pending-round"),
    pytest.param(_forged_signature, 1, "signed by", id="forged-signature"),
    pytest.param(_non_member, 3, "not in the committee the chain selected", id="non-member"),
    pytest.param(_other_domain, 1, "not for the expected chain", id="verdict-signed-for-another-chain"),
    pytest.param(_unknown_round, 3, "no Attestation", id="unknown-round"),
    pytest.param(_other_node, 1, "not round r's executor", id="verdict-about-another-node"),
    pytest.param(_twice, 3, "twice", id="duplicate-leaf"),
    pytest.param(_other_epoch, 1, "not the batch's epoch", id="leaf-of-another-epoch"),
])
def test_a_batch_with_one_leaf_that_is_not_a_counted_verdict_is_refused_naming_it(
        lab: Lab, attack: Callable[[Lab, list[Verdict]], list[Verdict]], bad: int, why: str) -> None:
    leaves = lab.decided("r")
    assert signed_by(lab.service.handle(body(leaves)), leaves) == ME.address  # positive control
    leaves = attack(lab, leaves)
    doc = refused(lab.service.handle(body(leaves)), 403, f"leaves[{bad}]", why)
    assert doc["field"] == f"leaves[{bad}]"
    assert len(doc["failures"]) == (3 if attack is _undecided or attack is _pending else 1)


# -- the committee is the chain's, not the operator's spec.committee (decision 0095) ----------------------

def test_the_honest_committee_recomputed_from_the_chain_is_signed(lab: Lab) -> None:
    """Positive control of the sybil attacks below: the round names exactly the chain's draw."""
    assert {m.address.lower() for m in MEMBERS} == set(select_from_chain(lab.chain, TASK, REVEALS).committee)
    leaves = lab.decided("r")
    assert signed_by(lab.service.handle(body(leaves)), leaves) == ME.address


@pytest.mark.parametrize("members", [
    pytest.param(SYBILS, id="all-sybils"),
    pytest.param([MEMBERS[0], SYBILS[0], SYBILS[1]], id="sybils-beside-an-honest-member"),
    pytest.param([MEMBERS[0], MEMBERS[1], OUTSIDER], id="a-committed-node-the-chain-did-not-draw"),
    pytest.param([*MEMBERS, SYBILS[0]], id="one-member-too-many"),
])
def test_a_round_whose_spec_committee_is_not_the_chains_is_refused(lab: Lab, members: list[KeySigner]) -> None:
    """The operator writes its own nodes into spec.committee and has them sign passed verdicts: every
    leaf is a verdict of the round, by a member of its spec.committee, and was signed before decision 0095."""
    honest = lab.decided("honest")
    assert signed_by(lab.service.handle(body(honest)), honest) == ME.address  # positive control
    forged = lab.decided("forged", members=members)
    doc = refused(lab.service.handle(body(forged)), 403, "leaves[0]", "is not the committee the chain selected")
    assert len(doc["failures"]) == len(forged)  # every leaf of the forged round is named


def test_a_round_whose_spec_executor_is_not_the_chains_is_refused(lab: Lab) -> None:
    leaves = lab.decided("r")
    assert signed_by(lab.service.handle(body(leaves)), leaves) == ME.address  # positive control
    forged = lab.decided("forged", executor=OUTSIDER)
    refused(lab.service.handle(body(forged)), 403, "leaves[0]", f"spec.executor {OUTSIDER.address.lower()} is not "
                                                                "the chain's selection")


def test_a_round_of_a_task_without_a_selection_on_chain_is_refused(lab: Lab) -> None:
    leaves = lab.decided("r")
    assert signed_by(lab.service.handle(body(leaves)), leaves) == ME.address  # positive control
    lab.kube.reveal_data.clear()  # nobody revealed: no selection can be recomputed
    fresh = lab.new_service()
    refused(fresh.handle(body(leaves)), 403, "leaves[0]", "the chain gives no selection",
            "committed but did not reveal")


def test_a_round_that_names_no_task_is_refused(lab: Lab) -> None:
    leaves = lab.decided("r")
    del lab.kube.rounds["r"]["spec"]["taskId"]
    refused(lab.service.handle(body(leaves)), 403, "leaves[0]", "names no task")


@pytest.mark.parametrize("outage", ["chain", "reveals"])
def test_an_unreadable_chain_or_reveal_store_signs_nothing_and_says_retry(lab: Lab, outage: str) -> None:
    leaves = lab.decided("r")
    if outage == "chain":
        lab.chain.down = True
    else:
        real = lab.kube.secrets

        def down(namespace: str, label_selector: str) -> list[dict[str, str]]:
            raise LifecycleError("cannot list Secrets in trustcap-system: 503 Service Unavailable")
        lab.kube.secrets = down  # type: ignore[method-assign]
    status, data = lab.service.handle(body(leaves))
    assert status == 503 and "cannot recompute the selection" in json.loads(data)["error"]
    lab.chain.down = False
    if outage == "reveals":
        lab.kube.secrets = real  # type: ignore[method-assign]
    assert signed_by(lab.service.handle(body(leaves)), leaves) == ME.address


def test_a_confirmed_selection_outlives_later_reputation_and_stake_changes(lab: Lab) -> None:
    """A round's committee is the one drawn when the task was scheduled. After the first batch confirmed
    it, the executor's stake falls (a slash elsewhere) so that a draw made today would differ; the batch of
    the task's next round is still signed, and without a read of the chain. A co-signer that first meets the
    task after such a change recomputes today's draw and refuses (decision 0095, known limits)."""
    pre = lab.decided("r-pre")
    assert signed_by(lab.service.handle(body(pre)), pre) == ME.address
    addr = EXECUTOR.address.lower()
    lab.chain.nodes[addr] = replace(lab.chain.nodes[addr], stake=1)
    assert select_from_chain(lab.chain, TASK, REVEALS).executor != addr  # today's draw is another one
    post = lab.decided("r-post")
    reads = lab.chain.reads
    assert signed_by(lab.service.handle(body(post)), post) == ME.address
    assert lab.chain.reads == reads
    refused(lab.new_service().handle(body(post)), 403, "is not the chain's selection")


def test_every_failed_leaf_is_named_not_only_the_first(lab: Lab) -> None:
    leaves = lab.decided("r")
    bad = [leaves[0].model_copy(update={"passed": False}), leaves[1], leaves[2].model_copy(update={"passed": False})]
    doc = refused(lab.service.handle(body(bad)), 403, "leaves[0]", "leaves[2]")
    assert [f.split(" ", 1)[0] for f in doc["failures"]] == ["leaves[0]", "leaves[2]"]


@pytest.mark.parametrize("over, status, why", [
    pytest.param({"root": "0x" + "11" * 32}, 403, "Merkle root", id="root-does-not-match"),
    pytest.param({"count": 2}, 403, "count 2 but 3 leaves", id="count-does-not-match"),
    pytest.param({"chainId": 1}, 403, "signs for chain 31337", id="another-chain"),
    pytest.param({"contract": "0x" + "22" * 20}, 403, "signs for chain 31337", id="another-contract"),
    pytest.param({"leaves": []}, 400, "1 to", id="no-leaves"),
    pytest.param({"epoch": -1}, 400, "epoch", id="negative-epoch"),
    pytest.param({"root": "0xAB"}, 400, "root", id="malformed-root"),
    pytest.param({"extra": 1}, 400, "unknown field", id="unknown-field"),
])
def test_a_batch_whose_frame_does_not_match_its_leaves_is_refused(lab: Lab, over: dict[str, Any], status: int,
                                                                  why: str) -> None:
    leaves = lab.decided("r")
    assert signed_by(lab.service.handle(body(leaves)), leaves) == ME.address  # positive control
    refused(lab.service.handle(body(leaves, **over)), status, why)


def test_a_malformed_leaf_or_body_is_refused(lab: Lab) -> None:
    leaves = lab.decided("r")
    doc = json.loads(body(leaves))
    doc["leaves"][1]["verifier"] = doc["leaves"][1]["verifier"].lower()  # not EIP-55: not a Verdict
    refused(lab.service.handle(json.dumps(doc).encode()), 400, "leaves[1]")
    refused(lab.service.handle(b"not json"), 400, "not JSON")
    doc = json.loads(body(leaves))
    del doc["root"]
    refused(lab.service.handle(json.dumps(doc).encode()), 400, "'root'", "missing")
    big = json.loads(body(leaves))
    big["leaves"] = big["leaves"] * (MAX_LEAVES // 3 + 1)
    refused(lab.service.handle(json.dumps(big).encode()), 400, "1 to 1000")


def test_an_unreadable_cluster_signs_nothing_and_says_retry(lab: Lab) -> None:
    leaves = lab.decided("r")
    lab.kube.down = True
    refused(lab.service.handle(body(leaves)), 503, "rounds unavailable")
    lab.kube.down = False
    assert signed_by(lab.service.handle(body(leaves)), leaves) == ME.address


@pytest.fixture
def relay(lab: Lab) -> Iterator[RelayService]:
    class NoAgent:
        node_id = "hpc-0"

        def relay(self, nonce: bytes) -> Any:
            raise AssertionError("Must not be called!")

        def challenge(self, nonce: bytes, capsule_state: dict[str, Any] | None = None) -> Any:
            raise AssertionError("Must not be called!")

    svc = RelayService(NoAgent(), verifiers=StaticDirectory([]), cosign=lab.service)
    yield svc
    svc.close()


def test_the_operators_cosigner_gets_the_gateways_signature_over_http(lab: Lab, relay: RelayService) -> None:
    leaves = lab.decided("r")
    cosigner = GatewayCosigner(ME.address, relay.url, DOMAIN, timeout=5)
    tree = merkle.MerkleTree([merkle.verdict_leaf(verdict_id(v, DOMAIN)) for v in leaves])
    sig = cosigner(EPOCH, tree.root, len(leaves), leaves)
    digest = batch_digest(EPOCH, tree.root, len(leaves), DOMAIN.chain_id, DOMAIN.verifying_contract)
    assert recover_address(digest, sig) == ME.address
    forged = [leaves[0], leaves[1].model_copy(update={"passed": False})]
    tree = merkle.MerkleTree([merkle.verdict_leaf(verdict_id(v, DOMAIN)) for v in forged])
    with pytest.raises(CosignRefused, match=r"HTTP 403 .*leaves\[1\]"):
        cosigner(EPOCH, tree.root, len(forged), forged)


def test_the_relay_bounds_a_cosign_body_and_serves_cosign_only_when_wired(lab: Lab, relay: RelayService) -> None:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(relay.url + "/v1/cosign", data=b"x" * ((1 << 20) + 1),  # noqa: S310
                                 method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)  # noqa: S310
    assert err.value.code == 413
    err.value.close()
    plain = RelayService(relay.server, verifiers=StaticDirectory([]))
    try:
        req = urllib.request.Request(plain.url + "/v1/cosign", data=body(lab.decided("r")),  # noqa: S310
                                     method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=5)  # noqa: S310
        assert err.value.code == 404
        err.value.close()
    finally:
        plain.close()
