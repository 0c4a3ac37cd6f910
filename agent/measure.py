"""Real measurements of the machine the agent runs on, for its quotes.

Each measurement is a digest ("0x" + sha256) of a canonical, sorted reading, so equal states give equal
values and a policy can pin them per node (Keylime #491: compare each machine with its own enrolment).
Volatile things (pids, counters, timestamps) are left out of the readings on purpose: the processes
reading is the set of executables, not pids; sockets are listening endpoints, and connected peers
separately. The hardware fingerprint is an OpenZeppelin-compatible Merkle root (`trustcap.merkle`)
over readings a board swap would change (DMI ids, CPU model, memory size, MACs, PCI/USB ids, disks).
The agent's own configuration is measured too (dstack gateway #119: what decides trust is measured).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from trustcap import merkle

__all__ = ["MEASUREMENTS", "hardware_readings", "measure"]


def _digest(value: Any) -> str:
    return "0x" + hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read(path: str | Path, default: str = "") -> str:
    try:
        return Path(path).read_text(errors="replace").strip()
    except OSError:
        return default


def kernel() -> list[str]:
    return [_read("/proc/version"), _read("/proc/sys/kernel/osrelease")]


def cmdline() -> str:
    # The one-time token is on the command line; it is burnt at enrolment, and only its hash leaves.
    return _read("/proc/cmdline")


def modules() -> list[str]:
    return sorted(line.split()[0] for line in _read("/proc/modules").splitlines() if line.strip())


def processes() -> list[str]:
    exes: set[str] = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                exes.add(os.readlink(d / "exe"))
            except OSError:  # kernel threads and exited processes have no exe
                comm = _read(d / "comm")
                if comm:
                    exes.add(f"[{comm}]")
    return sorted(exes)


def _sockets(states: Iterable[str]) -> list[str]:
    want = set(states)
    out: set[str] = set()
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in _read(f"/proc/net/{proto}").splitlines()[1:]:
            f = line.split()
            if len(f) < 4:
                continue
            local, remote, st = f[1], f[2], f[3]
            if st in want:
                out.add(f"{proto} {local if st in ('0A', '07') else remote}")
    return sorted(out)


def sockets_listening() -> list[str]:
    return _sockets(["0A", "07"])  # TCP LISTEN; UDP unconnected (bound)


def sockets_connected() -> list[str]:
    return _sockets(["01"])  # TCP ESTABLISHED (remote endpoints)


def mounts() -> list[str]:
    rows = []
    for line in _read("/proc/self/mounts").splitlines():
        f = line.split()
        if len(f) >= 4:
            rows.append(f"{f[1]} {f[2]} {f[3]}")
    return sorted(rows)


def block_devices() -> list[str]:
    base = Path("/sys/block")
    return sorted(f"{d.name} {_read(d / 'size')}" for d in base.iterdir()) if base.is_dir() else []


def _bus(path: str, fields: tuple[str, ...]) -> list[str]:
    base = Path(path)
    if not base.is_dir():
        return []
    return sorted(":".join(_read(d / f, "-") for f in fields) for d in base.iterdir())


def pci() -> list[str]:
    return _bus("/sys/bus/pci/devices", ("vendor", "device", "class"))


def usb() -> list[str]:
    return _bus("/sys/bus/usb/devices", ("idVendor", "idProduct"))


def hardware_readings() -> dict[str, str]:
    dmi = Path("/sys/class/dmi/id")
    cpu = next((ln.split(":", 1)[1].strip() for ln in _read("/proc/cpuinfo").splitlines()
                if ln.startswith("model name")), "unknown")
    mem = next((ln.split()[1] for ln in _read("/proc/meminfo").splitlines() if ln.startswith("MemTotal")), "0")
    macs = sorted(f"{d.name}={_read(d / 'address')}" for d in Path("/sys/class/net").iterdir()
                  if (d / "device").exists()) if Path("/sys/class/net").is_dir() else []
    readings = {f"dmi.{n}": _read(dmi / n, "-") for n in ("sys_vendor", "product_name", "product_uuid",
                                                          "board_serial", "board_name")}
    readings.update({"cpu.model": cpu, "cpu.count": str(os.cpu_count() or 0), "memory.total_kib": mem,
                     "net.macs": ",".join(macs), "pci.ids": ",".join(pci()), "usb.ids": ",".join(usb()),
                     "disks": ",".join(block_devices())})
    return readings


def measure(*, scratch_listing: Callable[[], list[str]] | None = None,
            containers: Callable[[], list[str]] | None = None,
            agent_config: dict[str, Any] | None = None) -> dict[str, str]:
    """All measurements, name -> "0x"+sha256 (the fingerprint is its Merkle root)."""
    values: dict[str, Any] = {
        "kernel": kernel(), "cmdline": cmdline(), "modules": modules(), "processes": processes(),
        "sockets_listening": sockets_listening(), "sockets_connected": sockets_connected(),
        "mounts": mounts(), "block_devices": block_devices(), "pci": pci(), "usb": usb(),
        "containers": containers() if containers else [],
        "scratch": scratch_listing() if scratch_listing else [],
        "agent_config": agent_config or {},
    }
    out = {name: _digest(v) for name, v in values.items()}
    out["hw_fingerprint"] = "0x" + merkle.fingerprint(hardware_readings()).hex()
    return out


MEASUREMENTS = ("kernel", "cmdline", "modules", "processes", "sockets_listening", "sockets_connected", "mounts",
                "block_devices", "pci", "usb", "containers", "scratch", "agent_config", "hw_fingerprint")
