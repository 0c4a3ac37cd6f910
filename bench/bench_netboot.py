"""Netboot costs beside C baselines measured in the same run.

    python bench/bench_netboot.py [--quick] [--no-boot]

1. TFTP throughput: our server (tftpy codec + approval and sha256 gate on every request) against
   tftpd-hpa's `in.tftpd` (C) serving the same file from the same folder, on loopback, with one C client
   (curl's TFTP) at block sizes 512, 1468 and 8192. Figure: MB/s each (median of the rounds), ours / in.tftpd
   from those medians, and the median of the per-round ratios: the rounds alternate the two servers, so
   each round's pair saw the same load, which on a shared machine swings several-fold within a minute.
2. Boot time (root + qemu only), with the agent image: power-on -> init up and power-on -> agent enrolled
   with the gateway's attestation server, PXE through dnsmasq, our TFTP and HTTP (`trustcap netboot
   serve` in a namespace), against the same kernel and initrd booted directly by qemu (-kernel/-initrd,
   no firmware or network fetch) to init up, in the same run.
Only ratios mean something; nothing is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from trustcap.netboot.approval import ManifestApproval
from trustcap.netboot.store import ApprovedStore
from trustcap.netboot.tftp import TftpServer

console = Console()
BLOCK_SIZES = (512, 1468, 8192)


def _curl_tftp(port: int, name: str, blksize: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(["curl", "-s", "-f", "-o", "/dev/null", "--max-time", "120", "--tftp-blksize", str(blksize),
                    f"tftp://127.0.0.1:{port}/{name}"], check=True, timeout=130)
    return time.perf_counter() - t0


def _free_udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def bench_tftp(size: int, rounds: int) -> list[tuple[int, float, float, float]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="tcbench-") as tmp:
        root = Path(tmp)
        data = os.urandom(size)
        (root / "blob").write_bytes(data)
        os.chmod(root, 0o755)  # noqa: S103 -- in.tftpd -s reads the folder after dropping privileges
        os.chmod(root / "blob", 0o644)
        store = ApprovedStore(root, ManifestApproval({"blob": hashlib.sha256(data).digest()}))
        ours = TftpServer(store, "127.0.0.1", 0).start()
        port = _free_udp_port()
        hpa = subprocess.Popen(["in.tftpd", "-L", "-s", "-a", f"127.0.0.1:{port}", str(root)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            for bs in BLOCK_SIZES:
                a, b = [], []
                for _ in range(rounds):  # interleaved, so that load from elsewhere hits both alike
                    a.append(_curl_tftp(ours.port, "blob", bs))
                    b.append(_curl_tftp(port, "blob", bs))
                ours_t, hpa_t = statistics.median(a), statistics.median(b)
                paired = statistics.median(y / x for x, y in zip(a, b, strict=True))
                rows.append((bs, size / ours_t / 1e6, size / hpa_t / 1e6, paired))
        finally:
            ours.stop()
            hpa.terminate()
            hpa.wait(timeout=10)
    return rows


def bench_boot(timeout: float) -> tuple[float | None, float | None, float | None, float | None, str]:
    """(direct boot s, PXE boot s, PXE to agent enrolled s, reboot wipe s, accel), all with the agent image.

    The reboot wipe is the gateway's whole `reboot` level (gateway/boot.py): revoke, arm a new token,
    power-cycle the PC (its link's carrier drops, a QMP reset, the carrier returns), PXE again, a new key
    enrolled and quoted, the proof signed."""
    from trustcap.gateway.boot import BootArming, CarrierWatch, Rebooter
    from trustcap.gateway.enrol import TokenBook
    from trustcap.gateway.server import AttestationServer
    from trustcap.netboot.image.builder import BuildInputs, build_image, copy_image
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "e2e"))  # the e2e suite's PXE lab
    from pxelab import GW_IP, HPC_MAC, LabLink, QemuHpc, in_netns, power_cycle, qemu_available

    class NsCarrier(CarrierWatch):
        """The gateway's end of the lab link lives in the lab's namespace, whose sysfs this process does not
        see: read the kernel's count there (`ip netns exec` mounts that namespace's /sys)."""

        def __init__(self, ns: str, iface: str) -> None:
            super().__init__(iface)
            self.ns = ns

        def changes(self) -> int:
            path = f"/sys/class/net/{self.iface}/carrier_changes"
            out = subprocess.run(["ip", "netns", "exec", self.ns, "cat", path],
                                 capture_output=True, text=True, timeout=10, check=True)
            return int(out.stdout.strip())

    from trustcap.trustroot import SoftwareTrustRoot

    reason = qemu_available()
    if reason:
        return None, None, None, None, reason
    img = build_image(BuildInputs(with_agent=True))
    accel = os.environ.get("TRUSTCAP_QEMU_ACCEL", "tcg")
    with tempfile.TemporaryDirectory(prefix="tcbench-boot-") as tmp:
        t = Path(tmp)
        # Baseline: the same kernel and initrd, loaded by qemu itself; the init's hello goes nowhere, so
        # the end mark is the init's "booted" line, which the PXE run prints at the same point.
        log = t / "direct.log"
        cmdline = (f"{img.cmdline} trustcap.netboot=127.0.0.1:9 trustcap.token=x "
                   f"trustcap.bootdigest={img.bootdigest}")
        t0 = time.monotonic()
        direct = subprocess.Popen(
            ["qemu-system-x86_64", "-accel", accel, "-m", "1024", "-nographic", "-nodefaults", "-no-reboot",
             "-monitor", "none", "-serial", f"file:{log}", "-kernel", str(img.path("vmlinuz")),
             "-initrd", str(img.path("initrd.img")), "-append", cmdline, "-nic", "none"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        direct_s = None
        try:
            while time.monotonic() - t0 < timeout:
                if log.exists() and "TRUSTCAP-BOOTED" in log.read_text(errors="replace"):
                    direct_s = time.monotonic() - t0
                    break
                time.sleep(0.2)
        finally:
            direct.kill()
            direct.wait(timeout=10)
        root = t / "root"
        copy_image(img, root)
        (t / "approved.json").write_text(json.dumps(img.digests))
        pxe_s = enrol_s = reboot_s = None
        (t / "tr").mkdir()
        trust_root = SoftwareTrustRoot.create(t / "tr", os.urandom(32))
        tokens = TokenBook(["0x" + img.bootdigest.split(":", 1)[1]])
        arming = BootArming(tokens, "hpc-bench", t / "token")
        arming.arm()
        with LabLink(tag=f"b{os.getpid()}") as lab:
            with in_netns(lab.gw_ns):
                server = AttestationServer(trust_root, "hpc-bench", tokens, host=GW_IP, port=7443)
            # as the gateway runs it (decision 0119): a power cycle drops the link's carrier, which the proof checks
            rebooter = Rebooter(server, arming, lambda _reason: power_cycle(t / "qmp.sock", lab.link_ns), trust_root,
                                boot_timeout_s=timeout, carrier=NsCarrier(lab.gw_ns, lab.gw_if))
            server.on_session = rebooter.on_session
            serve = subprocess.Popen(lab.in_gw([
                sys.executable, "-P", "-m", "trustcap.cli", "netboot", "serve", "--root", str(root), "--bind", GW_IP,
                "--tftp-port", "69", "--http-port", "8080", "--manifest", str(t / "approved.json"),
                "--dhcp-interface", lab.gw_if, "--dhcp-range", "10.77.0.100,10.77.0.150",
                "--mac", f"{HPC_MAC}@hpc-bench", "--token-file", str(t / "token"), "--agent-endpoint", f"{GW_IP}:7443",
                "--gateway-address", trust_root.address, "--state-dir", str(t / "state")]),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            hpc = QemuHpc(lab, t / "pxe.log", accel=accel, memory_mb=1024, qmp=t / "qmp.sock")
            try:
                time.sleep(1.5)
                hpc.start()
                if hpc.wait_for(("TRUSTCAP-BOOTED",), timeout):
                    pxe_s = hpc.elapsed()
                    try:
                        session = server.wait_for_agent(timeout=timeout)
                        enrol_s = hpc.elapsed()
                        rebooter.boot_quote(session.enrolment.agent_key)
                        proof = rebooter.reboot("bench")["proof"]
                        if proof["clean"]:
                            reboot_s = float(proof["seconds"])
                        else:
                            console.print(f"reboot wipe not clean: {proof['checks']} {proof['error']}")
                    except Exception as exc:
                        console.print(f"agent did not enrol: {exc}")
            finally:
                hpc.stop()
                server.close()
                trust_root.close()
                serve.send_signal(signal.SIGTERM)
                serve.wait(timeout=15)
    return direct_s, pxe_s, enrol_s, reboot_s, accel


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1 MiB file, one round, no boot")
    ap.add_argument("--no-boot", action="store_true", help="skip the qemu boot-time bench")
    args = ap.parse_args()
    if not shutil.which("in.tftpd") or not shutil.which("curl"):
        console.print("bench_netboot: in.tftpd (tftpd-hpa) and curl are needed for the TFTP baseline")
        return 1
    size = (1 if args.quick else 8) * 1024 * 1024
    rows = bench_tftp(size, 1 if args.quick else 7)
    table = Table(title=f"TFTP throughput, {size // (1024 * 1024)} MiB file on loopback, curl client (median)")
    for col in ("blksize", "trustcap (MB/s)", "in.tftpd (MB/s)", "trustcap / in.tftpd", "same, per round (median)"):
        table.add_column(col, justify="right")
    for bs, ours, hpa, paired in rows:
        table.add_row(str(bs), f"{ours:.2f}", f"{hpa:.2f}", f"{ours / hpa:.2f}x", f"{paired:.2f}x")
    console.print(table)
    if args.quick or args.no_boot:
        return 0
    direct_s, pxe_s, enrol_s, reboot_s, info = bench_boot(420)
    if direct_s is None and pxe_s is None and info not in ("tcg", "kvm"):
        console.print(f"boot bench skipped: {info}")
        return 0
    boot = Table(title=f"Boot time, power-on -> init reports booted ({info})")
    for col in ("path", "seconds", "ratio to direct"):
        boot.add_column(col, justify="right")

    def fmt(v: float | None) -> str:
        return f"{v:.1f}" if v is not None else "timeout"

    boot.add_row("direct -kernel/-initrd (baseline)", fmt(direct_s), "1.00x")
    ratio = f"{pxe_s / direct_s:.2f}x" if pxe_s and direct_s else "-"
    boot.add_row("PXE: DHCP + TFTP script + HTTP kernel/initrd", fmt(pxe_s), ratio)
    ratio = f"{enrol_s / direct_s:.2f}x" if enrol_s and direct_s else "-"
    boot.add_row("PXE, then the agent enrolled with its gateway", fmt(enrol_s), ratio)
    console.print(boot)
    wipe = Table(title="Reboot wipe: request -> reset -> PXE -> new key enrolled and quoted, proof signed")
    for col in ("path", "seconds", "ratio to the first PXE boot to enrolled"):
        wipe.add_column(col, justify="right")
    wipe.add_row("first power-on -> agent enrolled (baseline)", fmt(enrol_s), "1.00x")
    ratio = f"{reboot_s / enrol_s:.2f}x" if reboot_s and enrol_s else "-"
    wipe.add_row("reboot wipe (gateway/boot.py Rebooter)", fmt(reboot_s), ratio)
    console.print(wipe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
