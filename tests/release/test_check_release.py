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
from trustcap.release.binding import challenge_nonce
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
SEED_BLOCK = 101  # the task's seed block, so the epoch of its rounds and verdicts
NOW = 1_700_000_100  # the broker's frozen clock
QUOTED = NOW - 20  # when the executor's agent answered the pre round's challenges
SIGNED = NOW - 19  # when the members signed their verdicts
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

    def committed_weight(self, task_id: bytes, node: str) -> tuple[int, int] | None:
        """What the escrow kept at the commit (decision 0115); this fake's stakes never move after it."""
        n = self.nodes.get(node.lower())
        return None if n is None or (task_id, node.lower()) not in self.commitments else (n.stake, n.reputation_bp)

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

    def challenge(self, verifier: Node, *, tid: bytes | None = None, nonce: str | None = None) -> bytes:
        """The nonce `verifier` challenges the executor with in this pre round (trustcap.release.binding)."""
        return challenge_nonce(task_id=_0x(tid or self.tid), round_id=nonce or self.nonce, phase="pre",
                               verifier=verifier.addr)

    def quote(self, verifier: Node, *, gateway: Node | None = None, nonce: bytes | None = None,
              issued_at: int = QUOTED, node_id: str = "hpc-1", **state: Any) -> SignedQuote:
        """The executor's answer to `verifier`'s challenge (its nonce unless `nonce` is given)."""
        gw = gateway or self.executor
        q = new_quote(nonce=self.challenge(verifier) if nonce is None else nonce, issued_at=issued_at,
                      node_id=node_id, gateway=gw.checksum, agent_key=self.agent.public_key(),
                      boot_image_digest=bytes(32), measurements={"m": "1"}, capsule_state=self.state(**state))
        return sign_quote(q, self.agent, gw.key)

    def verdict(self, verifier: Node, quote: SignedQuote | None = None, *, about: Node | None = None,
                phase: Phase = Phase.PRE, passed: bool = True, domain: Domain = DOMAIN, epoch: int = SEED_BLOCK,
                issued_at: int = SIGNED, nonce: str | None = None) -> dict[str, Any]:
        sq = quote or self.quote(verifier)
        v = Verdict(attestation_id=nonce or self.nonce, node=(about or self.executor).checksum,
                    verifier=verifier.checksum, phase=int(phase), passed=passed,
                    quote_digest=_0x(quote_digest(sq.quote)), policy_digest=self.policy, epoch=epoch,
                    issued_at=issued_at)
        return {"verdict": sign_verdict(v, domain, verifier.key).model_dump(mode="json"),
                "quote": base64.b64encode(encode_signed_quote(sq)).decode()}

    def round(self, *, executor: Node | None = None, members: Sequence[Node] | None = None, nonce: str | None = None,
              epoch: int = SEED_BLOCK) -> dict[str, Any]:
        return {"capsuleRef": {"namespace": NS, "name": NAME, "uid": UID}, "taskId": _0x(self.tid), "node": "hpc-1",
                "executor": (executor or self.executor).addr, "phase": "pre", "nonce": nonce or self.nonce,
                "epoch": epoch,
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
        check_release(body, key=B, view=world.chain, now=NOW)
    return info.value


# -- the positive control ----------------------------------------------------------------------------------

def test_valid_request_is_granted_and_the_key_opens_the_envelope(world: World) -> None:
    release = check_release(world.body(), key=B, view=world.chain, now=NOW)
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
    assert check_release(world.body(verdicts=two), key=B, view=world.chain, now=NOW).counted == tuple(
        sorted(m.addr for m in world.committee[:2]))


def test_the_wrapped_key_opens_for_the_executor_key_only(world: World) -> None:
    release = check_release(world.body(), key=B, view=world.chain, now=NOW)
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
    verdicts = [world.verdict(m, world.quote(m, gateway=impostor), about=impostor) for m in rest]
    body = world.body(round=world.round(executor=impostor), verdicts=verdicts)
    err = _denied(world, body)
    assert (err.field, err.status) == ("round.executor", 403)
    assert world.executor.addr in err.reason


def test_verdicts_about_another_node_are_refused(world: World) -> None:
    other = world.spare
    verdicts = [world.verdict(m, world.quote(m, gateway=other), about=other) for m in world.committee]
    err = _denied(world, world.body(verdicts=verdicts))
    assert err.field == "verdicts" and "not the executor" in err.reason


def test_quote_countersigned_by_another_gateway_is_refused(world: World) -> None:
    verdicts = [world.verdict(m, world.quote(m, gateway=world.spare)) for m in world.committee]
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
    first, second = world.verdict(m), world.verdict(m, world.quote(m, issued_at=QUOTED + 1))
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
    swapped = world.quote(world.committee[0], imageDigest="sha256:" + "cd" * 32)
    for v in verdicts:
        v["quote"] = base64.b64encode(encode_signed_quote(swapped)).decode()
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
    verdicts = [world.verdict(m, world.quote(m, **state)) for m in world.committee]
    err = _denied(world, world.body(verdicts=verdicts))
    assert err.field == "verdicts" and f"quote.capsule_state.{field}" in err.reason


def test_quotes_naming_two_executor_keys_are_refused(world: World) -> None:
    other = _0x(_key("a key the attacker holds").public_key())
    verdicts = [world.verdict(world.committee[0]), world.verdict(world.committee[1]),
                world.verdict(world.committee[2], world.quote(world.committee[2], executorKey=other))]
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
        check_release(world.body(), key=B, view=chain, now=NOW)
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


# -- what binds the evidence to this release: epoch, challenge nonce, time (decision 0095) ----------------
# Each attack below is consistent in every field the broker checked before 0095 (signatures, digests,
# capsule_state), and was granted then; each names the defence that now refuses it.

OTHER_TID = task_id(capsule_id(NS, NAME), "another-uid")  # the same capsule, submitted again: another task
OTHER_SEED_BLOCK = 202
OTHER_ROUND = _0x(hashlib.sha256(b"the other task's pre round").digest())
OLD_ROUND = _0x(hashlib.sha256(b"an earlier pre round of this task").digest())


def _granted(world: World, body: dict[str, Any]) -> None:
    release = check_release(body, key=B, view=world.chain, now=NOW)
    assert release.executor_key == world.executor_key.public_key()


def _another_tasks_verdict(world: World, m: Node) -> dict[str, Any]:
    """What m signed, in good faith, in the other task's pre round (same executor, same agent)."""
    q = world.quote(m, nonce=world.challenge(m, tid=OTHER_TID, nonce=OTHER_ROUND), taskId=_0x(OTHER_TID),
                    round=OTHER_ROUND)
    return world.verdict(m, q, nonce=OTHER_ROUND, epoch=OTHER_SEED_BLOCK)


def test_verdicts_replayed_from_another_task_are_refused_at_the_verdict(world: World) -> None:
    """The executor replays the other task's pre round, the round's spec edited to name this task: the
    verdicts' epoch is the other task's seed block, not this one's."""
    _granted(world, world.body())  # positive control
    verdicts = [_another_tasks_verdict(world, m) for m in world.committee]
    err = _denied(world, world.body(round=world.round(nonce=OTHER_ROUND), verdicts=verdicts))
    assert err.field == "verdicts"
    assert f"is of epoch {OTHER_SEED_BLOCK}, not this task's epoch {SEED_BLOCK}" in err.reason
    # and the round's epoch edited too does not pass for this task's
    err = _denied(world, world.body(round=world.round(nonce=OTHER_ROUND, epoch=OTHER_SEED_BLOCK), verdicts=verdicts))
    assert err.field == "round.epoch" and f"seed block {SEED_BLOCK}" in err.reason


def test_a_round_whose_epoch_is_not_the_tasks_seed_block_is_refused(world: World) -> None:
    _granted(world, world.body())  # positive control
    verdicts = [world.verdict(m, epoch=SEED_BLOCK + 1) for m in world.committee]
    err = _denied(world, world.body(round=world.round(epoch=SEED_BLOCK + 1), verdicts=verdicts))
    assert err.field == "round.epoch"
    err = _denied(world, world.body(verdicts=verdicts))  # the round right, the verdicts of another epoch
    assert err.field == "verdicts" and f"is of epoch {SEED_BLOCK + 1}" in err.reason


def _old_round(world: World, *, age: int) -> dict[str, Any]:
    """A consistent replay of an earlier pre round of this very task, `age` seconds old."""
    verdicts = []
    for m in world.committee:
        q = world.quote(m, nonce=world.challenge(m, nonce=OLD_ROUND), round=OLD_ROUND, issued_at=NOW - age)
        verdicts.append(world.verdict(m, q, nonce=OLD_ROUND, issued_at=NOW - age + 1))
    return world.body(round=world.round(nonce=OLD_ROUND), verdicts=verdicts)


def test_a_replayed_earlier_round_of_the_same_task_is_refused_once_it_is_old(world: World) -> None:
    """Another pre round of the same task is genuine evidence while it is recent (control); replayed later,
    the attestation no longer says what the executor runs now."""
    _granted(world, _old_round(world, age=60))  # positive control: a recent round of this task
    err = _denied(world, _old_round(world, age=400))
    assert err.field == "verdicts" and "the verdict is 399 s old" in err.reason and "last 300 s only" in err.reason


def test_verdicts_of_another_round_of_the_same_task_do_not_count_for_this_round(world: World) -> None:
    verdicts = [world.verdict(m, world.quote(m, nonce=world.challenge(m, nonce=OLD_ROUND), round=OLD_ROUND),
                              nonce=OLD_ROUND) for m in world.committee]
    err = _denied(world, world.body(verdicts=verdicts))
    assert err.field == "verdicts" and "attestationId != round.nonce" in err.reason


def _random_nonce(world: World, m: Node) -> bytes:
    return hashlib.sha256(b"a nonce nobody can tie to this round" + m.key.address.encode()).digest()


def _another_members_nonce(world: World, m: Node) -> bytes:
    i = world.committee.index(m)
    return world.challenge(world.committee[(i + 1) % len(world.committee)])


def _another_rounds_nonce(world: World, m: Node) -> bytes:
    return world.challenge(m, nonce=OLD_ROUND)


def _another_tasks_nonce(world: World, m: Node) -> bytes:
    return world.challenge(m, tid=OTHER_TID)


def _during_phase_nonce(world: World, m: Node) -> bytes:
    return challenge_nonce(task_id=_0x(world.tid), round_id=world.nonce, phase="during", verifier=m.addr)


@pytest.mark.parametrize("nonce_of", [
    pytest.param(_random_nonce, id="random-nonce"),
    pytest.param(_another_members_nonce, id="another-members-challenge"),
    pytest.param(_another_rounds_nonce, id="another-rounds-challenge"),
    pytest.param(_another_tasks_nonce, id="another-tasks-challenge"),
    pytest.param(_during_phase_nonce, id="during-phase-challenge"),
])
def test_a_quote_whose_nonce_is_not_the_members_challenge_of_this_round_does_not_count(world: World,
                                                                                        nonce_of: Any) -> None:
    """Quotes whose capsule_state binds this round, task and executor key, each answering a nonce that is
    not its own verifier's challenge of this round: a member that appraised a quote it did not ask for."""
    _granted(world, world.body())  # positive control
    verdicts = [world.verdict(m, world.quote(m, nonce=nonce_of(world, m))) for m in world.committee]
    err = _denied(world, world.body(verdicts=verdicts))
    assert err.field == "verdicts" and "nonce.mismatch" in err.reason and "challenge of this round" in err.reason
    assert "0 valid passed pre verdicts" in err.reason


@pytest.mark.parametrize(("quoted", "signed", "why"), [
    pytest.param(NOW - 400, SIGNED, "quote.expired: quote is 400 s old (limit 300 s)", id="old-quote"),
    pytest.param(NOW + 60, NOW + 3, "quote.future: quote is dated 60 s in the future", id="quote-from-the-future"),
    pytest.param(NOW, SIGNED, "after the verdict that appraised it", id="quote-after-its-verdict"),
    pytest.param(QUOTED, NOW - 400, "the verdict is 400 s old", id="old-verdict"),
    pytest.param(QUOTED, NOW + 60, "the verdict is dated 60 s ahead of the broker's clock",
                 id="verdict-from-the-future"),
])
def test_stale_or_future_evidence_does_not_count(world: World, quoted: int, signed: int, why: str) -> None:
    _granted(world, world.body())  # positive control
    verdicts = [world.verdict(m, world.quote(m, issued_at=quoted), issued_at=signed) for m in world.committee]
    err = _denied(world, world.body(verdicts=verdicts))
    assert err.field == "verdicts" and why in err.reason


def test_evidence_inside_the_window_and_the_skew_counts(world: World) -> None:
    """The edges: a quote exactly 300 s old, a verdict 5 s ahead of the broker's clock."""
    verdicts = [world.verdict(m, world.quote(m, issued_at=NOW - 300), issued_at=NOW + 5) for m in world.committee]
    _granted(world, world.body(verdicts=verdicts))


def test_a_quote_about_another_node_than_the_rounds_does_not_count(world: World) -> None:
    verdicts = [world.verdict(m, world.quote(m, node_id="hpc-2")) for m in world.committee]
    err = _denied(world, world.body(verdicts=verdicts))
    assert err.field == "verdicts" and "quote.identity.node" in err.reason


@pytest.mark.parametrize(("field", "value"), [
    pytest.param("policyDigest", None, id="no-policy"),
    pytest.param("epoch", "101", id="epoch-not-an-integer"),
    pytest.param("node", "", id="no-node"),
])
def test_a_round_without_its_binding_fields_is_malformed(world: World, field: str, value: Any) -> None:
    rnd = world.round()
    if value is None:
        del rnd[field]
    else:
        rnd[field] = value
    err = _denied(world, world.body(round=rnd))
    assert (err.field, err.status) == (f"round.{field}", 400)
