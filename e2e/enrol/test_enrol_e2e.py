"""The join, end to end: an HPC's agent enrols through its gateway and the operator calls the node
`Enrolled` only after checking the evidence itself (issue 6 item 5, issue 4).

Real parts only: the stack's kube-apiserver, `python -m trustcap.operator`, `python3 -m trustcap.gateway`
in a gateway namespace (software trust root, --kubeconfig through the cluster link) and
`python3 -m trustcap.agent` in an hpc namespace whose only link is the veth to the gateway (enrolkit).

Proves: the approved boot image enrols (`lastQuote.bootImageDigest` == the BootImage's approved digest);
a gateway that enrols an unapproved image is overruled (Quarantined, the claim named, a Warning event);
a gateway that serves only approved images refuses the agent, and the node never becomes Enrolled;
a countersignature forged into the status by hand is Quarantined naming `quote.signature.gateway`.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from clusterkit import apiserver_port, register_node
from enrolkit import Cluster, ClusterLink, Lab, Proc, make_lab, start_agent, start_gateway, wait_for

from trustcap.agent.identity import BootKey
from trustcap.evidence import encode_signed_quote, new_quote, sign_quote
from trustcap.trustroot import SoftwareTrustRoot, new_kek_file

pytestmark = pytest.mark.slow

APPROVED_HEX = hashlib.sha256(b"trustcap e2e approved boot image").hexdigest()
OTHER_HEX = hashlib.sha256(b"trustcap e2e unapproved boot image").hexdigest()
APPROVED = "sha256:" + APPROVED_HEX


@dataclass
class World:
    node: str
    gateway: str
    root_home: Path
    kek: Path
    gateway_address: str
    gateway_key: str


@pytest.fixture
def lab(stack: dict[str, Any]) -> Iterator[tuple[Lab, ClusterLink]]:
    with make_lab() as lab:
        link = ClusterLink(lab.gw, apiserver_port(stack))
        try:
            yield lab, link
        finally:
            link.close()


def _world(cluster: Cluster, tmp_path: Path) -> World:
    tag = uuid.uuid4().hex[:8]
    home, kek = tmp_path / "tr", tmp_path / "kek"
    home.mkdir()
    SoftwareTrustRoot.create(home, new_kek_file(kek)).close()
    with SoftwareTrustRoot.open(home, bytes.fromhex(kek.read_text().strip())) as root:
        address, key = root.address, "0x" + root.public_key().hex()
    gw, bi, node = f"gw-enrol-{tag}", f"bi-enrol-{tag}", f"hpc-enrol-{tag}"
    art = {p: {"path": f"{bi}/{p}", "digest": "sha256:" + hashlib.sha256(p.encode()).hexdigest()}
           for p in ("kernel", "initrd", "ipxeScript")}
    mac = "02:" + ":".join(tag[i:i + 2] for i in range(0, 8, 2)) + ":01"
    register_node(cluster, node=node, gateway=gw, boot_image=bi, address=address, signing_key=key,
                  endpoint="gw.local:7790", files=art, image_digest=APPROVED, mac=mac)
    return World(node, gw, home, kek, address, key)


def _challenged(cluster: Cluster, node: str) -> dict[str, Any]:
    obj: dict[str, Any] = wait_for(
        "the operator to register the node and issue its enrolment challenge",
        lambda: (o := cluster.get("hpcnodes", node)).get("status", {}).get("enrolmentChallenge") and o, timeout=60)
    return obj


def _policy(tmp_path: Path, node: str, actions: dict[str, str] | None = None) -> Path:
    path = tmp_path / "policy.yaml"
    doc: dict[str, Any] = {
        "apiVersion": "trustcap.io/v1alpha1", "kind": "GatewayPolicy",
        "monitor": {"meanIntervalSeconds": 2, "minIntervalSeconds": 0.5, "maxQuoteAgeSeconds": 30},
        "attestation": {"node": node, "bootImages": ["0x" + APPROVED_HEX], "allowUnlistedMeasurements": True},
    }
    if actions:
        doc["actions"] = actions
    path.write_text(yaml.safe_dump(doc))
    return path


def _boot(lab: Lab, w: World, tmp_path: Path, env: dict[str, str], kubeconfig: Path, *, serves: list[str],
          boots: str, actions: dict[str, str] | None = None) -> tuple[Proc, Proc]:
    token_file = tmp_path / "token"
    gw = start_gateway(lab, env=env, home=w.root_home, kek=w.kek, node=w.node,
                       boot_digests=[f"sha256:{h}" for h in serves], policy=_policy(tmp_path, w.node, actions),
                       token_file=token_file, kubeconfig=kubeconfig, log=tmp_path / "gateway.log")
    agent = start_agent(lab, env=env, gateway_address=w.gateway_address, token=token_file.read_text().strip(),
                        node=w.node, boot_hex=boots, log=tmp_path / "agent.log")
    return gw, agent


def _phase(cluster: Cluster, node: str, *phases: str) -> dict[str, Any] | None:
    obj = cluster.get("hpcnodes", node)
    return obj if obj.get("status", {}).get("phase") in phases else None


def _quarantine_event(cluster: Cluster, node: str, claim: str) -> list[dict[str, str]]:
    return [e for e in cluster.events_for(node)
            if e["type"] == "Warning" and e["reason"] == "Quarantined" and claim in (e["message"] or "")]


def test_approved_image_enrols_and_the_operator_verifies_it(
        lab: tuple[Lab, ClusterLink], cluster: Cluster, operator_proc: Proc, child_env: dict[str, str],
        kubeconfig: Path, tmp_path: Path) -> None:
    w = _world(cluster, tmp_path)
    assert _challenged(cluster, w.node)["status"]["phase"] == "Registered"
    gw, agent = _boot(lab[0], w, tmp_path, child_env, kubeconfig, serves=[APPROVED_HEX], boots=APPROVED_HEX)
    try:
        obj = wait_for("the HPCNode to become Enrolled", lambda: _phase(cluster, w.node, "Enrolled", "Quarantined"),
                       timeout=90)
        st = obj["status"]
        assert st["phase"] == "Enrolled", (st, operator_proc.text()[-3000:])
        assert st["lastQuote"]["bootImageDigest"] == APPROVED
        assert st["agentKey"] == st["enrolment"]["agentKey"]
        assert st["enrolment"]["gateway"] == w.gateway_address
        ready = next(c for c in st["conditions"] if c["type"] == "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "Enrolled")
        assert st["enrolmentChallenge"]["nonce"] != "0x" + _signed_nonce(st)  # the answered nonce is spent
        assert "published enrolment of node" in gw.text()
    finally:
        agent.stop()
        assert gw.stop() == 0, gw.text()


def test_a_failed_monitor_check_quarantines_the_node_naming_the_claim(
        lab: tuple[Lab, ClusterLink], cluster: Cluster, operator_proc: Proc, child_env: dict[str, str],
        kubeconfig: Path, tmp_path: Path) -> None:
    """Seed Task 5: on a failed check the gateway can quarantine its HPC. Here the policy maps a silent
    agent to quarantine; killing the enrolled agent puts the HPCNode in Quarantined, naming the claim."""
    w = _world(cluster, tmp_path)
    _challenged(cluster, w.node)
    gw, agent = _boot(lab[0], w, tmp_path, child_env, kubeconfig, serves=[APPROVED_HEX], boots=APPROVED_HEX,
                      actions={"unreachable": "quarantine"})
    try:
        wait_for("the HPCNode to become Enrolled", lambda: _phase(cluster, w.node, "Enrolled"), timeout=90)
        assert _phase(cluster, w.node, "Quarantined") is None  # positive control: a healthy node is not
        agent.stop()
        obj = wait_for("the gateway's monitor to quarantine the node",
                       lambda: _phase(cluster, w.node, "Quarantined"), timeout=60)
        reason = obj["status"]["quarantineReason"]
        assert reason.startswith("gateway monitor: ") and "agent.unreachable" in reason, reason
        assert f"HPCNode {w.node} quarantined" in gw.text(), gw.text()[-2000:]
        time.sleep(3)  # quarantine is sticky: the operator never moves the node back by itself
        assert _phase(cluster, w.node, "Quarantined") is not None
    finally:
        agent.stop()
        assert gw.stop() == 0, gw.text()


def _signed_nonce(status: dict[str, Any]) -> str:
    import json

    return str(json.loads(status["enrolment"]["quote"])["quote"]["nonce"])[2:]


def test_a_gateway_that_enrols_an_unapproved_image_is_overruled(
        lab: tuple[Lab, ClusterLink], cluster: Cluster, operator_proc: Proc, child_env: dict[str, str],
        kubeconfig: Path, tmp_path: Path) -> None:
    """The gateway is told to serve an image the cluster never approved: its evidence is genuine (its
    own countersignature) and still refused, because the operator checks the BootImage itself."""
    w = _world(cluster, tmp_path)
    _challenged(cluster, w.node)
    gw, agent = _boot(lab[0], w, tmp_path, child_env, kubeconfig, serves=[APPROVED_HEX, OTHER_HEX],
                      boots=OTHER_HEX)
    try:
        obj = wait_for("the HPCNode to be decided", lambda: _phase(cluster, w.node, "Enrolled", "Quarantined"),
                       timeout=90)
        st = obj["status"]
        assert st["phase"] == "Quarantined", st
        assert "boot.digest.not_approved" in st["quarantineReason"]
        assert "lastQuote" not in st and "agentKey" not in st
        wait_for("a Warning event naming the claim", lambda: _quarantine_event(cluster, w.node,
                                                                              "boot.digest.not_approved"), timeout=30)
    finally:
        agent.stop()
        gw.stop()


def test_a_gateway_serving_only_approved_images_refuses_the_agent(
        lab: tuple[Lab, ClusterLink], cluster: Cluster, operator_proc: Proc, child_env: dict[str, str],
        kubeconfig: Path, tmp_path: Path) -> None:
    w = _world(cluster, tmp_path)
    _challenged(cluster, w.node)
    gw, agent = _boot(lab[0], w, tmp_path, child_env, kubeconfig, serves=[APPROVED_HEX], boots=OTHER_HEX)
    try:
        gw.wait_log(f"boot image 0x{OTHER_HEX} is not one this gateway serves", timeout=30)
        time.sleep(6)  # a window in which a publish and the operator's 2 s timer would both have acted
        st = cluster.get("hpcnodes", w.node)["status"]
        assert st["phase"] == "Registered" and "enrolment" not in st, st
    finally:
        agent.stop()
        gw.stop()


def test_a_forged_countersignature_written_by_hand_is_quarantined(
        cluster: Cluster, operator_proc: Proc, tmp_path: Path) -> None:
    """Someone with write access to the status (not the gateway's key) publishes a quote that answers
    the live challenge for an approved image: only the countersignature is wrong, and it is named."""
    w = _world(cluster, tmp_path)
    obj = _challenged(cluster, w.node)
    nonce = obj["status"]["enrolmentChallenge"]["nonce"]
    agent, intruder = BootKey(), BootKey()
    quote = new_quote(nonce=bytes.fromhex(nonce[2:]), issued_at=int(time.time()), node_id=w.node,
                      gateway=w.gateway_address, agent_key=agent.public_key(),
                      boot_image_digest=bytes.fromhex(APPROVED_HEX), measurements={"kernel": "0x" + "22" * 32},
                      capsule_state={"phase": "idle"})
    signed = sign_quote(quote, agent, intruder)
    cluster.patch_status("hpcnodes", w.node, {"phase": "Booting", "enrolment": {
        "agentKey": quote.agent_key, "bootImageDigest": APPROVED, "gateway": w.gateway_address,
        "quote": encode_signed_quote(signed).decode(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}})
    got = wait_for("the HPCNode to be decided", lambda: _phase(cluster, w.node, "Enrolled", "Quarantined"),
                   timeout=60)
    st = got["status"]
    assert st["phase"] == "Quarantined", st
    assert "quote.signature.gateway" in st["quarantineReason"]
    assert "boot.digest" not in st["quarantineReason"] and "nonce." not in st["quarantineReason"]
    wait_for("a Warning event naming the claim", lambda: _quarantine_event(cluster, w.node, "quote.signature.gateway"),
             timeout=30)
