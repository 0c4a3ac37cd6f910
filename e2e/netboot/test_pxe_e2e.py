"""A qemu PC PXE-boots the approved image from the gateway namespace; a tampered initrd never boots.

Real parts only: namespaces, bridge, tap, dnsmasq (DHCP), our TFTP and HTTP servers, qemu's iPXE ROM,
the Debian kernel and our initramfs. TCG unless TRUSTCAP_QEMU_ACCEL=kvm (KVM failed here with an MSR
error). Every wait is bounded.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from pxekit import TOKEN, Gateway, QemuHpc

from trustcap.netboot.image.builder import INITRD_FILE, BuiltImage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BOOT_TIMEOUT = 240.0  # TCG on a busy 2-core machine


def test_approved_image_pxe_boots_and_reaches_its_gateway(boot: tuple[Gateway, QemuHpc], image: BuiltImage) -> None:
    gw, hpc = boot
    seen = hpc.wait_for(("TRUSTCAP-HELLO-OK", "trustcap: boot image refused", "Kernel panic"), BOOT_TIMEOUT)
    serial = hpc.serial_log.read_text(errors="replace")
    assert seen == "TRUSTCAP-HELLO-OK", f"HPC did not boot to its gateway; serial tail:\n{serial[-3000:]}"
    booted = gw.wait_event("booted", 10)
    assert booted is not None, gw.log.read_text()[-2000:]
    elapsed = time.monotonic() - hpc.started_at
    print(f"\nPXE boot power-on -> gateway reached: {elapsed:.1f}s ({hpc.accel})")
    # The HPC reports the digest the gateway approved, and the token only its MAC was given by DHCP.
    assert booted["bootdigest"] == image.bootdigest
    assert booted["token"] == TOKEN
    assert f"TRUSTCAP-BOOTED bootdigest={image.bootdigest}" in serial
    assert not [e for e in gw.events_list() if e["event"] == "refused"]


def test_tampered_initrd_is_refused_never_boots_and_is_reported(
    tampered: object, boot: tuple[Gateway, QemuHpc]
) -> None:
    gw, hpc = boot
    refused = gw.wait_event("refused", BOOT_TIMEOUT)
    assert refused is not None, f"no refusal reported; serve log:\n{gw.log.read_text()[-2000:]}"
    assert refused["reason"] == "digest-mismatch"
    assert refused["name"].lstrip("/") == INITRD_FILE
    # iPXE's script falls to its failure branch; the kernel never starts userspace.
    seen = hpc.wait_for(("trustcap: boot image refused", "TRUSTCAP-BOOTED"), 60)
    serial = hpc.serial_log.read_text(errors="replace")
    assert seen == "trustcap: boot image refused", serial[-3000:]
    assert "TRUSTCAP-BOOTED" not in serial and "trustcap-init" not in serial
    assert gw.wait_event("booted", 2) is None
    assert "refused" in gw.log.read_text() and "differs from approved" in gw.log.read_text()


def test_boot_services_in_a_container_exit_after_the_boot(
    container_boot: tuple[subprocess.Popen[str], Path, Path, QemuHpc], image: BuiltImage
) -> None:
    proc, events, log, hpc = container_boot
    seen = hpc.wait_for(("TRUSTCAP-HELLO-OK", "trustcap: boot image refused", "Kernel panic"), BOOT_TIMEOUT,
                        alive=proc)
    assert seen == "TRUSTCAP-HELLO-OK", hpc.serial_log.read_text(errors="replace")[-3000:] + log.read_text()[-2000:]
    # The container stops by itself once the HPC reported its boot; the CLI returns its exit code, 0.
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    booted = [json.loads(ln) for ln in events.read_text().splitlines() if '"booted"' in ln]
    assert [b["bootdigest"] for b in booted] == [image.bootdigest]
    assert "boot services stopped" in log.read_text()
