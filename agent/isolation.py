"""The isolation a capsule runs under, as one validated spec and the Docker settings it becomes.

Why each setting (docs/decisions/0040-capsule-isolation.md):
- no network namespace links but the one the executor attaches (none, or a veth whose far end is the
  gateway, where nftables allow only the declared endpoints);
- read-only root, no devices, every capability dropped, no-new-privileges, a non-root user: the
  function can change nothing it was not given, and a setuid binary grants nothing;
- our seccomp profile (a data file, `seccomp.json`) on top, an allowlist (a call it does not name fails
  with EPERM, as under Docker's default profile; decision 0093): mount, kexec, module loading, raw and packet
  sockets and privilege changes fail (no capability) *and are logged by the kernel*; ptrace, namespace
  creation, bpf and the like kill the process (logged). The log is how the executor learns of an attempt;
- pids/memory/CPU limits with swap off (memswap == memory) so a bomb hits a wall, not the node;
- scratch is the only writable place, mounted noexec,nosuid,nodev with a size cap;
- a hard timeout (the seed's stand-in for a gas limit) and capped output.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from trustcap.agent.errors import IsolationError

__all__ = ["CAPSULE_USER", "SCRATCH_PATH", "Endpoint", "IsolationSpec", "parse_endpoint", "seccomp_profile"]

SCRATCH_PATH = "/scratch"
CAPSULE_USER = "65534:65534"  # nobody:nogroup; exists in every Debian image
_AF_UNIX, _AF_INET, _AF_INET6, _AF_PACKET = 1, 2, 10, 17
_SOCK_STREAM, _SOCK_DGRAM, _SOCK_RAW, _SOCK_SEQPACKET, _SOCK_TYPE_MASK = 1, 2, 3, 5, 0xF
_SOCK_TYPES_ALLOWED = {_AF_UNIX: (_SOCK_STREAM, _SOCK_DGRAM, _SOCK_SEQPACKET),
                       _AF_INET: (_SOCK_STREAM, _SOCK_DGRAM), _AF_INET6: (_SOCK_STREAM, _SOCK_DGRAM)}
_PERSONAS_ALLOWED = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
_CLONE_NS_FLAGS = {
    "CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
_ENOSYS = 38


@dataclass(frozen=True)
class Endpoint:
    """A declared egress endpoint: an IP address (no names: DNS would itself be egress) and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """Parse `HOST:PORT` / `[V6]:PORT`; HOST must be an IP literal, PORT 1..65535."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text.strip())
    if not m:
        raise IsolationError(f"egress endpoint {text!r}: expected HOST:PORT (IPv6 as [ADDR]:PORT)")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    try:
        addr = ipaddress.ip_address(host)
    except ValueError as exc:
        raise IsolationError(f"egress endpoint {text!r}: host must be an IP address, not a name "
                             "(a name lookup is itself egress)") from exc
    if not 1 <= port <= 65535:
        raise IsolationError(f"egress endpoint {text!r}: port {port} is outside 1..65535")
    return Endpoint(str(addr), port)


@dataclass(frozen=True)
class IsolationSpec:
    """Everything that decides how one capsule run is confined. Validated on construction."""

    image: str
    command: tuple[str, ...]
    egress: tuple[Endpoint, ...] = ()
    timeout_s: float = 60.0
    memory_bytes: int = 256 * 1024 * 1024
    nano_cpus: int = 1_000_000_000
    pids_limit: int = 64
    scratch_bytes: int = 64 * 1024 * 1024
    output_tail_bytes: int = 4096
    log_max_bytes: int = 1024 * 1024
    user: str = CAPSULE_USER
    on_violation: str = "stop"
    env: dict[str, str] = field(default_factory=dict)
    keep_logs: bool = True  # False: log driver none, stdout/stderr never reach the host's disk (capsule runs)

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("image", bool(self.image) and not self.image.startswith("-"), "must name an image"),
            ("command", len(self.command) > 0, "must not be empty"),
            ("timeout_s", 0 < self.timeout_s <= 86_400, "must be in (0, 86400] seconds"),
            ("memory_bytes", self.memory_bytes >= 6 * 1024 * 1024, "must be at least 6 MiB (Docker minimum)"),
            ("nano_cpus", self.nano_cpus > 0, "must be positive"),
            ("pids_limit", 1 <= self.pids_limit <= 4096, "must be in 1..4096"),
            ("scratch_bytes", 1024 * 1024 <= self.scratch_bytes <= 64 * 1024**3, "must be in 1 MiB..64 GiB"),
            ("output_tail_bytes", 0 <= self.output_tail_bytes <= 1024 * 1024, "must be in 0..1 MiB"),
            ("user", self.user not in ("", "0", "root") and not self.user.startswith("0:"), "must not be root"),
            ("on_violation", self.on_violation in ("stop", "report"), "must be 'stop' or 'report'"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise IsolationError(f"isolation spec field {name!r}={getattr(self, name)!r}: {why}")

    def container_settings(self) -> dict[str, Any]:
        """Keyword arguments for `client.containers.create` (network, scratch and seccomp added by the caller)."""
        return {
            "image": self.image,
            "command": list(self.command),
            "user": self.user,
            "environment": dict(self.env),
            "working_dir": SCRATCH_PATH,
            "read_only": True,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges:true"],
            "devices": [],
            "privileged": False,
            "pids_limit": self.pids_limit,
            "mem_limit": self.memory_bytes,
            "memswap_limit": self.memory_bytes,  # == mem_limit: no swap
            "mem_swappiness": 0,
            "nano_cpus": self.nano_cpus,
            "ipc_mode": "private",
            "shm_size": 1024 * 1024,
            "init": False,
            "stdin_open": False,
            "tty": False,
            "log_config": {"type": "json-file",
                           "config": {"max-size": str(self.log_max_bytes), "max-file": "1"}}
            if self.keep_logs else {"type": "none", "config": {}},
            "labels": {"io.trustcap.run": "1"},
        }


def seccomp_profile(*, allow_inet: bool) -> str:
    """Our profile as the JSON text Docker takes in `security_opt`, with the run-time socket/clone rules."""
    base: dict[str, Any] = json.loads(resources.files("trustcap.agent").joinpath("seccomp.json").read_text())
    base.pop("comment", None)
    rules: list[dict[str, Any]] = [dict(r) for r in base["syscalls"]]
    for r in rules:
        r.pop("comment", None)
    # The profile is an allowlist (defaultAction ERRNO): socket, clone and personality are allowed only
    # with the arguments below, every other argument falls to the default and fails with EPERM.
    # Raw/packet sockets need CAP_NET_RAW (dropped): the kernel refuses them, the LOG action reports them.
    # Without declared egress, inet sockets open but have no route (network none): logged as attempts.
    log_ = {"action": "SCMP_ACT_LOG"}
    kill = {"action": "SCMP_ACT_KILL_PROCESS"}
    allow = {"action": "SCMP_ACT_ALLOW"}
    rules.append({"names": ["socket"], **log_, "args": [{"index": 0, "value": _AF_PACKET, "op": "SCMP_CMP_EQ"}]})
    rules.append({"names": ["socket"], **log_, "args": [
        {"index": 1, "value": _SOCK_TYPE_MASK, "valueTwo": _SOCK_RAW, "op": "SCMP_CMP_MASKED_EQ"}]})
    families = (_AF_UNIX, _AF_INET, _AF_INET6) if allow_inet else (_AF_UNIX,)
    for family in families:
        for kind in _SOCK_TYPES_ALLOWED[family]:
            rules.append({"names": ["socket"], **allow, "args": [
                {"index": 0, "value": family, "op": "SCMP_CMP_EQ"},
                {"index": 1, "value": _SOCK_TYPE_MASK, "valueTwo": kind, "op": "SCMP_CMP_MASKED_EQ"}]})
    if not allow_inet:
        for family in (_AF_INET, _AF_INET6):
            rules.append({"names": ["socket"], **log_,
                          "args": [{"index": 0, "value": family, "op": "SCMP_CMP_EQ"}]})
    all_ns = 0
    for flag in _CLONE_NS_FLAGS.values():
        all_ns |= flag
        rules.append({"names": ["clone"], **kill,
                      "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}]})
    # a thread or a fork: no namespace flag at all
    rules.append({"names": ["clone"], **allow,
                  "args": [{"index": 0, "value": all_ns, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]})
    # clone3 passes its flags in memory seccomp cannot read: ENOSYS makes libc fall back to clone().
    rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": _ENOSYS})
    # personality: only the values Docker's default allows (query, Linux, 32-bit Linux); not
    # ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC and the other flags that weaken the process's own defences.
    for persona in _PERSONAS_ALLOWED:
        rules.append({"names": ["personality"], **allow,
                      "args": [{"index": 0, "value": persona, "op": "SCMP_CMP_EQ"}]})
    base["syscalls"] = rules
    return json.dumps(base, separators=(",", ":"))


# Syscall numbers (x86_64) of the calls the profile denies, to name them in violation reports.
SYSCALL_KIND_X86_64: dict[int, tuple[str, str]] = {
    165: ("mount", "mount"), 166: ("mount", "umount2"), 155: ("mount", "pivot_root"), 161: ("mount", "chroot"),
    101: ("ptrace", "ptrace"), 310: ("ptrace", "process_vm_readv"), 311: ("ptrace", "process_vm_writev"),
    246: ("kexec", "kexec_load"), 320: ("kexec", "kexec_file_load"), 169: ("kexec", "reboot"),
    175: ("module", "init_module"), 313: ("module", "finit_module"), 176: ("module", "delete_module"),
    105: ("privilege", "setuid"), 106: ("privilege", "setgid"), 113: ("privilege", "setreuid"),
    114: ("privilege", "setregid"), 117: ("privilege", "setresuid"), 119: ("privilege", "setresgid"),
    116: ("privilege", "setgroups"), 122: ("privilege", "setfsuid"), 123: ("privilege", "setfsgid"),
    126: ("privilege", "capset"), 41: ("socket", "socket"), 56: ("namespace", "clone"),
    435: ("namespace", "clone3"), 272: ("namespace", "unshare"), 308: ("namespace", "setns"),
    321: ("kernel", "bpf"), 298: ("kernel", "perf_event_open"), 133: ("device", "mknod"),
    259: ("device", "mknodat"), 250: ("kernel", "keyctl"), 103: ("kernel", "syslog"),
    304: ("kernel", "open_by_handle_at"), 167: ("kernel", "swapon"), 168: ("kernel", "swapoff"),
}
