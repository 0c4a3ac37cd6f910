"""The netbooted HPC's own agent enrols with its gateway, and the operator calls its HPCNode `Enrolled`.

Real parts end to end (issue 6 item 5): dnsmasq hands the HPC its one-time token, node name, the
gateway's address and attestation endpoint (DHCP options 224-227); qemu's iPXE fetches the approved
script, kernel and the initrd with Python and the trustcap agent; the init starts the agent, which enrols
over the real channel with the gateway's AttestationServer (software trust root) in the gateway
namespace. The gateway answers the operator's enrolment challenge with a countersigned quote and
publishes it into the HPCNode status through the cluster link; the operator (a real process on the
stack's kube-apiserver) checks it against the Gateway and the Approved BootImage and sets `Enrolled`.

With a tampered initrd the file is refused (never served), iPXE stops, no agent ever enrols, the refusal
becomes a BootFileTampered Warning event on the HPCNode, and the node never becomes `Enrolled`.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from joinkit import wait_for
from pxekit import AgentBoot

from trustcap.netboot.image.builder import INITRD_FILE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BOOT_TIMEOUT = 420.0  # TCG, a 27 MB initrd, Python start-up on a busy 2-core machine
DECIDE_TIMEOUT = 120.0  # enrolled agent -> evidence published -> operator's 2 s timer decides
NEVER_WINDOW = 20.0  # after the refusal: long enough for a publish and several operator timer runs


def _phase(ab: AgentBoot) -> dict[str, Any]:
    obj: dict[str, Any] = ab.cluster.get("hpcnodes", ab.node)
    return obj


def _decided(ab: AgentBoot) -> dict[str, Any] | None:
    obj = _phase(ab)
    return obj if obj.get("status", {}).get("phase") in ("Enrolled", "Quarantined") else None


def test_pxe_booted_agent_enrols_and_its_hpcnode_becomes_enrolled(agent_boot: AgentBoot) -> None:
    ab = agent_boot
    try:
        session = ab.server.wait_for_agent(timeout=BOOT_TIMEOUT)
    except Exception:
        serial = ab.hpc.serial_log.read_text(errors="replace")
        raise AssertionError(f"agent did not enrol; refusals={ab.server.refusals}\n{serial[-4000:]}") from None
    print(f"\nPXE boot power-on -> agent enrolled: {ab.hpc.elapsed():.1f}s ({ab.hpc.accel})")
    assert session.enrolment.node_id == ab.node
    approved = "0x" + ab.image.bootdigest.split(":", 1)[1]
    assert session.enrolment.boot_digest == approved
    nonce = os.urandom(32)
    signed = ab.server.challenge(nonce)
    assert signed.quote.nonce == "0x" + nonce.hex()
    assert signed.quote.boot_image_digest == approved
    assert ab.server.refusals == []
    booted = ab.gw.wait_event("booted", 10)
    assert booted is not None and booted["bootdigest"] == ab.image.bootdigest

    # The join: the operator, not the gateway, calls the node Enrolled after checking the evidence.
    try:
        obj = wait_for("the HPCNode to be decided", lambda: _decided(ab), timeout=DECIDE_TIMEOUT)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\npublisher errors={ab.publisher.errors}\n"
                             f"operator log tail:\n{ab.operator.text()[-3000:]}") from None
    print(f"PXE boot power-on -> HPCNode Enrolled: {ab.hpc.elapsed():.1f}s")
    st = obj["status"]
    assert st["phase"] == "Enrolled", (st, ab.operator.text()[-3000:])
    approved_bi = ab.cluster.get("bootimages", ab.objects.boot_image)["status"]["imageDigest"]
    assert approved_bi == ab.image.bootdigest
    assert st["lastQuote"]["bootImageDigest"] == approved_bi
    assert st["agentKey"] == session.enrolment.agent_key == st["enrolment"]["agentKey"]
    assert st["enrolment"]["gateway"] == ab.root.address
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Enrolled")
    assert list(ab.publisher.published) == [session.enrolment.agent_key]
    # Nothing was refused or quarantined (AwaitingEnrolment, the Ready=False mirror before it, is expected).
    assert not [e for e in ab.cluster.events_for(ab.node)
                if e["type"] == "Warning" and (e["reason"].startswith("Boot") or e["reason"] == "Quarantined")]


@pytest.mark.parametrize("agent_boot", [pytest.param("tampered", id="tampered-initrd")], indirect=True)
def test_tampered_initrd_is_not_served_and_the_hpcnode_never_enrols(agent_boot: AgentBoot) -> None:
    ab = agent_boot
    refused = ab.gw.wait_event("refused", BOOT_TIMEOUT)
    assert refused is not None, f"no refusal reported; serve log:\n{ab.gw.log.read_text()[-2000:]}"
    assert refused["reason"] == "digest-mismatch"
    assert refused["name"].lstrip("/") == INITRD_FILE
    seen = ab.hpc.wait_for(("trustcap: boot image refused", "TRUSTCAP-BOOTED"), 60)
    serial = ab.hpc.serial_log.read_text(errors="replace")
    assert seen == "trustcap: boot image refused", serial[-3000:]
    # Reported on the HPCNode itself, where `kubectl describe hpcnode` shows it.
    events = wait_for("a BootFileTampered Warning event on the HPCNode", lambda: [
        e for e in ab.cluster.events_for(ab.node) if (e["type"], e["reason"]) == ("Warning", "BootFileTampered")],
        timeout=60)
    assert INITRD_FILE in (events[0]["message"] or "")
    # The operator is live (it challenged the node) and still never calls it Enrolled.
    wait_for("the operator's enrolment challenge", lambda: _phase(ab).get("status", {}).get("enrolmentChallenge"),
             timeout=60)
    deadline = time.monotonic() + NEVER_WINDOW
    while time.monotonic() < deadline:
        st = _phase(ab).get("status", {})
        assert st.get("phase") == "Registered" and "enrolment" not in st and "lastQuote" not in st, st
        time.sleep(1.0)
    assert ab.server.session is None and ab.publisher.published == {}
    assert ab.gw.wait_event("booted", 1) is None
