"""The `reboot` wipe on real parts: the gateway power-cycles its qemu HPC, which PXE-boots a fresh approved
image with a new one-time token, enrols a new boot key, and the gateway signs the proof.

    test: kubectl annotate hpcnode N trustcap.io/reboot=<id>
    gateway process (gw netns, --kubeconfig through the cluster link, --reboot-command = the lab's power
    cycle: the link's far end down, QMP system_reset, the link up; --carrier-link = its own end)
      -> HPCNode Wiping; old boot key revoked; token file armed -> netboot serve --token-file restarts
         dnsmasq with the new token -> qemu reset -> SeaBIOS -> iPXE DHCP (new token) -> approved files
         -> agent makes a new key, enrols with the new token -> gateway quotes it, compares with the
         first boot's quote, signs the proof -> HPCNode status.lastWipe (Clean) and the journal
      -> the publisher answers the operator's fresh challenge -> the operator re-verifies: Enrolled with
         the new key.

Everything is a real process or a real kernel object: dnsmasq, qemu (TCG), the gateway and operator
processes, the stack's kube-apiserver; only loopback and the lab's own namespaces carry traffic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pxelab
import pytest
import yaml
from joinkit import ClusterLink, JoinObjects, apiserver_port, create_join_objects, wait_for
from pxekit import AGENT_PORT, Gateway, _start_gateway, _stop
from pxelab import GW_IP, HPC_MAC, LabLink, QemuHpc, qemu_available

from trustcap.evidence import verify_wipe_proof
from trustcap.netboot.image.builder import BuiltImage, copy_image
from trustcap.trustroot import SoftwareTrustRoot, new_kek_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

BOOT_TIMEOUT = 420.0  # TCG, a 27 MB initrd, Python start-up on a busy 2-core machine (seen: ~55 s)
REBOOT_TIMEOUT = 480.0
BOOT_BANNER = "trustcap: fetching approved boot image"


@dataclass
class RebootRig:
    lab: LabLink
    hpc: QemuHpc
    netboot: Gateway
    gateway: subprocess.Popen[bytes]
    gateway_log: Path
    journal: Path
    token_file: Path
    address: str
    objects: JoinObjects
    cluster: Any

    def node(self) -> dict[str, Any]:
        obj: dict[str, Any] = self.cluster.get("hpcnodes", self.objects.node)
        return obj

    def logs(self) -> str:
        serial = self.hpc.serial_log.read_text(errors="replace")[-3000:]
        return (f"gateway log:\n{self.gateway_log.read_text(errors='replace')[-4000:]}\n"
                f"netboot log:\n{self.netboot.log.read_text(errors='replace')[-2000:]}\nserial:\n{serial}")


def _policy(path: Path, node: str, boot_hex: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "trustcap.io/v1alpha1", "kind": "GatewayPolicy",
        "monitor": {"meanIntervalSeconds": 5, "minIntervalSeconds": 1, "maxQuoteAgeSeconds": 60},
        # Strict: a lost agent quarantines the node. Mid-reboot the agent is gone on purpose; the monitor
        # must report the HPC as booting (the boot is armed) and never quarantine it.
        "actions": {"critical": "quarantine", "high": "quarantine", "medium": "report", "unreachable": "quarantine"},
        "attestation": {"node": node, "bootImages": ["0x" + boot_hex], "allowUnlistedMeasurements": True},
    }))
    return path


@pytest.fixture
def rig(agent_image: BuiltImage, workdir: Path, stack: dict[str, Any], kubeconfig: Path, kube_env: dict[str, str],
        join_cluster: Any, join_operator: Any) -> Iterator[RebootRig]:
    reason = qemu_available()
    if reason:
        print(f"SKIP reboot e2e: {reason}")
        pytest.skip(reason)
    tag = f"r{os.getpid()}-{int(time.time() * 1000) % 100000}"
    root = workdir / "root"
    copy_image(agent_image, root)
    manifest = workdir / "approved.json"
    manifest.write_text(json.dumps(agent_image.digests))
    home, kek = workdir / "tr", workdir / "kek"
    home.mkdir()
    SoftwareTrustRoot.create(home, new_kek_file(kek)).close()
    with SoftwareTrustRoot.open(home, bytes.fromhex(kek.read_text().strip())) as tr:
        address, pub = tr.address, tr.public_key()
    objects = create_join_objects(join_cluster, tag, agent_image, address, pub)
    boot_hex = agent_image.bootdigest.split(":", 1)[1]
    token_file, journal, gw_log = workdir / "token", workdir / "journal.jsonl", workdir / "gateway.log"
    address_file = workdir / "gateway-address"
    qmp = workdir / "qmp.sock"
    state = workdir / "state"
    state.mkdir()
    env = dict(kube_env)
    env.pop("PYTHONPATH", None)
    with LabLink(tag=tag) as lab:
        link = ClusterLink(lab.gw_ns, apiserver_port(stack))
        gateway = netboot = None
        hpc = QemuHpc(lab, workdir / "serial.log", memory_mb=1024, qmp=qmp)
        try:
            cmd = lab.in_gw([
                sys.executable, "-P", "-m", "trustcap.gateway", "--trustroot", str(home), "--kek-file", str(kek),
                "--node", objects.node, "--boot-digest", agent_image.bootdigest,
                "--policy", str(_policy(workdir / "policy.yaml", objects.node, boot_hex)),
                "--listen", f"{GW_IP}:{AGENT_PORT}", "--relay", "127.0.0.1:7791", "--token-file", str(token_file),
                "--address-file", str(address_file),  # as the chart runs it: netboot reads the address from here
                "--kubeconfig", str(kubeconfig), "--journal", str(journal), "--boot-timeout", str(REBOOT_TIMEOUT),
                "--reboot-command", f"{sys.executable} {pxelab.__file__} power-cycle {qmp} {lab.link_ns}",
                "--carrier-link", lab.gw_if,  # the gateway's end of the HPC link: its carrier must drop
            ])
            with gw_log.open("wb") as out:
                gateway = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd="/")
            wait_for("the gateway's ready line", lambda: gateway.poll() is not None
                     or "ready agent=" in gw_log.read_text(errors="replace"), timeout=60)
            assert gateway.poll() is None, gw_log.read_text()
            assert address_file.read_text().strip() == address  # the agent can pin only what it is handed
            netboot = _start_gateway(lab, root, manifest, state, extra=[
                "--mac", f"{HPC_MAC}@{objects.node}", "--token-file", str(token_file),
                "--agent-endpoint", f"{GW_IP}:{AGENT_PORT}", "--gateway-address-file", str(address_file),
                "--report-node", objects.node, "--kubeconfig", str(kubeconfig)])
            hpc.start()
            yield RebootRig(lab, hpc, netboot, gateway, gw_log, journal, token_file, address, objects, join_cluster)
        finally:
            hpc.stop()
            for p in (gateway, netboot.proc if netboot else None):
                if p is not None:
                    _stop(p)  # type: ignore[arg-type]
            link.close()


def _enrolled(rig: RebootRig, not_key: str | None = None) -> dict[str, Any] | None:
    st = rig.node().get("status", {})
    if st.get("phase") == "Enrolled" and st.get("agentKey") and st.get("agentKey") != not_key:
        return st
    return None


def test_reboot_wipe_repxe_boots_the_hpc_and_proves_a_fresh_boot(rig: RebootRig, kubectl: Any) -> None:
    # First boot: PXE with the token armed at gateway start; the operator verifies and calls it Enrolled.
    try:
        first = wait_for("the first boot to be Enrolled", lambda: _enrolled(rig), timeout=BOOT_TIMEOUT)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{rig.logs()}") from None
    old_key = first["agentKey"]
    # That boot enrolled: its token is burnt and the file cleared, so DHCP no longer serves the HPC.
    wait_for("the token file to be cleared", lambda: rig.token_file.read_text() == "", timeout=30)
    first_token = next(e["token"] for e in rig.netboot.events_list() if e["event"] == "booted")

    kubectl("annotate", "hpcnode", rig.objects.node, "trustcap.io/reboot=e2e-1", "--overwrite")
    wait_for("the HPCNode to show the wipe in progress", lambda: rig.node().get("status", {}).get("phase") == "Wiping",
             timeout=30)
    try:
        last = wait_for("the reboot to finish", lambda: (w := rig.node().get("status", {}).get("lastWipe", {}))
                        .get("state") in ("Clean", "Failed") and w, timeout=REBOOT_TIMEOUT)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{rig.logs()}") from None
    assert last["state"] == "Clean" and last["clean"] is True, (last, rig.logs())
    assert last["request"] == "e2e-1"

    # The proof is the gateway's, signed by the trust root the Gateway object names.
    signed = json.loads(last["proof"])
    proof = verify_wipe_proof(signed, rig.address)
    print(f"\nreboot wipe: {proof['seconds']} s from request to the fresh boot's first quote")
    assert proof["level"] == "reboot" and proof["node"] == rig.objects.node
    assert proof["before"]["agentKey"] == old_key != proof["after"]["agentKey"]
    assert proof["after"]["bootImageDigest"] == "0x" + rig.objects.approved.split(":", 1)[1]
    assert proof["checks"] == {"powerCycled": True, "newBootKey": True, "approvedImage": True,
                               "matchesBaseline": True, "linkCycled": True}, (proof["measurements"], proof.get("link"))
    assert proof["link"]["iface"] == rig.lab.gw_if
    assert proof["link"]["carrierChangesAtEnrolment"] - proof["link"]["carrierChangesBefore"] >= 2
    assert proof["measurements"]["differ"] == [] and "kernel" in proof["measurements"]["same"]
    assert proof["baseline"]["agentKey"] == old_key
    journal = [json.loads(line) for line in rig.journal.read_text().splitlines()]
    assert any(e.get("proof") == proof for e in journal)
    # The monitor kept checking through the reboot: the HPC was booting, never unreachable, never acted on.
    failed = [f["id"] for e in journal for f in e.get("failed", [])]
    assert "agent.booting" in failed and "agent.unreachable" not in failed, failed
    assert "Quarantined" not in json.dumps(rig.node().get("status", {}))

    # The HPC really went through PXE twice, each boot with its own token from DHCP.
    serial = rig.hpc.serial_log.read_text(errors="replace")
    assert serial.count(BOOT_BANNER) == 2, serial[-3000:]
    booted = wait_for("the second boot's report", lambda: (b := [e for e in rig.netboot.events_list()
                                                               if e["event"] == "booted"]) and len(b) >= 2 and b,
                      timeout=30)
    assert booted[1]["token"] != first_token
    # The operator re-verified the fresh boot's evidence against its own new challenge.
    st = wait_for("the new boot key to be Enrolled", lambda: _enrolled(rig, not_key=old_key), timeout=120)
    assert st["agentKey"] == proof["after"]["agentKey"]
    assert rig.token_file.read_text() == ""  # nothing armed once the fresh boot enrolled
    assert rig.gateway.poll() is None
