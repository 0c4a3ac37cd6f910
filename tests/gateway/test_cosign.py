"""A verifier gateway co-signs a chain-writer batch only when every leaf is a counted verdict of a decided round.

The cluster is a fake kube holding Attestation objects shaped as the operator opens them
(`rounds.new_round`) with the members' status.verdicts entries as the gateways write them; verdicts are
really signed (EIP-712) and the co-signature is checked by recovering the batch digest. Every attack has
its positive control: the honest batch of the same rounds is signed first. The HTTP route is the real
relay on loopback, asked by the operator's own GatewayCosigner.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from trustcap.gateway.cosign import MAX_LEAVES, CosignService
from trustcap.gateway.participant import LifecycleError
from trustcap.gateway.relay import RelayService
from trustcap.gateway.verifiers import StaticDirectory
from trustcap.operator import rounds
from trustcap.operator.chainwriter import CosignRefused, GatewayCosigner

from trustcap import merkle
from trustcap.chain.keys import KeySigner
from trustcap.chain.typed import batch_digest
from trustcap.evidence import Domain
from trustcap.evidence.signing import recover_address
from trustcap.evidence.verdict import Phase, Verdict, sign_verdict, verdict_id

NS = "trustcap-system"
DOMAIN = Domain(chain_id=31337, verifying_contract="0x5FbDB2315678afecb367f032d93F642f64180aa3")
EXECUTOR = KeySigner("0x" + "7e" * 32)
MEMBERS = [KeySigner("0x" + f"{40 + i:02x}" * 32) for i in range(3)]
OUTSIDER = KeySigner("0x" + "6d" * 32)  # a registered gateway, not on these rounds' committees
ME = MEMBERS[0]  # the co-signing gateway
EPOCH = 7


class FakeKube:
    def __init__(self) -> None:
        self.rounds: dict[str, dict[str, Any]] = {}
        self.down = False

    def attestations(self, namespace: str) -> list[dict[str, Any]]:
        assert namespace == NS
        if self.down:
            raise LifecycleError("cannot list Attestations in trustcap-system: 503 Service Unavailable")
        return [copy.deepcopy(a) for a in self.rounds.values()]


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
        self.service = CosignService(ME, self.kube, namespace=NS, domain=DOMAIN)

    def decided(self, name: str, *, result: str = "Passed", signers: list[KeySigner] | None = None,
                members: list[KeySigner] | None = None) -> list[Verdict]:
        """A decided pre round; its verdicts, each in status.verdicts, signed by its verifier."""
        capsule = {"metadata": {"namespace": "alice", "name": "psi", "uid": "uid-1"}}
        att: dict[str, Any] = rounds.new_round(
            name=name, capsule=capsule, task_id=bytes.fromhex("7a" * 32), executor=EXECUTOR.address.lower(),
            node="hpc-1", phase="pre", epoch=EPOCH, committee=[{"address": m.address.lower()} for m in members or
                                                               MEMBERS], quorum=2,
            policy_digest="0x" + "00" * 32, timeout_s=60)
        att["metadata"]["namespace"] = NS
        nonce = att["spec"]["nonce"]
        who = signers or MEMBERS
        vs = [_verdict(nonce, s, passed=result == "Passed") for s in who]
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
    pytest.param(_non_member, 3, "not a member of spec.committee", id="non-member"),
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
