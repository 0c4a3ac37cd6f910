"""The netbooted HPC's own agent enrols with its gateway and quotes the approved boot digest.

Real parts end to end: dnsmasq hands the HPC its one-time token, node name, the gateway's address and
attestation endpoint (DHCP options 224-227); qemu's iPXE fetches the approved script, kernel and the
initrd with Python and the trustcap agent; the init starts the agent, which enrols over the real channel
with the gateway's AttestationServer (software trust root) in the gateway namespace; a fresh nonce then
gets a countersigned quote whose boot-image digest is the approved one.
"""

from __future__ import annotations

import os

import pytest
from pxekit import NODE, AgentBoot

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BOOT_TIMEOUT = 420.0  # TCG, a 27 MB initrd, Python start-up on a busy 2-core machine


def test_pxe_booted_agent_enrols_and_quotes_the_approved_digest(agent_boot: AgentBoot) -> None:
    ab = agent_boot
    try:
        session = ab.server.wait_for_agent(timeout=BOOT_TIMEOUT)
    except Exception:
        serial = ab.hpc.serial_log.read_text(errors="replace")
        raise AssertionError(f"agent did not enrol; refusals={ab.server.refusals}\n{serial[-4000:]}") from None
    print(f"\nPXE boot power-on -> agent enrolled: {ab.hpc.elapsed():.1f}s ({ab.hpc.accel})")
    assert session.enrolment.node_id == NODE
    approved = "0x" + ab.image.bootdigest.split(":", 1)[1]
    assert session.enrolment.boot_digest == approved
    nonce = os.urandom(32)
    signed = ab.server.challenge(nonce)
    assert signed.quote.nonce == "0x" + nonce.hex()
    assert signed.quote.boot_image_digest == approved
    assert ab.server.refusals == []
    booted = ab.gw.wait_event("booted", 10)
    assert booted is not None and booted["bootdigest"] == ab.image.bootdigest
