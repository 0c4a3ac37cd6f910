"""A lab HPC link on one machine: network namespaces, a bridge, a tap and a PXE-booting qemu.

Test support for the e2e suite and the bench, outside the production packages: no gateway uses it.
Importable by its unique name from any e2e folder, like netlab. Topology (all made here, all removed by
`close()`, also after a failure):

    netns <gw>:   nbgw0 10.77.0.1/24  <- the gateway's boot services bind here
                    | veth
    netns <link>: nbl0 --- br0 --- tap0 <- qemu-system-x86_64 (-boot n, e1000, iPXE ROM)

The HPC's only link is the bridge, whose only other member is the gateway: it reaches nothing else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as the lab's --reboot-command: safe-path mode leaves this folder off sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from netlab import in_netns

__all__ = ["LabLink", "QemuHpc", "in_netns", "power_cycle", "qemu_available", "qmp_system_reset"]

GW_IP = "10.77.0.1"
HPC_MAC = "52:54:00:7c:00:01"


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=15, check=check)


def qemu_available() -> str | None:
    """None when qemu can run here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "network namespaces and taps need root"
    for tool in ("qemu-system-x86_64", "ip", "dnsmasq"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed"
    if not Path("/usr/lib/ipxe/qemu/efi-e1000.rom").exists() and not Path("/usr/lib/ipxe/qemu/pxe-e1000.rom").exists():
        return "ipxe-qemu ROMs are not installed"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing"
    return None


class LabLink:
    def __init__(self, tag: str | None = None) -> None:
        tag = tag or str(os.getpid())
        self.gw_ns = f"tcnb-gw-{tag}"
        self.link_ns = f"tcnb-link-{tag}"
        self.gw_ip = GW_IP
        self.gw_if = "nbgw0"

    def __enter__(self) -> LabLink:
        try:
            self.create()
        except Exception:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self) -> None:
        _ip("netns", "add", self.gw_ns)
        _ip("netns", "add", self.link_ns)
        _ip("link", "add", self.gw_if, "type", "veth", "peer", "name", "nbl0", "netns", self.link_ns, ns=self.gw_ns)
        _ip("addr", "add", f"{self.gw_ip}/24", "dev", self.gw_if, ns=self.gw_ns)
        _ip("link", "set", self.gw_if, "up", ns=self.gw_ns)
        _ip("link", "set", "lo", "up", ns=self.gw_ns)
        _ip("link", "add", "br0", "type", "bridge", ns=self.link_ns)
        _ip("link", "set", "br0", "type", "bridge", "forward_delay", "0", ns=self.link_ns)
        _ip("tuntap", "add", "dev", "tap0", "mode", "tap", ns=self.link_ns)
        for dev in ("nbl0", "tap0"):
            _ip("link", "set", dev, "master", "br0", ns=self.link_ns)
            _ip("link", "set", dev, "up", ns=self.link_ns)
        _ip("link", "set", "br0", "up", ns=self.link_ns)

    def close(self) -> None:
        for ns in (self.link_ns, self.gw_ns):
            _ip("netns", "del", ns, check=False)

    def in_gw(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.gw_ns, *cmd]


class QemuHpc:
    """A diskless qemu PC on the lab tap that boots from the network; serial console to `serial_log`."""

    def __init__(self, lab: LabLink, serial_log: Path, accel: str | None = None, memory_mb: int = 512,
                 qmp: Path | None = None) -> None:
        self.lab = lab
        self.serial_log = serial_log
        self.accel = accel or os.environ.get("TRUSTCAP_QEMU_ACCEL", "tcg")
        self.memory_mb = memory_mb
        self.qmp = qmp  # with a QMP socket the PC can be reset (the lab's power cycle); else it exits on reboot
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> QemuHpc:
        cmd = [
            "ip", "netns", "exec", self.lab.link_ns, "qemu-system-x86_64",
            # -nographic makes SeaBIOS and iPXE print on the serial port too (sercon), so a refused
            # boot is visible in the log, not only on a VGA screen nobody reads.
            "-accel", self.accel, "-m", str(self.memory_mb), "-nographic", "-nodefaults",
            *(["-qmp", f"unix:{self.qmp},server=on,wait=off"] if self.qmp else ["-no-reboot"]),
            "-monitor", "none", "-serial", f"file:{self.serial_log}",
            "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
            "-device", f"e1000,netdev=n0,mac={HPC_MAC}", "-boot", "n",
        ]
        self.serial_log.write_bytes(b"")
        self.started_at = time.monotonic()
        with open(self.serial_log.with_suffix(".qemu.log"), "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        return self

    def wait_for(
        self, markers: tuple[str, ...], timeout: float, alive: subprocess.Popen[str] | None = None
    ) -> str | None:
        """The first marker that appears on the serial console within `timeout` seconds, else None (also
        at once when qemu, or the `alive` process that serves the boot, has exited)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if alive is not None and alive.poll() is not None:
                alive = None
                deadline = min(deadline, time.monotonic() + 20)  # what was served may still finish
            text = self.serial_log.read_text(errors="replace") if self.serial_log.exists() else ""
            for m in markers:
                if m in text:
                    return m
            if self.proc and self.proc.poll() is not None:
                return None
            time.sleep(0.25)
        return None

    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def qmp_system_reset(socket_path: Path, timeout: float = 10.0) -> None:
    """Press the qemu PC's reset button over QMP: the lab's stand-in for the Pi's power-cycle relay.

    A reset reboots the PC into its firmware, which PXE-boots again; unlike a real power cycle it does not
    clear the PC's RAM (qemu keeps guest memory across a reset).
    """
    import json
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(socket_path))
        f = s.makefile("rwb")

        def reply() -> dict[str, object]:
            while True:  # skip asynchronous events until the command's answer
                line = f.readline()
                if not line:
                    raise ConnectionError("qemu closed the QMP socket")
                msg: dict[str, object] = json.loads(line)
                if "return" in msg or "error" in msg:
                    return msg

        if "QMP" not in json.loads(f.readline()):
            raise ConnectionError(f"{socket_path} is not a QMP socket")
        for cmd in ("qmp_capabilities", "system_reset"):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            answer = reply()
            if "error" in answer:
                raise RuntimeError(f"qemu refused {cmd}: {answer['error']}")


def power_cycle(socket_path: Path, link_ns: str, off_s: float = 1.0) -> None:
    """The lab's whole power cycle: the PC's NIC loses its carrier (the link's far end of the gateway's
    veth goes down, as a cable to a PC without power does), the PC is reset, and the link returns. The
    gateway sees the carrier drop on its own end (`carrier_changes`), which its reboot proof checks."""
    _ip("link", "set", "nbl0", "down", ns=link_ns)
    try:
        qmp_system_reset(socket_path)
        time.sleep(off_s)
    finally:
        _ip("link", "set", "nbl0", "up", ns=link_ns)


if __name__ == "__main__":  # `python e2e/pxelab.py reset|power-cycle QMP_SOCKET [LINK_NS]`: the --reboot-command
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "reset":
        qmp_system_reset(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "power-cycle":
        power_cycle(Path(sys.argv[2]), sys.argv[3])
    else:
        sys.exit("usage: python e2e/pxelab.py reset QMP_SOCKET | power-cycle QMP_SOCKET LINK_NS")
