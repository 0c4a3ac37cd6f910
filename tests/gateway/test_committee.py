"""A committee gateway's side of a capsule round, over a real relay on loopback HTTP.

The executor is a real RelayService in front of a fake AttestationServer whose agent answers like
agent/run.py (capsule_state binds the prepared task, its digests, the round, the phase and the executor
key); the cluster is a fake CommitteeKube that merges applied verdict entries as server-side apply does
(a list-map keyed by verifier). What the members write is then counted by the operator's own
`rounds.tally`, so an entry that tally would refuse fails here. Each attack has its positive control: an
honest member of the same round passes first.
"""

from __future__ import annotations

import base64
import copy
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from trustcap.capsule.manifest import parse_manifest
from trustcap.chain.keys import KeySigner
from trustcap.evidence import Domain, Policy, SignedQuote, SignedVerdict, decode_signed_quote, new_quote, sign_quote
from trustcap.evidence.policy import policy_digest
from trustcap.evidence.verdict import verify_verdict
from trustcap.gateway.committee import CommitteeMember, endpoint_from_gateways, field_manager
from trustcap.gateway.errors import GatewayError
from trustcap.gateway.relay import RelayService, RoundDirectory
from trustcap.gateway.verifiers import StaticDirectory
from trustcap.operator import rounds

NS = "trustcap-system"
NODE = "hpc-1"
BOOT = "0x" + "ab" * 32
DOMAIN = Domain(chain_id=31337, verifying_contract="0x5FbDB2315678afecb367f032d93F642f64180aa3")
POLICY = Policy(boot_images=[BOOT])
POLICY_DIGEST = "0x" + policy_digest(POLICY).hex()  # the rules every member of the lab appraises under
OTHER_POLICY = "0x" + policy_digest(Policy(boot_images=[BOOT], allow_unlisted_measurements=True)).hex()
EXECUTOR = KeySigner("0x" + "7e" * 32)  # the executor gateway's trust root
AGENT = KeySigner("0x" + "8f" * 32)  # its HPC's boot-enrolled agent key
MEMBERS = [KeySigner("0x" + f"{40 + i:02x}" * 32) for i in range(3)]
OUTSIDER = KeySigner("0x" + "6d" * 32)  # a Gateway of the cluster, not on this round's committee
TASK = "0x" + "7a" * 32
SPEC = yaml.safe_load((Path(__file__).parents[2] / "capsules/psi/capsule.yaml").read_text())["spec"]
OTHER_SPEC = {**SPEC, "timeoutSeconds": 61}  # another manifest: another binding digest


def _digest(spec: Mapping[str, Any]) -> str:
    return "0x" + parse_manifest(dict(spec)).binding_digest().hex()


class FakeAgentServer:
    """AttestationServer's relay surface; its agent holds prepared tasks as agent/run.py does."""

    node_id = NODE

    def __init__(self) -> None:
        self.root = EXECUTOR
        self.executor_key = "0x02" + "11" * 32
        self.prepared: dict[str, dict[str, str]] = {}  # taskId -> {manifestDigest, imageDigest}
        self.lie: dict[str, Any] = {}  # fields a dishonest agent puts into capsule_state
        self.calls: list[dict[str, Any] | None] = []

    def relay(self, nonce: bytes) -> SignedQuote:
        return self.challenge(nonce)

    def challenge(self, nonce: bytes, capsule_state: dict[str, Any] | None = None) -> SignedQuote:
        self.calls.append(capsule_state)
        state: dict[str, Any] = {"phase": "idle"}
        if capsule_state is not None:
            task = self.prepared[capsule_state["taskId"]]
            state = {"taskId": capsule_state["taskId"], **task, "round": capsule_state["round"],
                     "phase": capsule_state["phase"], "executorKey": self.executor_key}
        state = {k: v for k, v in {**state, **self.lie}.items() if v is not None}
        quote = new_quote(nonce=nonce, issued_at=int(time.time()), node_id=NODE, gateway=self.root.address,
                          agent_key=AGENT.public_key(), boot_image_digest=bytes.fromhex(BOOT[2:]), measurements={},
                          capsule_state=state)
        return sign_quote(quote, AGENT, self.root)


class FakeKube:
    """The objects of one cluster; `apply_verdict` merges by verifier, like server-side apply's list-map."""

    def __init__(self) -> None:
        self.rounds: dict[str, dict[str, Any]] = {}
        self.capsules: dict[tuple[str, str], dict[str, Any]] = {}
        self.gateway_objects: list[dict[str, Any]] = []
        self.nodes: dict[str, dict[str, Any]] = {NODE: {"status": {"agentKey": "0x" + AGENT.public_key().hex()}}}
        self.applied: list[tuple[str, str, str]] = []  # (round, verifier, field manager)

    def attestations(self, namespace: str) -> list[dict[str, Any]]:
        assert namespace == NS
        return [copy.deepcopy(a) for a in self.rounds.values()]

    def capsule(self, namespace: str, name: str) -> dict[str, Any] | None:
        found = self.capsules.get((namespace, name))
        return copy.deepcopy(found) if found is not None else None

    def gateways(self) -> list[dict[str, Any]]:
        return copy.deepcopy(self.gateway_objects)

    def hpcnode(self, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.nodes.get(name))

    def apply_verdict(self, namespace: str, name: str, entry: Mapping[str, Any], manager: str) -> None:
        assert namespace == NS
        status = self.rounds[name].setdefault("status", {})
        verdicts = [v for v in status.get("verdicts", []) if v["verifier"] != entry["verifier"]]
        status["verdicts"] = [*verdicts, copy.deepcopy(dict(entry))]
        self.applied.append((name, str(entry["verifier"]), manager))


def _round(name: str, phase: str, *, spec_overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    capsule = {"metadata": {"namespace": "alice", "name": "psi", "uid": "uid-1"}}
    att: dict[str, Any] = rounds.new_round(name=name, capsule=capsule, task_id=bytes.fromhex(TASK[2:]),
                           executor=EXECUTOR.address.lower(), node=NODE, phase=phase, epoch=7,
                           committee=[{"address": m.address.lower()} for m in MEMBERS], quorum=2,
                           policy_digest=POLICY_DIGEST, timeout_s=60)
    att["metadata"]["namespace"] = NS
    att["spec"].update(spec_overrides or {})
    return att


class Lab:
    def __init__(self) -> None:
        self.kube = FakeKube()
        self.server = FakeAgentServer()
        self.server.prepared[TASK] = {"manifestDigest": _digest(SPEC), "imageDigest": SPEC["function"]["digest"]}
        self.kube.capsules[("alice", "psi")] = {"metadata": {"namespace": "alice", "name": "psi", "uid": "uid-1"},
                                                "spec": copy.deepcopy(SPEC)}
        self.prepare_calls: list[dict[str, str]] = []
        directory = StaticDirectory([m.address for m in [*MEMBERS, OUTSIDER]])
        self.relay = RelayService(self.server, verifiers=directory,
                                  round_members=RoundDirectory(lambda: self.kube.attestations(NS), miss_s=0),
                                  before_capsule_quote=self.prepare_calls.append)
        host, port = self.relay.address
        self.kube.gateway_objects = [{"metadata": {"name": "gw-exec"},
                                      "spec": {"address": EXECUTOR.address, "endpoint": f"{host}:{port}"}}]
        self.endpoint_of = endpoint_from_gateways(self.kube.gateways)

    def member(self, signer: KeySigner) -> CommitteeMember:
        return CommitteeMember(signer, kube=self.kube, namespace=NS, domain=DOMAIN, policy=POLICY,
                               endpoint_of=self.endpoint_of, request_timeout_s=5)

    def open(self, name: str, phase: str = "pre", **spec: Any) -> dict[str, Any]:
        self.kube.rounds[name] = _round(name, phase, spec_overrides=spec)
        return self.kube.rounds[name]

    def entry(self, name: str, signer: KeySigner) -> dict[str, Any]:
        found: list[dict[str, Any]] = [v for v in self.kube.rounds[name]["status"]["verdicts"]
                                       if v["verifier"] == signer.address.lower()]
        assert len(found) == 1
        return found[0]


@pytest.fixture
def lab() -> Iterator[Lab]:
    it = Lab()
    yield it
    it.relay.close()


def test_each_member_writes_a_signed_verdict_that_the_operators_tally_counts(lab: Lab) -> None:
    att = lab.open("r-7a7a7a7a7a7a7a7a-pre")
    for m in MEMBERS:
        assert lab.member(m).step() == 1
    counted = rounds.tally(lab.kube.rounds[att["metadata"]["name"]], DOMAIN)
    assert counted.refused == [], counted.refused
    assert sorted(counted.passed) == sorted(m.address.lower() for m in MEMBERS) and counted.failed == []
    assert counted.result(3, 2, expired=False) == rounds.PASSED
    for m in MEMBERS:
        entry = lab.entry(att["metadata"]["name"], m)
        assert entry["passed"] is True and entry["failures"] == []
        signed = SignedVerdict.model_validate(entry["verdict"])
        assert verify_verdict(signed, domain=DOMAIN) == m.address
        v = signed.verdict
        assert (v.attestation_id, v.node.lower(), v.phase, v.epoch) == (att["spec"]["nonce"],
                                                                        EXECUTOR.address.lower(), 1, 7)
        quote = decode_signed_quote(base64.b64decode(entry["quote"]))
        assert quote.quote.capsule_state["round"] == att["spec"]["nonce"]
        assert entry["nonce"] == quote.quote.nonce and entry["quoteDigest"] == v.quote_digest
    assert {a[2] for a in lab.kube.applied} == {field_manager(m.address) for m in MEMBERS}
    assert all(c == {"taskId": TASK, "round": att["spec"]["nonce"], "phase": "pre"} for c in lab.prepare_calls)
    assert lab.member(MEMBERS[0]).step() == 0  # a round with my verdict is not attested again


def _lie(field: str, value: Any) -> Any:
    def apply(lab: Lab) -> None:
        lab.server.lie[field] = value
    return apply


def _prepared_other_manifest(lab: Lab) -> None:
    lab.server.prepared[TASK] = {**lab.server.prepared[TASK], "manifestDigest": _digest(OTHER_SPEC)}


def _capsule_replaced(lab: Lab) -> None:
    lab.kube.capsules[("alice", "psi")]["metadata"]["uid"] = "uid-2"  # deleted and re-applied: another task


ATTACKS = [
    pytest.param(_lie("taskId", "0x" + "7b" * 32), "capsule_state.taskId.mismatch", id="quote-of-another-task"),
    pytest.param(_prepared_other_manifest, "capsule_state.manifestDigest.mismatch", id="another-manifest"),
    pytest.param(_lie("imageDigest", "sha256:" + "00" * 32), "capsule_state.imageDigest.mismatch",
                 id="another-image"),
    pytest.param(_lie("round", "0x" + "3d" * 32), "capsule_state.round.mismatch", id="another-round"),
    pytest.param(_lie("phase", "post"), "capsule_state.phase.mismatch", id="another-phase"),
    pytest.param(_lie("executorKey", None), "capsule_state.executorKey.missing", id="no-executor-key"),
    pytest.param(_capsule_replaced, "capsule.uid.mismatch", id="capsule-object-replaced"),
    pytest.param(lambda lab: lab.kube.nodes.clear(), "enrolment.agent_key.missing", id="node-not-enrolled"),
]


@pytest.mark.parametrize(("attack", "failure"), ATTACKS)
def test_a_quote_that_does_not_bind_this_round_is_a_signed_failed_verdict(lab: Lab, attack: Any,
                                                                          failure: str) -> None:
    name = "r-7a7a7a7a7a7a7a7a-pre"
    lab.open(name)
    assert lab.member(MEMBERS[0]).step() == 1  # positive control: the honest executor passes
    assert lab.entry(name, MEMBERS[0])["passed"] is True
    attack(lab)
    assert lab.member(MEMBERS[1]).step() == 1
    entry = lab.entry(name, MEMBERS[1])
    assert entry["passed"] is False
    assert any(f.startswith(failure + ":") for f in entry["failures"]), entry["failures"]
    counted = rounds.tally(lab.kube.rounds[name], DOMAIN)
    assert counted.refused == [] and counted.failed == [MEMBERS[1].address.lower()]
    assert counted.passed == [MEMBERS[0].address.lower()]


def _round_under(policy: str) -> Any:
    def apply(lab: Lab, name: str) -> None:
        lab.kube.rounds[name]["spec"]["policyDigest"] = policy
    return apply


def _node_declares(policy: str) -> Any:
    def apply(lab: Lab, name: str) -> None:
        lab.kube.nodes[NODE]["spec"] = {"policy": {"digest": "sha256:" + policy[2:]}}
    return apply


@pytest.mark.parametrize("attack", [
    pytest.param(_round_under(OTHER_POLICY), id="round-under-another-policy"),
    pytest.param(_round_under("0x" + "00" * 32), id="round-under-the-zero-default"),
    pytest.param(_node_declares(OTHER_POLICY), id="node-declares-another-policy"),
])
def test_a_round_under_a_policy_the_member_does_not_apply_gets_no_verdict(lab: Lab, attack: Any) -> None:
    """Issue 12 item 13, decision 0116: a verdict names the policy it was reached under (policyDigest), so
    a member must not sign one for a round under rules it does not apply, passed or failed. Positive
    control: the same member signs the round under its own policy, and the verdict carries that digest."""
    name, other = "r-7a7a7a7a7a7a7a7a-pre", "r-7a7a7a7a7a7a7a7a-pre-1"
    lab.open(name)
    member = lab.member(MEMBERS[0])
    assert member.step() == 1  # control: the round under the member's own policy
    entry = lab.entry(name, MEMBERS[0])
    assert entry["passed"] is True
    assert SignedVerdict.model_validate(entry["verdict"]).verdict.policy_digest == POLICY_DIGEST
    assert rounds.tally(lab.kube.rounds[name], DOMAIN).passed == [MEMBERS[0].address.lower()]
    calls = len(lab.server.calls)
    lab.open(other)
    attack(lab, other)
    assert member.step() == 0 and member.step() == 0
    assert "status" not in lab.kube.rounds[other], "a verdict was signed for a round under another policy"
    assert len(lab.server.calls) == calls  # it did not even challenge the executor
    assert [a[0] for a in lab.kube.applied] == [name]


def test_a_round_it_is_not_a_member_of_gets_nothing(lab: Lab) -> None:
    name = "r-7a7a7a7a7a7a7a7a-pre"
    lab.open(name)
    assert lab.member(OUTSIDER).step() == 0
    assert "status" not in lab.kube.rounds[name] and lab.server.calls == []
    assert sum(lab.relay.stats.values()) == 0  # it did not even ask (the relay would have refused it too)
    assert lab.member(MEMBERS[0]).step() == 1  # positive control


def test_a_decided_round_or_a_timed_out_one_gets_nothing(lab: Lab) -> None:
    decided = lab.open("r-7a7a7a7a7a7a7a7a-pre")
    decided["status"] = {"result": "Failed"}
    old = lab.open("r-7a7a7a7a7a7a7a7a-pre-1")
    old["metadata"]["creationTimestamp"] = "2020-01-01T00:00:00Z"
    assert lab.member(MEMBERS[0]).step() == 0 and lab.server.calls == []
    decided["status"] = {"result": "Pending"}  # positive control: undecided is attested
    assert lab.member(MEMBERS[0]).step() == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_executor_is_retried_never_judged(lab: Lab) -> None:
    name = "r-7a7a7a7a7a7a7a7a-pre"
    lab.open(name)
    real = lab.kube.gateway_objects[0]["spec"]["endpoint"]
    lab.kube.gateway_objects[0]["spec"]["endpoint"] = f"127.0.0.1:{_closed_port()}"
    member = lab.member(MEMBERS[0])
    assert member.step() == 0 and "status" not in lab.kube.rounds[name]
    lab.kube.gateway_objects[0]["spec"]["endpoint"] = real
    assert member.step() == 1 and lab.entry(name, MEMBERS[0])["passed"] is True


def test_a_relay_that_refuses_is_retried_never_judged(lab: Lab) -> None:
    name = "r-7a7a7a7a7a7a7a7a-pre"
    lab.open(name)
    lab.server.prepared.clear()  # the agent has no such task: the server raises, the relay answers 503

    def unprepared(nonce: bytes, capsule_state: dict[str, Any] | None = None) -> SignedQuote:
        raise GatewayError("agent refused 'quote': no prepared task")

    lab.server.challenge = unprepared  # type: ignore[method-assign]
    assert lab.member(MEMBERS[0]).step() == 0 and "status" not in lab.kube.rounds[name]


@pytest.mark.parametrize(("during_key", "passed"), [
    pytest.param("0x02" + "11" * 32, True, id="same-key-as-pre"),
    pytest.param("0x03" + "22" * 32, False, id="key-changed-after-pre"),
])
def test_a_during_round_needs_the_executor_key_attested_in_the_pre_round(lab: Lab, during_key: str,
                                                                         passed: bool) -> None:
    pre = lab.open("r-7a7a7a7a7a7a7a7a-pre")
    member = lab.member(MEMBERS[0])
    assert member.step() == 1
    pre["status"]["result"] = "Passed"
    lab.open("r-7a7a7a7a7a7a7a7a-during", "during")
    lab.server.executor_key = during_key
    assert member.step() == 1
    entry = lab.entry("r-7a7a7a7a7a7a7a7a-during", MEMBERS[0])
    assert entry["passed"] is passed, entry["failures"]
    if not passed:
        assert any(f.startswith("capsule_state.executorKey.changed:") for f in entry["failures"])
    counted = rounds.tally(lab.kube.rounds["r-7a7a7a7a7a7a7a7a-during"], DOMAIN)
    assert counted.refused == [] and len(counted.passed if passed else counted.failed) == 1


def test_start_and_stop_run_passes_in_a_thread(lab: Lab) -> None:
    lab.open("r-7a7a7a7a7a7a7a7a-pre")
    member = lab.member(MEMBERS[2])
    member.poll_s = 0.05
    member.start()
    try:
        deadline = time.monotonic() + 10
        while member.written == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        member.stop(timeout_s=10)
    assert member.written == 1 and not member.running and member._thread is None
