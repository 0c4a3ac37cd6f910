"""Real measurements of the machine the agent runs on, for its quotes.

Each measurement is a digest ("0x" + sha256) of a canonical, sorted reading, so equal states give equal
values and a policy can pin them per node (Keylime #491: compare each machine with its own enrolment).
Volatile things are left out of the readings on purpose, because a pinned reading that flaps is a
policy nobody can write:

- processes are the set of executables (not pids), and kernel threads are not processes of the
  machine's software at all: their names carry the workqueue they serve right now
  (`kworker/0:1-events` -> `kworker/0:1-mm_percpu_wq`), so they are left out (the PF_KTHREAD flag in
  /proc/PID/stat); zombies have no executable and are left out too;
- sockets are listening endpoints, and connected peers separately;
- the command line is measured with its secrets redacted (`trustcap.token=` and any `*token=`,
  `*secret=`, `*password=`): a one-time token is different at every boot, so an unredacted digest could
  never be pinned, and a digest of it would let anyone holding a quote confirm a guessed token.

The hardware fingerprint is an OpenZeppelin-compatible Merkle root (`trustcap.merkle`) over readings a
board swap would change (DMI ids, CPU model, memory size, MACs, PCI/USB ids, physical disks). Only
physical, fixed disks count (a `device` link in sysfs, not removable, not a loop/ram/zram/dm/md/nbd...
name): attaching a loop device is a state change the `block_devices` measurement shows, not new
hardware (docs/decisions/0046-stable-measurements.md).

What decides trust is measured too (dstack gateway #119): the agent's own code (every file of the
installed `trustcap.agent` package), its configuration, the container engine's state (running
containers, images by id, volumes, read through the Docker SDK) and the scratch area under the
executor's scratch root (a tree digest: names, types, sizes and content digests). A reading the caller
cannot supply is the string "unmeasured", never the digest of an empty state, so a policy pinned to an
idle node fails closed when a reader is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from trustcap import merkle

__all__ = ["MEASUREMENTS", "UNMEASURED", "agent_code", "cmdline", "docker_state", "hardware_readings",
           "measure", "physical_disks", "processes", "redact_cmdline", "scratch_state"]

UNMEASURED = "unmeasured"
PF_KTHREAD = 0x00200000  # include/linux/sched.h
# Block devices that are software, not hardware: they come and go with what runs on the machine.
VIRTUAL_BLOCK = re.compile(r"^(loop|ram|zram|dm-|md|nbd|rbd|drbd|bcache|pmem|zd|mmcblk\d+boot)")
_SECRET_KEY = re.compile(r"(^|[._-])(token|secret|password|passwd|key)$", re.IGNORECASE)
REDACTED = "<redacted>"
CMDLINE_PATH = Path("/proc/cmdline")
SCRATCH_HASH_LIMIT = 4 * 1024 * 1024  # files above this are measured by size and mode, not content


def _digest(value: Any) -> str:
    return "0x" + hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read(path: str | Path, default: str = "") -> str:
    try:
        return Path(path).read_text(errors="replace").strip()
    except OSError:
        return default


def kernel() -> list[str]:
    return [_read("/proc/version"), _read("/proc/sys/kernel/osrelease")]


def redact_cmdline(text: str) -> str:
    """The command line with every secret-bearing `key=value` value replaced; the key stays visible."""
    words = []
    for word in text.split():
        key, sep, _ = word.partition("=")
        words.append(f"{key}={REDACTED}" if sep and _SECRET_KEY.search(key) else word)
    return " ".join(words)


def cmdline(path: str | Path | None = None) -> str:
    return redact_cmdline(_read(path if path is not None else CMDLINE_PATH))


def modules() -> list[str]:
    return sorted(line.split()[0] for line in _read("/proc/modules").splitlines() if line.strip())


def _stat_fields(d: Path) -> list[str] | None:
    """Fields of /proc/PID/stat after `(comm)` (comm may hold spaces and parentheses): state, ppid, ..."""
    raw = _read(d / "stat")
    end = raw.rfind(")")
    return raw[end + 2:].split() if end >= 0 else None


def _is_kernel_thread(fields: list[str]) -> bool:
    """PF_KTHREAD, not "pid 2 or its children": in a pid namespace pid 2 is an ordinary process."""
    try:
        return bool(int(fields[6]) & PF_KTHREAD)
    except (IndexError, ValueError):
        return False


def processes(proc: Path = Path("/proc")) -> list[str]:
    """Executables of the machine's user-space processes (kernel threads and zombies left out)."""
    exes: set[str] = set()
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        fields = _stat_fields(d)
        if fields is None or _is_kernel_thread(fields) or fields[0] in ("Z", "X"):
            continue  # gone, a kernel thread, or dead: not software the machine runs
        try:
            exes.add(os.readlink(d / "exe"))
        except OSError:  # exited between the two reads, or not ours to read: its name is what we have
            comm = _read(d / "comm")
            if comm and (d / "stat").exists():
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


def block_devices(base: Path = Path("/sys/block")) -> list[str]:
    """Every block device with its size (virtual ones included: a new loop device is a state change)."""
    return sorted(f"{d.name} {_read(d / 'size')}" for d in base.iterdir()) if base.is_dir() else []


def physical_disks(base: Path = Path("/sys/block")) -> list[str]:
    """Disks that are hardware: backed by a device in sysfs, not a software block device. Named by model
    and size, not by kernel name, which depends on probe order."""
    if not base.is_dir():
        return []
    out = []
    for d in base.iterdir():
        if VIRTUAL_BLOCK.match(d.name) or not (d / "device").exists() or _read(d / "removable") == "1":
            continue  # software devices, and removable media (a disc or card is not the machine)
        out.append(f"{_read(d / 'device' / 'model', '-')}:{_read(d / 'size', '0')}")
    return sorted(out)


def _bus(path: str, fields: tuple[str, ...]) -> list[str]:
    base = Path(path)
    if not base.is_dir():
        return []
    return sorted(":".join(_read(d / f, "-") for f in fields) for d in base.iterdir())


def pci() -> list[str]:
    return _bus("/sys/bus/pci/devices", ("vendor", "device", "class"))


def usb() -> list[str]:
    return _bus("/sys/bus/usb/devices", ("idVendor", "idProduct"))


def hardware_readings(sys_block: Path = Path("/sys/block")) -> dict[str, str]:
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
                     "disks": ",".join(physical_disks(sys_block))})
    return readings


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def scratch_state(root: Path) -> list[str]:
    """The tree under the scratch root: path, type, mode, size and (up to a limit) content digest.

    Other filesystems mounted below (a run's scratch device while it runs) are recorded as mount points
    and not entered: the quote must stay cheap and the run's data is the run's, its wipe proves it gone.
    """
    if not root.is_dir():
        return []
    dev = root.stat().st_dev
    rows: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in list(dirnames):
            p = here / name
            st = p.lstat()
            rel = p.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                rows.append(f"link {rel} -> {os.readlink(p)}")
                dirnames.remove(name)
            elif st.st_dev != dev:
                rows.append(f"mount {rel}")
                dirnames.remove(name)
            else:
                rows.append(f"dir {rel} {stat.S_IMODE(st.st_mode):o}")
        for name in filenames:
            p = here / name
            st = p.lstat()
            rel = p.relative_to(root).as_posix()
            mode = f"{stat.S_IMODE(st.st_mode):o}"
            if stat.S_ISLNK(st.st_mode):
                rows.append(f"link {rel} -> {os.readlink(p)}")
            elif stat.S_ISREG(st.st_mode) and st.st_size <= SCRATCH_HASH_LIMIT:
                try:
                    rows.append(f"file {rel} {mode} {st.st_size} {_file_digest(p)}")
                except OSError:
                    rows.append(f"file {rel} {mode} {st.st_size} unreadable")
            else:
                rows.append(f"{'file' if stat.S_ISREG(st.st_mode) else 'special'} {rel} {mode} {st.st_size}")
    return sorted(rows)


def _package_dir() -> Path:
    import trustcap.agent

    return Path(trustcap.agent.__file__).resolve().parent


def agent_code(package_dir: Path | None = None) -> list[str]:
    """Every file of the installed agent package with its sha256 (byte code caches left out: they are
    derived from the sources and rewritten by the interpreter)."""
    base = package_dir or _package_dir()
    rows = []
    for p in sorted(base.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo"):
            rows.append(f"{p.relative_to(base).as_posix()} {_file_digest(p)}")
    return rows


def docker_state(client: Any) -> dict[str, list[str]]:
    """The container engine as a capsule run could change it: running containers (id and image id),
    images by id, volumes by name. Raises the Docker SDK's errors; callers translate them."""
    running = sorted(f"{c.id} {c.attrs.get('Image', '')}" for c in client.containers.list())
    images = sorted(str(i.id) for i in client.images.list(all=True))
    volumes = sorted(str(v.name) for v in client.volumes.list())
    return {"running": running, "images": images, "volumes": volumes}


def measure(*, containers: Callable[[], Any] | None = None, scratch_root: Path | None = None,
            agent_config: dict[str, Any] | None = None,
            code_dir: Path | None = None) -> dict[str, str]:
    """All measurements, name -> "0x"+sha256 (the fingerprint is its Merkle root).

    `containers` reads the engine (see `docker_state`), `scratch_root` is the executor's scratch root;
    either missing gives the reading "unmeasured", which no idle-state policy matches.
    """
    values: dict[str, Any] = {
        "kernel": kernel(), "cmdline": cmdline(), "modules": modules(), "processes": processes(),
        "sockets_listening": sockets_listening(), "sockets_connected": sockets_connected(),
        "mounts": mounts(), "block_devices": block_devices(), "pci": pci(), "usb": usb(),
        "containers": containers() if containers else UNMEASURED,
        "scratch": scratch_state(scratch_root) if scratch_root is not None else UNMEASURED,
        "agent_config": agent_config if agent_config is not None else UNMEASURED,
        "agent_code": agent_code(code_dir),
    }
    out = {name: _digest(v) for name, v in values.items()}
    out["hw_fingerprint"] = "0x" + merkle.fingerprint(hardware_readings()).hex()
    return out


MEASUREMENTS = ("kernel", "cmdline", "modules", "processes", "sockets_listening", "sockets_connected", "mounts",
                "block_devices", "pci", "usb", "containers", "scratch", "agent_config", "agent_code",
                "hw_fingerprint")
