"""The capsule controller's steps (operator/capsule.py) against a fake API server and a fake chain.

The e2e (e2e/lifecycle) runs the same steps on the real stack; here every branch is driven by hand and
fast: the happy path to Completed, resumption by a fresh driver at every step, no executor identity in
the Capsule before completion, only Normal events on the happy path, a verdict that does not count
(forged, non-member, second from one verifier), an escrow that does not match the spec, and a failed
pre-run round that cancels the escrow without releasing anything.
"""

from __future__ import annotations

import copy
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from trustcap.chain.keys import KeySigner
from trustcap.evidence.verdict import Domain, Phase, Verdict, sign_verdict
from trustcap.operator import capsule as cap
from trustcap.operator import rounds
from trustcap.operator.kube import KubeError

ROOT = Path(__file__).resolve().parents[2]
DOMAIN = Domain(chain_id=31337, verifying_contract="0x5FbDB2315678afecb367f032d93F642f64180aa3")


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class FakeCustom:
    """The cluster-scoped objects (Gateways, HPCNodes) by plural; `down` makes every list fail."""

    def __init__(self) -> None:
        self.items: dict[str, list[dict[str, Any]]] = {}
        self.down = False

    def list_cluster_custom_object(self, group: str, version: str, plural: str, **_: Any) -> dict[str, Any]:
        if self.down:
            raise ConnectionError("connection refused")
        return {"items": copy.deepcopy(self.items.get(plural, []))}


class FakeKube:
    """Objects by (plural, namespace, name); merge-patch semantics for status, as the API server."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.reveal_secrets: list[dict[str, str]] = []
        self.custom = FakeCustom()

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        obj = self.objects.get((plural, namespace, name))
        return copy.deepcopy(obj) if obj else None

    def create(self, plural: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        key = (plural, namespace, body["metadata"]["name"])
        if key not in self.objects:
            obj = copy.deepcopy(body)
            obj["metadata"].update(namespace=namespace, generation=1,
                                   creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            self.objects[key] = obj
        return copy.deepcopy(self.objects[key])

    def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        obj = self.objects[(plural, namespace, name)]
        obj["status"] = _merge(obj.get("status") or {}, copy.deepcopy(dict(status)))
        return copy.deepcopy(obj)

    def patch_spec(self, plural: str, namespace: str, name: str, spec: dict[str, Any]) -> None:
        obj = self.objects[(plural, namespace, name)]
        obj["spec"] = _merge(obj["spec"], dict(spec))

    def list(self, plural: str, namespace: str, label_selector: str = "") -> list[dict[str, Any]]:
        key, _, value = label_selector.partition("=")
        return [copy.deepcopy(o) for (p, ns, _), o in self.objects.items() if p == plural and ns == namespace
                and (not key or (o["metadata"].get("labels") or {}).get(key) == value)]

    def secrets(self, namespace: str, label_selector: str) -> list[dict[str, str]]:
        return list(self.reveal_secrets)


@dataclass
class Task:
    payer: str
    payment: int
    k: int
    deadline: int
    state: str
    funded_block: int
    executor: str = ""
    attestation_id: bytes = b"\0" * 32
    verifiers: tuple[str, ...] = ()


@dataclass
class FakeEscrow:
    tasks: dict[bytes, Task] = field(default_factory=dict)
    commits: dict[str, bytes] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    def task(self, task_id: bytes) -> Task | None:
        return self.tasks.get(task_id)

    def block_hash(self, number: int) -> bytes | None:
        return bytes([number % 256]) * 32

    def committers(self, task_id: bytes) -> list[str]:
        return list(self.commits)

    def commitment(self, task_id: bytes, node: str) -> bytes | None:
        return self.commits.get(node)

    def domain(self) -> Domain:
        return DOMAIN

    def _receipt(self, what: str) -> dict[str, Any]:
        self.calls.append(what)
        return {"transactionHash": secrets.token_bytes(32)}

    def cancel(self, task_id: bytes) -> dict[str, Any]:
        self.tasks[task_id].state = "Cancelled"
        return self._receipt("cancel")

    def selection(self, task_id: bytes) -> tuple[int, bytes]:
        return 0, b"\0" * 32  # the commit window closed long ago

    def assign(self, task_id: bytes, attestation_id: bytes, executor: str, verifiers: list[str],
               reveals: Any = None) -> dict[str, Any]:
        t = self.tasks[task_id]
        t.state, t.executor, t.attestation_id, t.verifiers = "Assigned", executor, attestation_id, tuple(verifiers)
        return self._receipt("assign")

    def settle(self, task_id: bytes, signed: list[Any]) -> dict[str, Any]:
        passed = sum(1 for s in signed if s.verdict.passed)
        self.tasks[task_id].state = "Paid" if passed >= rounds.quorum_of(self.tasks[task_id].k) else "Slashed"
        return self._receipt(f"settle {len(signed)}")


@dataclass
class Sel:
    executor: str
    committee: tuple[str, ...]
    skipped: tuple[str, ...] = ()


NODES = [KeySigner(bytes([i + 1]) * 32) for i in range(5)]
ADDR = [n.address.lower() for n in NODES]


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> Any:
    kube, escrow = FakeKube(), FakeEscrow()
    import trustcap.sortition as sortition

    monkeypatch.setattr(sortition, "select_from_chain", lambda view, tid, reveals: Sel(ADDR[0], tuple(ADDR[1:4]),
                                                                                        (ADDR[4],)), raising=False)
    settings = cap.Settings(commit_window_s=0, reveal_wait_s=0, escrow=escrow, kube=kube,  # type: ignore[arg-type]
                            policy_digest="0x" + "d0" * 32)
    events: list[tuple[str, str]] = []
    driver = cap.Driver(settings, kube, emit=lambda c, kind, reason, msg: events.append((kind, reason)))  # type: ignore[arg-type]
    doc = yaml.safe_load((ROOT / "capsules" / "psi" / "capsule.yaml").read_text())
    doc["metadata"] = {"name": "psi", "namespace": "team-a", "uid": "uid-1", "generation": 1}
    kube.objects[("capsules", "team-a", "psi")] = doc
    return kube, escrow, driver, events, settings


def _capsule(kube: FakeKube) -> dict[str, Any]:
    c = kube.get("capsules", "team-a", "psi")
    assert c is not None
    return c


def _step(w: Any, fresh: bool = True) -> dict[str, Any]:
    """One step, by a fresh driver each time (as after an operator restart at that line)."""
    kube, _, driver, _, settings = w
    d = cap.Driver(settings, kube, emit=driver.emit) if fresh else driver
    d.step(_capsule(kube))
    return _capsule(kube)


def _cond(c: dict[str, Any], t: str) -> dict[str, Any]:
    return next((x for x in c["status"].get("conditions") or [] if x["type"] == t), {})


def _verdicts(att: dict[str, Any], votes: dict[int, bool], *, signer_of: dict[int, int] | None = None) -> list[Any]:
    spec = att["spec"]
    out = []
    for i, passed in votes.items():
        v = Verdict(attestation_id=spec["nonce"], node=NODES[0].address, verifier=NODES[i].address,
                    phase=int(Phase[spec["phase"].upper()]), passed=passed, quote_digest="0x" + "ab" * 32,
                    policy_digest=spec["policyDigest"], epoch=int(spec["epoch"]), issued_at=int(time.time()))
        signed = sign_verdict(v, DOMAIN, NODES[(signer_of or {}).get(i, i)])
        out.append({"verifier": ADDR[i], "passed": passed, "verdict": signed.model_dump(mode="json")})
    return out


def _to_scheduled(w: Any) -> dict[str, Any]:
    kube, escrow, *_ = w
    c = _step(w)
    tid = bytes.fromhex(c["status"]["taskId"][2:])
    escrow.tasks[tid] = Task(payer=c["spec"]["payment"]["payer"].lower(), payment=10**15, k=3,
                             deadline=int(time.time()) + 3600, state="Funded", funded_block=7)
    c = _step(w)
    assert c["status"]["vrf"]["seed"] == "0x" + "08" * 32 and _cond(c, "Funded")["status"] == "True"
    escrow.commits = {a: b"\1" * 32 for a in ADDR}
    kube.reveal_secrets = [{"node": a, "pi": "aa" * 80, "salt": "bb" * 32} for a in ADDR[:4]]
    c = _step(w)
    assert c["status"]["phase"] == "Scheduled"
    return c


def test_happy_path_to_completed_by_a_fresh_driver_at_every_step(world: Any) -> None:
    kube, escrow, _, events, _ = world
    snapshots = [_to_scheduled(world)]
    assert ADDR[4] in _cond(snapshots[0], "Scheduled")["message"]  # the node that did not reveal is named
    snapshots.append(c := _step(world))
    assert c["status"]["phase"] == "Attesting"
    tid = c["status"]["taskId"][2:18]
    pre = kube.get("attestations", "trustcap-system", f"r-{tid}-pre")
    assert pre is not None and pre["spec"]["executor"] == ADDR[0]
    assert [m["address"] for m in pre["spec"]["committee"]["members"]] == ADDR[1:4]
    assert pre["spec"]["committee"]["quorum"] == 2
    snapshots.append(_step(world))  # no verdicts yet: waits
    kube.patch_status("attestations", "trustcap-system", f"r-{tid}-pre",
                      {"verdicts": _verdicts(pre, {1: True, 2: True})})
    snapshots.append(c := _step(world))
    assert c["status"]["phase"] == "Running" and _cond(c, "Attested")["status"] == "True"
    run = kube.get("capsuleruns", "trustcap-system", f"run-{tid}")
    assert run is not None and run["spec"]["executor"] == ADDR[0] and run["spec"]["preRound"] == f"r-{tid}-pre"
    kube.patch_status("capsuleruns", "trustcap-system", f"run-{tid}", {
        "phase": "Succeeded", "reason": "Completed", "exitCode": 0, "inputsReleased": ["names-b", "names-c"],
        "results": [{"recipient": "node-b", "cid": "bafkrei" + "a" * 52}], "resultSigner": "0x02" + "cd" * 32,
        "wipe": {"verified": True}})
    snapshots.append(c := _step(world))
    assert c["status"]["phase"] == "Wiping"
    assert _cond(c, "InputsReleased")["status"] == "True" and _cond(c, "Ran")["status"] == "True"
    snapshots.append(c := _step(world))  # opens the post round
    post = kube.get("attestations", "trustcap-system", f"r-{tid}-post")
    assert post is not None and post["spec"]["nonce"] != pre["spec"]["nonce"]
    kube.patch_status("attestations", "trustcap-system", f"r-{tid}-post",
                      {"verdicts": _verdicts(post, {1: True, 2: True, 3: True})})
    snapshots.append(c := _step(world))
    assert _cond(c, "Wiped")["status"] == "True" and _cond(c, "Recorded")["reason"] == "AwaitingRecord"
    for att in kube.list("attestations", "trustcap-system"):  # the chain-writer's part, played here
        kube.patch_status("attestations", "trustcap-system", att["metadata"]["name"],
                          {"chain": {"txHash": "0x" + "77" * 32}})
    c = _step(world)
    assert c["status"]["phase"] == "Completed", c["status"]
    assert c["status"]["outcome"] == "Paid" and escrow.calls == ["assign", "settle 3"]
    assert c["status"]["vrf"]["executor"] == ADDR[0] and len(c["status"]["vrf"]["reveals"]) == 4
    assert {r["phase"] for r in c["status"]["record"]} >= {"pre", "post"}
    for snap in snapshots:  # before completion: no executor anywhere but the (all-committers) commitments
        st = dict(snap["status"])
        st["vrf"] = {k: v for k, v in (st.get("vrf") or {}).items() if k != "commitments"}
        assert ADDR[0] not in str(st).lower()
    assert [k for k, _ in events if k == "Warning"] == []
    assert ("Normal", "Completed") in events


def test_a_forged_a_foreign_and_a_repeated_verdict_count_for_nothing(world: Any) -> None:
    kube, *_ = world
    _to_scheduled(world)
    c = _step(world)
    tid = c["status"]["taskId"][2:18]
    pre = kube.get("attestations", "trustcap-system", f"r-{tid}-pre")
    assert pre is not None
    forged = _verdicts(pre, {1: True}, signer_of={1: 4})   # names member 1, signed by node 4
    foreign = _verdicts(pre, {4: True})                     # node 4 is not in the committee
    repeat = _verdicts(pre, {2: True}) * 2                  # member 2 twice
    kube.patch_status("attestations", "trustcap-system", f"r-{tid}-pre", {"verdicts": forged + foreign + repeat})
    t = rounds.tally(kube.get("attestations", "trustcap-system", f"r-{tid}-pre"), DOMAIN)  # type: ignore[arg-type]
    assert t.passed == [ADDR[2]] and len(t.refused) == 3, t.refused
    c = _step(world)
    assert c["status"]["phase"] == "Attesting"  # one counted pass is not a quorum of 2
    # positive control: a second genuine member makes the quorum
    good = _verdicts(pre, {2: True, 3: True})
    kube.patch_status("attestations", "trustcap-system", f"r-{tid}-pre", {"verdicts": good})
    assert _step(world)["status"]["phase"] == "Running"


def test_a_failed_pre_round_cancels_the_escrow_and_releases_nothing(world: Any) -> None:
    kube, escrow, _, events, _ = world
    _to_scheduled(world)
    c = _step(world)
    tid = c["status"]["taskId"][2:18]
    pre = kube.get("attestations", "trustcap-system", f"r-{tid}-pre")
    assert pre is not None
    kube.patch_status("attestations", "trustcap-system", f"r-{tid}-pre",
                      {"verdicts": _verdicts(pre, {1: False, 2: False})})
    for _ in range(3):
        c = _step(world)
    assert c["status"]["phase"] == "Failed" and _cond(c, "Ready")["reason"] == "QuorumFailed", c["status"]
    assert kube.get("capsuleruns", "trustcap-system", f"run-{tid}") is None
    assert escrow.calls == ["cancel"] and c["status"]["outcome"] == "Cancelled"
    assert ("Warning", "QuorumFailed") in events


def test_an_escrow_that_does_not_match_the_spec_is_not_scheduled(world: Any) -> None:
    _, escrow, _, events, _ = world
    c = _step(world)
    tid = bytes.fromhex(c["status"]["taskId"][2:])
    escrow.tasks[tid] = Task(payer=c["spec"]["payment"]["payer"].lower(), payment=10**15, k=5,
                             deadline=int(time.time()) + 3600, state="Funded", funded_block=7)
    c = _step(world)
    assert not (c["status"].get("vrf") or {}).get("seed")
    funded = _cond(c, "Funded")
    assert (funded["status"], funded["reason"]) == ("False", "EscrowMismatch")
    assert "spec.committee.size" in funded["message"]
    assert ("Warning", "EscrowMismatch") in events
    escrow.tasks[tid].k = 3  # positive control: the matching escrow schedules
    assert _step(world)["status"]["vrf"]["seed"]


# --- rounds under the node's policy (issue 12 item 13, decision 0116) -----------------------------------
DEFAULT_POLICY = "0x" + "d0" * 32
NODE_POLICY = "0x" + "5e" * 32


def _executor_objects(kube: FakeKube, declared: str | None) -> None:
    policy = {"policy": {"digest": "sha256:" + declared[2:]}} if declared else {}
    kube.custom.items = {
        "gateways": [{"metadata": {"name": "gw-0"}, "spec": {"address": NODES[0].address}},
                     {"metadata": {"name": "gw-1"}, "spec": {"address": NODES[1].address}}],
        "hpcnodes": [{"metadata": {"name": "hpc-1"},
                      "spec": {"gateway": "gw-1", "policy": {"digest": "sha256:" + "99" * 32}}},
                     {"metadata": {"name": "hpc-0"}, "spec": {"gateway": "gw-0", **policy}}]}


@pytest.mark.parametrize(("declared", "expected"), [
    pytest.param(NODE_POLICY, NODE_POLICY, id="node-declares-its-policy"),
    pytest.param(None, DEFAULT_POLICY, id="node-declares-none"),
])
def test_each_round_is_opened_under_the_executors_node_policy(world: Any, declared: str | None,
                                                              expected: str) -> None:
    kube, _, _, _, settings = world
    settings.policy_digest = DEFAULT_POLICY
    _executor_objects(kube, declared)
    c = _to_scheduled(world)
    tid = c["status"]["taskId"][2:18]
    pre = kube.get("attestations", "trustcap-system", f"r-{tid}-pre")
    assert pre is not None and pre["spec"]["node"] == "hpc-0"
    assert pre["spec"]["policyDigest"] == expected
    # a later round reads the node again: a policy declared since the pre round is the one it is under
    for n in kube.custom.items["hpcnodes"]:
        if n["metadata"]["name"] == "hpc-0":
            n["spec"]["policy"] = {"digest": "sha256:" + "7c" * 32}
    post = cap.Driver(settings, kube)._open_round_like(c, bytes.fromhex(c["status"]["taskId"][2:]), pre, "post")
    assert post["spec"]["policyDigest"] == "0x" + "7c" * 32


def test_a_node_with_no_policy_and_no_default_fails_the_capsule_naming_both(world: Any) -> None:
    """No round under a made-up policy (it used to be all zeros, which no committee member signs): the
    capsule fails before anything is released, the escrow is refunded, and the message says what to set."""
    kube, escrow, _, events, settings = world
    settings.policy_digest = ""
    _executor_objects(kube, None)
    c = _step(world)
    tid = bytes.fromhex(c["status"]["taskId"][2:])
    escrow.tasks[tid] = Task(payer=c["spec"]["payment"]["payer"].lower(), payment=10**15, k=3,
                             deadline=int(time.time()) + 3600, state="Funded", funded_block=7)
    _step(world)
    escrow.commits = {a: b"\1" * 32 for a in ADDR}
    kube.reveal_secrets = [{"node": a, "pi": "aa" * 80, "salt": "bb" * 32} for a in ADDR[:4]]
    c = _step(world)
    assert c["status"]["phase"] == "Failed" and kube.list("attestations", "trustcap-system") == []
    ready = _cond(c, "Ready")
    assert ready["reason"] == "Failed" and "HPCNode hpc-0 declares no spec.policy.digest" in ready["message"]
    assert "TRUSTCAP_POLICY_DIGEST" in ready["message"] and escrow.calls == ["cancel"]
    assert ("Warning", "Failed") in events


def test_no_round_is_opened_when_the_nodes_policy_cannot_be_read(world: Any) -> None:
    """Not "unknown" under the default policy: the step fails with a KubeError and is retried."""
    kube, *_ = world
    _executor_objects(kube, NODE_POLICY)
    kube.custom.down = True
    with pytest.raises(KubeError, match="cannot list HPCNodes"):
        _to_scheduled(world)
    assert kube.list("attestations", "trustcap-system") == []
    kube.custom.down = False  # control: once the API answers, the round is opened under the node's policy
    c = _step(world)
    pre = kube.get("attestations", "trustcap-system", f"r-{c['status']['taskId'][2:18]}-pre")
    assert pre is not None and pre["spec"]["policyDigest"] == NODE_POLICY


def test_a_verdict_reached_under_another_policy_is_not_counted(world: Any) -> None:
    """The operator's count checks the verdict's policyDigest too: a member's signed verdict under other
    rules says nothing about this round. Control: the same members' verdicts under the round's policy."""
    kube, *_ = world
    _to_scheduled(world)
    c = _step(world)
    name = f"r-{c['status']['taskId'][2:18]}-pre"
    pre = kube.get("attestations", "trustcap-system", name)
    assert pre is not None
    other = copy.deepcopy(pre)
    other["spec"]["policyDigest"] = "0x" + "ee" * 32
    kube.patch_status("attestations", "trustcap-system", name, {"verdicts": _verdicts(other, {1: True, 2: True})})
    t = rounds.tally(kube.get("attestations", "trustcap-system", name), DOMAIN)  # type: ignore[arg-type]
    assert t.passed == [] and len(t.refused) == 2 and all("another policy" in r for r in t.refused), t.refused
    assert _step(world)["status"]["phase"] == "Attesting"
    kube.patch_status("attestations", "trustcap-system", name, {"verdicts": _verdicts(pre, {1: True, 2: True})})
    assert _step(world)["status"]["phase"] == "Running"


@pytest.mark.parametrize(("node", "default", "expected"), [
    pytest.param({"spec": {"policy": {"digest": "sha256:" + "ab" * 32}}}, "0x" + "00" * 32, "0x" + "ab" * 32,
                 id="declared-sha256-form"),
    pytest.param({"spec": {"policy": {}}}, "0x" + "CD" * 32, "0x" + "cd" * 32, id="default-normalised"),
    pytest.param(None, "0x" + "01" * 32, "0x" + "01" * 32, id="no-node"),
])
def test_round_policy_digest(node: Any, default: str, expected: str) -> None:
    assert rounds.round_policy_digest(node, default) == expected


@pytest.mark.parametrize(("node", "default", "match"), [
    pytest.param({"metadata": {"name": "n1"}, "spec": {"policy": {"digest": "md5:00"}}}, "0x" + "00" * 32,
                 "HPCNode n1: spec.policy.digest 'md5:00'", id="declared-malformed"),
    pytest.param(None, "zeros", "TRUSTCAP_POLICY_DIGEST 'zeros'", id="default-malformed"),
])
def test_round_policy_digest_refuses_what_is_not_a_digest(node: Any, default: str, match: str) -> None:
    from trustcap.operator.errors import OperatorError

    with pytest.raises(OperatorError, match=match):
        rounds.round_policy_digest(node, default)
