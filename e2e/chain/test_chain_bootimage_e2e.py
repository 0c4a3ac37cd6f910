"""BootImage approval comes from the chain (decision 0063): the operator process, the stack's real
kube-apiserver, a real anvil with freshly deployed contracts.

One flowing test walks an image through its life: created (Pending, the message names the image id the
CLI prints), approveBootImage on chain (Approved with imageDigest and approvalTx, and netboot's approval
source now lists its files), revokeBootImage (Revoked, files no longer listed, a Warning event), approved
again, then an RPC outage (the operator restarted against a dead port keeps Approved, even though the
chain revoked the image meanwhile) and recovery (the real RPC again: Revoked). A second test: no
spec.bootDigest -> Pending naming the field.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chainkit import Chain
from clusterkit import Cluster, Proc, apply_node_crds, operator_env, start_operator, tracked_cluster, wait_for

from trustcap.chain.keys import ANVIL_KEYS
from trustcap.netboot.approval import BootImageApproval

PLURAL = "bootimages"
POLL_S = "1"


@pytest.fixture(scope="module")
def bootimage_crd(kubectl: Any) -> None:
    # The node CRDs *and* the operator's namespace: kopf watches nothing while its --namespace filter
    # matches no namespace, and on a fresh datastore no earlier suite has made it yet.
    apply_node_crds(kubectl)


@pytest.fixture
def cluster(k8s_api: Any, bootimage_crd: None) -> Iterator[Cluster]:
    with tracked_cluster(k8s_api) as c:
        yield c


@pytest.fixture
def chain_env(chain: Chain, kube_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The operator's chain settings, as in production: the same ones the chain-writer reads."""
    dep = tmp_path / "deployment.json"
    chain.d.save(dep)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"sender": ANVIL_KEYS[6], "batchSigners": list(ANVIL_KEYS[1:4])}))
    env = operator_env(kube_env)
    env.update({
        "TRUSTCAP_CHAIN_RPC": chain.anvil.url, "TRUSTCAP_CHAIN_DEPLOYMENT": str(dep),
        "TRUSTCAP_CHAIN_JOURNAL": str(tmp_path / "journal.sqlite"), "TRUSTCAP_CHAIN_KEYS": str(keys),
        "TRUSTCAP_CHAIN_CONFIRMATIONS": "1", "TRUSTCAP_CHAIN_BATCH_SECONDS": "1",
        "TRUSTCAP_BOOTIMAGE_POLL_SECONDS": POLL_S,
    })
    return env


@pytest.fixture
def operators(tmp_path: Path) -> Iterator[list[Proc]]:
    """Every operator process a test starts, stopped at teardown even when the test fails."""
    procs: list[Proc] = []
    yield procs
    for p in procs:
        p.stop()


def _manifest(name: str, *, boot_digest: bool = True) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    for part, fname in (("kernel", "vmlinuz"), ("initrd", "initrd.img"), ("ipxeScript", "boot.ipxe")):
        spec[part] = {"path": f"{name}/{fname}", "digest": "sha256:" + os.urandom(32).hex()}
    if boot_digest:
        spec["bootDigest"] = "sha256:" + os.urandom(32).hex()
    return {"apiVersion": "trustcap.io/v1alpha1", "kind": "BootImage", "metadata": {"name": name}, "spec": spec}


def _cli_image_id(manifest: dict[str, Any], tmp_path: Path) -> str:
    path = tmp_path / "bootimage.yaml"
    path.write_text(json.dumps(manifest))
    out = subprocess.run([sys.executable, "-P", "-m", "trustcap.cli", "bootimage", "id", str(path)],
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


def _status(cluster: Cluster, name: str) -> dict[str, Any]:
    status: dict[str, Any] = cluster.get(PLURAL, name).get("status") or {}
    return status


def _phase_is(cluster: Cluster, name: str, phase: str) -> Any:
    def probe() -> dict[str, Any] | None:
        st = _status(cluster, name)
        return st if st.get("phase") == phase else None
    return probe


def _ready(status: dict[str, Any]) -> dict[str, Any]:
    (ready,) = [c for c in status.get("conditions") or [] if c["type"] == "Ready"]
    return ready


def _served(kubeconfig: Path, name: str) -> set[str]:
    return {p for p in BootImageApproval(kubeconfig=str(kubeconfig)).approved() if p.startswith(f"{name}/")}


def _dead_rpc() -> str:
    """A loopback port nobody listens on: connections are refused, as when the chain node is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_bootimage_follows_approve_revoke_and_survives_an_rpc_outage(
    chain: Chain, cluster: Cluster, chain_env: dict[str, str], operators: list[Proc], kubeconfig: Path,
    tmp_path: Path,
) -> None:
    registry = chain.owner.contract("NodeRegistry", chain.d.registry).functions
    name = f"bi-chain-{os.urandom(3).hex()}"
    manifest = _manifest(name)
    iid = _cli_image_id(manifest, tmp_path)
    iid_bytes = bytes.fromhex(iid[2:])
    operators.append(start_operator(chain_env, tmp_path / "operator.log"))

    # 1. created: Pending, and the message names the id the CLI printed
    cluster.create(PLURAL, manifest)
    st = wait_for("phase Pending", _phase_is(cluster, name, "Pending"), timeout=60)
    assert st["approvedOnChain"] is False and st["imageId"] == iid
    assert "imageDigest" not in st
    ready = _ready(st)
    assert ready["status"] == "False" and ready["reason"] == "AwaitingChainApproval"
    assert f"approveBootImage({iid})" in ready["message"]
    assert _served(kubeconfig, name) == set(), "a gateway serves nothing of a Pending image"

    # 2. approved on chain: Approved, the digest quotes must carry, and the approving transaction
    receipt = chain.owner.transact(registry.approveBootImage(iid_bytes))
    st = wait_for("phase Approved", _phase_is(cluster, name, "Approved"), timeout=60)
    assert st["approvedOnChain"] is True
    assert st["imageDigest"] == manifest["spec"]["bootDigest"]
    assert st["approvalTx"] == "0x" + bytes(receipt["transactionHash"]).hex()
    assert _ready(st)["status"] == "True" and _ready(st)["reason"] == "ApprovedOnChain"
    assert _served(kubeconfig, name) == {f"{name}/vmlinuz", f"{name}/initrd.img", f"{name}/boot.ipxe"}

    # 3. revoked on chain: Revoked, nothing served, a Warning event with the reason
    chain.owner.transact(registry.revokeBootImage(iid_bytes))
    st = wait_for("phase Revoked", _phase_is(cluster, name, "Revoked"), timeout=60)
    assert st["approvedOnChain"] is False and "imageDigest" not in st and "approvalTx" not in st
    assert _ready(st)["reason"] == "RevokedOnChain" and iid in _ready(st)["message"]
    assert _served(kubeconfig, name) == set()
    wait_for("a RevokedOnChain Warning event", lambda: [
        e for e in cluster.events_for(name) if e["type"] == "Warning" and e["reason"] == "RevokedOnChain"], timeout=30)

    # 4. approved again: the status names the newer approval
    receipt2 = chain.owner.transact(registry.approveBootImage(iid_bytes))
    st = wait_for("phase Approved again", _phase_is(cluster, name, "Approved"), timeout=60)
    assert st["approvalTx"] == "0x" + bytes(receipt2["transactionHash"]).hex()
    approved_status = st

    # 5. RPC outage: the operator restarted against a dead endpoint keeps Approved; it cannot know about a
    #    revocation it cannot read, and "unreachable" is never taken for "revoked"
    operators[0].stop()
    blind = dict(chain_env, TRUSTCAP_CHAIN_RPC=_dead_rpc())
    operators.append(start_operator(blind, tmp_path / "operator-blind.log"))
    chain.owner.transact(registry.revokeBootImage(iid_bytes))
    operators[1].wait_log("chain unreachable, keeping the BootImage status (phase Approved)", timeout=60)
    time.sleep(5 * float(POLL_S))  # several more polls while the chain stays unreachable
    st = _status(cluster, name)
    assert st["phase"] == "Approved" and st["conditions"] == approved_status["conditions"]
    assert operators[1].text().count("chain unreachable") >= 2, "it keeps retrying"

    # 6. the chain answers again: the revocation made during the outage is applied
    operators[1].stop()
    operators.append(start_operator(chain_env, tmp_path / "operator-back.log"))
    st = wait_for("phase Revoked after the outage", _phase_is(cluster, name, "Revoked"), timeout=60)
    assert st["approvedOnChain"] is False


def test_bootimage_without_boot_digest_is_pending_naming_the_field(
    chain: Chain, cluster: Cluster, chain_env: dict[str, str], operators: list[Proc], tmp_path: Path,
) -> None:
    name = f"bi-nodigest-{os.urandom(3).hex()}"
    operators.append(start_operator(chain_env, tmp_path / "operator.log"))
    cluster.create(PLURAL, _manifest(name, boot_digest=False))
    st = wait_for("phase Pending", _phase_is(cluster, name, "Pending"), timeout=60)
    ready = _ready(st)
    assert ready["reason"] == "InvalidSpec" and "spec.bootDigest: missing" in ready["message"]
    assert st["approvedOnChain"] is False and "imageId" not in st
