"""The broker's check (trustcap.release.check_release) on a release request made of real pieces.

Only the chain is faked (FakeChain, a ChainView held in memory); everything else is real: VRF keys,
commitments and reveals (trustcap.sortition.participate), the selection recomputed from them, quotes
signed by an agent key and countersigned by the executor's gateway with a capsule_state, EIP-712
verdicts signed by the committee, and an envelope sealed by the owner. The valid request is granted and
its wrapped key opens the envelope (the positive control); each attack changes one thing and is refused
naming the field.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest

from trustcap.capsule.envelope import read_header, seal_bytes
from trustcap.capsule.ids import capsule_id, task_id
from trustcap.capsule.keys import KeyPair
from trustcap.capsule.manifest import parse_manifest
from trustcap.chain.escrow import NodeInfo, TaskInfo
from trustcap.evidence.quote import SignedQuote, encode_signed_quote, new_quote, quote_digest, sign_quote
from trustcap.evidence.verdict import Domain, Phase, Verdict, sign_verdict
from trustcap.release import ReleaseDenied, check_release, open_with_key, quorum_of, unwrap_key
from trustcap.sortition import participate, select_from_chain, selection_alpha
from trustcap.vrf import public_key as vrf_public_key


def _key(label: str) -> KeyPair:
    return KeyPair(hashlib.sha256(label.encode()).digest())


def _0x(b: bytes) -> str:
    return "0x" + b.hex()


NS, NAME, UID = "team-a", "psi", "6f1c0e2a-uid"
B, C = _key("owner B"), _key("owner C")
IMAGE = "sha256:" + "ab" * 32
SPEC: dict[str, Any] = {
    "function": {"image": "trustcap/psi", "digest": IMAGE, "entrypoint": ["python3", "/capsule/psi.py"]},
    "inputs": [{"name": "names-b", "cid": "bafkreicgnswajfvowfhadauc2mw5qilofj5cdgz65hrua6kosr2pa63eli",
                "owner": _0x(B.public_key()), "broker": "http://127.0.0.1:8481"},
               {"name": "names-c", "cid": "bafkreifefylghqaf4iz5cxeyt5qmrjnd7bv22snmzrbokiam33ofuuz4vi",
                "owner": _0x(C.public_key()), "broker": "http://127.0.0.1:8482"}],
    "recipients": [{"name": "node-b", "publicKey": _0x(B.public_key())},
                   {"name": "node-c", "publicKey": _0x(C.public_key())}],
    "resources": {"cpuMillis": 500, "memoryMiB": 128, "pids": 32, "scratchMiB": 16},
    "timeoutSeconds": 60, "committee": {"size": 3},
    "payment": {"payer": "0x4C9183C39E36BD8bfb8e86f073b3F5693E57d128", "amountWei": "1"},
}
DOMAIN = Domain(chain_id=31337, verifying_contract="0x5FbDB2315678afecb367f032d93F642f64180aa3")
SEED_BLOCK = 101
PLAINTEXT = b"alice\nbob\ndave\n"


@dataclass(frozen=True)
class Node:
    """A gateway: its trust-root key (its address is its node id) and its VRF secret."""

    key: KeyPair
    vrf_secret: bytes

    @property
    def addr(self) -> str:
        return self.key.address.lower()

    @property
    def checksum(self) -> str:
        return self.key.address


class FakeChain:
    """The chain as the escrow and the registry would answer, in memory (trustcap.chain.escrow.ChainView)."""

    def __init__(self, tasks: dict[bytes, TaskInfo], blocks: dict[int, bytes],
                 commitments: dict[tuple[bytes, str], bytes], nodes: dict[str, NodeInfo], domain: Domain) -> None:
        self.tasks, self.blocks, self.commitments, self.nodes, self._domain = tasks, blocks, commitments, nodes, domain

    def task(self, task_id: bytes) -> TaskInfo | None:
        return self.tasks.get(task_id)

    def block_hash(self, number: int) -> bytes | None:
        return self.blocks.get(number)

    def commitment(self, task_id: bytes, node: str) -> bytes | None:
        return self.commitments.get((task_id, node.lower()))

    def committers(self, task_id: bytes) -> list[str]:
        return [n for (t, n) in self.commitments if t == task_id]

    def node(self, address: str) -> NodeInfo | None:
        return self.nodes.get(address.lower())

    def domain(self) -> Domain:
        return self._domain


class World:
    """Five gateways committed to one funded task (k = 3): the selection, the owner's envelope, the agent's
    keys, and builders for quotes, verdicts and the request, each with the one knob an attack turns."""

    def __init__(self) -> None:
        self.cid = capsule_id(NS, NAME)
        self.tid = task_id(self.cid, UID)
        self.gateways = [Node(_key(f"gateway {i}"), hashlib.sha256(f"vrf {i}".encode()).digest()) for i in range(5)]
        seed = hashlib.sha256(b"block 101").digest()
        alpha = selection_alpha(self.tid.hex(), seed)
        commitments, self.reveals = {}, []
        for g in self.gateways:
            c, r = participate(g.addr, g.vrf_secret, alpha)
            commitments[(self.tid, g.addr)] = c
            self.reveals.append(r)
        task = TaskInfo(payer=SPEC["payment"]["payer"].lower(), payment=1, k=3, deadline=10**10, state="Funded",
                        funded_block=SEED_BLOCK - 1, executor="0x" + "00" * 20, attestation_id=bytes(32), verifiers=())
        nodes = {g.addr: NodeInfo(g.addr, vrf_public_key(g.vrf_secret), 10**18, 5000, True) for g in self.gateways}
        self.chain = FakeChain({self.tid: task}, {SEED_BLOCK: seed}, commitments, nodes, DOMAIN)
        self.sel = select_from_chain(self.chain, self.tid, self.reveals)
        by_addr = {g.addr: g for g in self.gateways}
        self.executor = by_addr[self.sel.executor]
        self.committee = [by_addr[a] for a in self.sel.committee]
        self.spare = next(g for g in self.gateways if g.addr not in {self.sel.executor, *self.sel.committee})
        self.agent, self.executor_key = _key("agent key"), _key("executor key of this task")
        self.manifest = parse_manifest(SPEC)
        self.binding = self.manifest.binding_digest()
        self.nonce = _0x(hashlib.sha256(b"pre round").digest())
        self.policy = _0x(hashlib.sha256(b"policy").digest())
        self.envelope = self.seal()

    def seal(self, *, capsule: bytes | None = None, binding: bytes | None = None, owner: KeyPair = B) -> bytes:
        return seal_bytes(PLAINTEXT, recipients=[owner.public_key()], owner=owner,
                          capsule_id=self.cid if capsule is None else capsule,
                          manifest_digest=self.binding if binding is None else binding)

    def state(self, **over: Any) -> dict[str, Any]:
        return {"taskId": _0x(self.tid), "manifestDigest": _0x(self.binding), "imageDigest": IMAGE,
                "round": self.nonce, "phase": "pre", "executorKey": _0x(self.executor_key.public_key()), **over}

    def quote(self, *, gateway: Node | None = None, **state: Any) -> SignedQuote:
        gw = gateway or self.executor
        q = new_quote(nonce=hashlib.sha256(repr(state).encode() + gw.addr.encode()).digest(), issued_at=1_700_000_000,
                      node_id="hpc-1", gateway=gw.checksum, agent_key=self.agent.public_key(),
                      boot_image_digest=bytes(32), measurements={"m": "1"}, capsule_state=self.state(**state))
        return sign_quote(q, self.agent, gw.key)

    def verdict(self, verifier: Node, quote: SignedQuote | None = None, *, about: Node | None = None,
                phase: Phase = Phase.PRE, passed: bool = True, domain: Domain = DOMAIN) -> dict[str, Any]:
        sq = quote or self.quote()
        v = Verdict(attestation_id=self.nonce, node=(about or self.executor).checksum, verifier=verifier.checksum,
                    phase=int(phase), passed=passed, quote_digest=_0x(quote_digest(sq.quote)),
                    policy_digest=self.policy, epoch=1, issued_at=1_700_000_001)
        return {"verdict": sign_verdict(v, domain, verifier.key).model_dump(mode="json"),
                "quote": base64.b64encode(encode_signed_quote(sq)).decode()}

    def round(self, *, executor: Node | None = None, members: Sequence[Node] | None = None) -> dict[str, Any]:
        return {"capsuleRef": {"namespace": NS, "name": NAME, "uid": UID}, "taskId": _0x(self.tid), "node": "hpc-1",
                "executor": (executor or self.executor).addr, "phase": "pre", "nonce": self.nonce, "epoch": 1,
                "policyDigest": self.policy,
                "committee": {"members": [{"address": m.addr, "vrfProof": "0x00"} for m in (members or self.committee)],
                              "quorum": quorum_of(3)}}

    def body(self, *, envelope: bytes | None = None, verdicts: list[dict[str, Any]] | None = None,
             **over: Any) -> dict[str, Any]:
        head = read_header(io.BytesIO(envelope or self.envelope))[1]
        return {"capsule": {"namespace": NS, "name": NAME, "uid": UID}, "manifest": copy.deepcopy(SPEC),
                "input": "names-b", "header": base64.b64encode(head).decode(), "round": self.round(),
                "verdicts": [self.verdict(m) for m in self.committee] if verdicts is None else verdicts,
                "reveals": [{"node": r.node_id, "pi": r.pi.hex(), "salt": r.salt.hex()} for r in self.reveals],
                **over}


@pytest.fixture(scope="module")
def world() -> World:
    return World()


def _denied(world: World, body: dict[str, Any]) -> ReleaseDenied:
    with pytest.raises(ReleaseDenied) as info:
        check_release(body, key=B, view=world.chain)
    return info.value


# -- the positive control ----------------------------------------------------------------------------------

def test_valid_request_is_granted_and_the_key_opens_the_envelope(world: World) -> None:
    release = check_release(world.body(), key=B, view=world.chain)
    assert release.executor == world.executor.addr
    assert release.executor_key == world.executor_key.public_key()
    assert release.counted == tuple(sorted(m.addr for m in world.committee))
    assert release.answer()["executorKey"] == _0x(world.executor_key.public_key())
    cek = unwrap_key(release.wrapped_key, world.executor_key, capsule_id=world.cid, task_id=world.tid,
                     input_name="names-b")
    assert open_with_key(world.envelope, cek, owner=B.public_key(), capsule_id=world.cid,
                         manifest_digest=world.binding) == PLAINTEXT


def test_a_quorum_is_enough(world: World) -> None:
    two = [world.verdict(m) for m in world.committee[:quorum_of(3)]]
    assert check_release(world.body(verdicts=two), key=B, view=world.chain).counted == tuple(
        sorted(m.addr for m in world.committee[:2]))


def test_the_wrapped_key_opens_for_the_executor_key_only(world: World) -> None:
    release = check_release(world.body(), key=B, view=world.chain)
    from trustcap.release import WrappedKeyError

    with pytest.raises(WrappedKeyError):
        unwrap_key(release.wrapped_key, world.agent, capsule_id=world.cid, task_id=world.tid, input_name="names-b")
    with pytest.raises(WrappedKeyError):
        unwrap_key(release.wrapped_key, world.executor_key, capsule_id=world.cid, task_id=world.tid,
                   input_name="names-c")


# -- attacks, each one change from the granted request -----------------------------------------------------

def test_wrong_executor_is_refused(world: World) -> None:
    """A request made consistently for a node the chain did not select: round, verdicts and quotes all
    name it, signed by its own gateway key."""
    impostor = world.committee[0]
    rest = [m for m in world.gateways if m is not impostor and m is not world.executor][:3]
    verdicts = [world.verdict(m, world.quote(gateway=impostor), about=impostor) for m in rest]
    body = world.body(round=world.round(executor=impostor), verdicts=verdicts)
    err = _denied(world, body)
    assert (err.field, err.status) == ("round.executor", 403)
    assert world.executor.addr in err.reason


def test_verdicts_about_another_node_are_refused(world: World) -> None:
    other = world.spare
    verdicts = [world.verdict(m, world.quote(gateway=other), about=other) for m in world.committee]
    err = _denied(world, world.body(verdicts=verdicts))
    assert err.field == "verdicts" and "not the executor" in err.reason


def test_quote_countersigned_by_another_gateway_is_refused(world: World) -> None:
    verdicts = [world.verdict(m, world.quote(gateway=world.spare)) for m in world.committee]
    err = _denied(world, world.body(verdicts=verdicts))
    assert err.field == "verdicts" and "not countersigned by the executor" in err.reason


def test_committee_that_is_not_the_recomputed_one_is_refused(world: World) -> None:
    members = [*world.committee[:2], world.spare]
    verdicts = [world.verdict(m) for m in members]
    err = _denied(world, world.body(round=world.round(members=members), verdicts=verdicts))
    assert err.field == "round.committee.members"


def test_committee_with_a_member_twice_is_refused(world: World) -> None:
    members = [world.committee[0], world.committee[0], world.committee[1]]
    err = _denied(world, world.body(round=world.round(members=members)))
    assert err.field == "round.committee.members"


def test_too_few_verdicts_are_refused(world: World) -> None:
    err = _denied(world, world.body(verdicts=[world.verdict(world.committee[0])]))
    assert (err.field, err.status) == ("verdicts", 403)
    assert "1 valid passed pre verdicts" in err.reason and "quorum is 2 of 3" in err.reason


def test_no_verdicts_are_refused(world: World) -> None:
    err = _denied(world, world.body(verdicts=[]))
    assert err.field == "verdicts" and "no verdicts" in err.reason


def test_one_verifiers_verdict_twice_counts_once(world: World) -> None:
    v = world.verdict(world.committee[0])
    err = _denied(world, world.body(verdicts=[v, copy.deepcopy(v)]))
    assert err.field == "verdicts" and "counted already" in err.reason


def test_one_verifier_with_two_different_verdicts_counts_once(world: World) -> None:
    m = world.committee[0]
    # a second genuine verdict by the same verifier, about a second quote (another challenge nonce)
    first, second = world.verdict(m), world.verdict(m, world.quote(round=world.nonce))
    assert second["verdict"]["signature"] != first["verdict"]["signature"]
    err = _denied(world, world.body(verdicts=[first, second]))
    assert err.field == "verdicts" and "counted already" in err.reason


def test_verdict_by_a_non_member_does_not_count(world: World) -> None:
    err = _denied(world, world.body(verdicts=[world.verdict(world.committee[0]), world.verdict(world.spare)]))
    assert err.field == "verdicts" and f"verifier {world.spare.addr} is not in the committee" in err.reason


def test_verdict_by_the_executor_itself_does_not_count(world: World) -> None:
    err = _denied(world, world.body(verdicts=[world.verdict(world.committee[0]), world.verdict(world.executor)]))
    assert err.field == "verdicts" and "is not in the committee" in err.reason


@pytest.mark.parametrize(("knob", "why"), [
    pytest.param({"passed": False}, "did not pass", id="failed-verdict"),
    pytest.param({"phase": Phase.POST}, "is not PRE", id="post-phase"),
    pytest.param({"domain": Domain(chain_id=1, verifying_contract=DOMAIN.verifying_contract)}, "does not verify",
                 id="other-chain"),
])
def test_verdicts_that_are_not_passed_pre_on_this_chain_do_not_count(world: World, knob: dict[str, Any],
                                                                     why: str) -> None:
    verdicts = [world.verdict(m, **knob) for m in world.committee]
    err = _denied(world, world.body(verdicts=verdicts))
    assert err.field == "verdicts" and why in err.reason


def test_verdict_whose_quote_was_swapped_is_refused(world: World) -> None:
    verdicts = [world.verdict(m) for m in world.committee]
    for v in verdicts:
        v["quote"] = base64.b64encode(encode_signed_quote(world.quote(imageDigest="sha256:" + "cd" * 32))).decode()
    err = _denied(world, world.body(verdicts=verdicts))
    assert err.field == "verdicts" and "does not hash to the verdict's quoteDigest" in err.reason


@pytest.mark.parametrize(("state", "field"), [
    pytest.param({"taskId": _0x(hashlib.sha256(b"another task").digest())}, "taskId", id="another-task"),
    pytest.param({"manifestDigest": _0x(hashlib.sha256(b"another manifest").digest())}, "manifestDigest",
                 id="another-manifest"),
    pytest.param({"imageDigest": "sha256:" + "cd" * 32}, "imageDigest", id="another-image"),
    pytest.param({"round": _0x(hashlib.sha256(b"another round").digest())}, "round", id="another-round"),
    pytest.param({"phase": "during"}, "phase", id="during-phase"),
])
def test_quote_whose_capsule_state_binds_something_else_is_refused(world: World, state: dict[str, Any],
                                                                   field: str) -> None:
    verdicts = [world.verdict(m, world.quote(**state)) for m in world.committee]
    err = _denied(world, world.body(verdicts=verdicts))
    assert err.field == "verdicts" and f"quote.capsule_state.{field}" in err.reason


def test_quotes_naming_two_executor_keys_are_refused(world: World) -> None:
    other = _0x(_key("a key the attacker holds").public_key())
    verdicts = [world.verdict(world.committee[0]), world.verdict(world.committee[1]),
                world.verdict(world.committee[2], world.quote(executorKey=other))]
    err = _denied(world, world.body(verdicts=verdicts))
    assert err.field == "verdicts" and "2 different executor keys" in err.reason


def test_input_owned_by_someone_else_is_refused(world: World) -> None:
    err = _denied(world, world.body(input="names-c"))
    assert err.field == "input" and "owned by" in err.reason


def test_input_not_in_the_manifest_is_refused(world: World) -> None:
    err = _denied(world, world.body(input="names-x"))
    assert err.field == "input"


def test_header_bound_to_another_capsule_is_refused(world: World) -> None:
    other = world.seal(capsule=capsule_id(NS, "psi-elsewhere"))
    err = _denied(world, world.body(envelope=other))
    assert err.field == "header" and "bound to capsule" in err.reason


def test_header_bound_to_another_manifest_is_refused(world: World) -> None:
    other = world.seal(binding=hashlib.sha256(b"another manifest").digest())
    err = _denied(world, world.body(envelope=other))
    assert err.field == "header" and "bound to manifest" in err.reason


def test_header_sealed_by_another_owner_is_refused(world: World) -> None:
    forged = seal_bytes(PLAINTEXT, recipients=[B.public_key()], owner=C, capsule_id=world.cid,
                        manifest_digest=world.binding)
    err = _denied(world, world.body(envelope=forged))
    assert err.field == "header" and "signed by" in err.reason


def test_header_not_sealed_to_the_broker_is_refused(world: World) -> None:
    err = _denied(world, world.body(envelope=world.seal(owner=C)))
    assert err.field == "header" and "not a recipient" in err.reason


def test_manifest_edited_after_sealing_is_refused(world: World) -> None:
    body = world.body()
    body["manifest"]["timeoutSeconds"] = 3600  # the owner sealed to the 60-second manifest
    err = _denied(world, body)
    assert err.field == "header" and "binding digest" in err.reason


def test_capsule_other_uid_is_another_task(world: World) -> None:
    body = world.body()
    body["capsule"]["uid"] = "another-uid"
    err = _denied(world, body)
    assert err.field == "capsule" and "not funded" in err.reason


def test_task_not_funded_any_more_is_refused(world: World) -> None:
    chain = FakeChain({world.tid: replace(world.chain.tasks[world.tid], state="Paid")}, world.chain.blocks,
                      world.chain.commitments, world.chain.nodes, DOMAIN)
    with pytest.raises(ReleaseDenied) as info:
        check_release(world.body(), key=B, view=chain)
    assert info.value.field == "capsule" and "Paid" in info.value.reason


def test_withheld_reveals_cannot_make_another_selection(world: World) -> None:
    """Dropping the true executor's reveal makes a different selection, which the round no longer names."""
    body = world.body()
    body["reveals"] = [r for r in body["reveals"] if r["node"] != world.executor.addr]
    err = _denied(world, body)
    assert err.field in ("round.executor", "reveals")


def test_unknown_field_is_refused(world: World) -> None:
    err = _denied(world, world.body(extra=1))
    assert (err.field, err.status) == ("extra", 400)
