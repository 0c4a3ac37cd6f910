"""Real dnsmasq follows the gateway's token file: DHCP answers the HPC only while a one-time token is
armed for its next boot, and hands out exactly that token (DHCP option 224).

Two namespaces joined by a veth (e2e/netlab.py): `trustcap netboot serve --token-file` in the gateway
one, busybox `udhcpc` as the HPC's DHCP client in the other. The token file is written the way the
gateway writes it (temp file + rename, mode 0600); each change restarts dnsmasq with the new token or
stops it. The full reboot round, with qemu and the gateway process, is test_reboot_e2e.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab import Lab, need_root, veth_lab
from pxekit import _stop

from trustcap.gateway.boot import write_private

pytestmark = pytest.mark.timeout(180)

GW_IP, HPC_IP = "10.77.9.1", "10.77.9.2"
NODE = "hpc-token-e2e"


def _link(ns: str) -> tuple[str, str]:
    """(name, MAC) of the namespace's veth end."""
    out = subprocess.run(["ip", "-n", ns, "-o", "link", "show"], capture_output=True, text=True, check=True,
                         timeout=10).stdout
    for line in out.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name != "lo":
            return name, line.split("link/ether ")[1].split()[0]
    raise AssertionError(f"no veth in {ns}: {out}")


def _write_token(path: Path, token: str) -> None:
    write_private(path, token + ("\n" if token else ""))  # exactly as the gateway's BootArming writes it


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Lab, Path, Path]]:
    need_root("the token-file DHCP e2e")
    if shutil.which("dnsmasq") is None or shutil.which("busybox") is None:
        pytest.skip("dnsmasq and busybox (udhcpc) are needed: scripts/install-deps installs them")
    (tmp_path / "root").mkdir()
    token_file = tmp_path / "token"
    _write_token(token_file, "")
    with veth_lab("tk", GW_IP, HPC_IP) as lab:
        gw_if, _ = _link(lab.gw)
        _, hpc_mac = _link(lab.hpc)
        log = tmp_path / "serve.log"
        with log.open("w") as fh:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", lab.gw, sys.executable, "-P", "-m", "trustcap.netboot", "serve",
                 "--root", str(tmp_path / "root"), "--bind", GW_IP, "--tftp-port", "69", "--http-port", "8080",
                 "--dhcp-interface", gw_if, "--dhcp-range", f"{HPC_IP},{HPC_IP}", "--mac", f"{hpc_mac}@{NODE}",
                 "--token-file", str(token_file), "--state-dir", str(tmp_path / "dnsmasq")],
                stdout=fh, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 20
            while '"tftp_port"' not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            yield lab, token_file, log
        finally:
            _stop(proc)


def _dhcp(lab: Lab, tmp: Path) -> dict[str, str] | None:
    """One DHCP exchange from the HPC side: the lease's env (ip, opt224 hex, ...) or None if unanswered."""
    out = tmp / "lease.env"
    out.unlink(missing_ok=True)
    script = tmp / "udhcpc.sh"
    script.write_text(f'#!/bin/sh\n[ "$1" = bound ] && env > {out}\nexit 0\n')
    script.chmod(0o755)
    hpc_if, _ = _link(lab.hpc)
    subprocess.run(["ip", "netns", "exec", lab.hpc, "busybox", "udhcpc", "-i", hpc_if, "-n", "-q", "-t", "4",
                    "-T", "1", "-s", str(script)], capture_output=True, timeout=30, check=False)
    if not out.exists():
        return None
    return dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)


def _token_of(lease: dict[str, str] | None) -> str | None:
    return None if lease is None or "opt224" not in lease else bytes.fromhex(lease["opt224"]).decode()


def _until(what: str, check: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.3)


def test_dhcp_serves_the_hpc_only_with_the_armed_token(served: tuple[Lab, Path, Path], tmp_path: Path) -> None:
    lab, token_file, log = served
    # Nothing armed: no boot is meant, the HPC gets no lease at all (and so no boot file, no token).
    assert _dhcp(lab, tmp_path) is None
    _write_token(token_file, "tok-boot-1")
    _until("dnsmasq restarted with tok-boot-1", lambda: "DHCP serves" in log.read_text())
    lease = _dhcp(lab, tmp_path)
    assert lease is not None, log.read_text()[-2000:]
    assert lease["ip"] == HPC_IP and _token_of(lease) == "tok-boot-1"
    assert bytes.fromhex(lease["opt225"]).decode() == NODE
    # The next boot's token replaces it: the old one is never handed out again.
    _write_token(token_file, "tok-boot-2")
    _until("the second token served", lambda: _token_of(_dhcp(lab, tmp_path)) == "tok-boot-2", timeout=30)
    # Disarmed (the boot enrolled): the HPC is not served any more.
    _write_token(token_file, "")
    _until("DHCP stopped", lambda: log.read_text().count("not served") >= 2)
    assert _dhcp(lab, tmp_path) is None
    # A file that is not a token is never served.
    _write_token(token_file, 'x"; dhcp-range=0.0.0.0')
    time.sleep(1.5)
    assert _dhcp(lab, tmp_path) is None
    assert "does not hold a token" in log.read_text()
