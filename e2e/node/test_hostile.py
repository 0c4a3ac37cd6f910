"""The hostile-capsule battery: every attempt is STOPPED (it fails, seen from inside and from outside) and
REPORTED (a violation in the run result, from the kernel's seccomp audit, the run's syscall-exit audit
rules, the pids/memory cgroup, or the gateway's nftables counters). Each class has a positive control in
the same run, so a broken sandbox that simply runs nothing cannot pass; and a normal capsule (Python
importing modules, writing scratch) is proven to yield no violation at all (no noise).

Real Docker Engine, real namespaces, real nftables; run as root (CI does).
"""

from __future__ import annotations

import re
import subprocess
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from trustcap.agent.executor import Executor, RunResult
from trustcap.agent.isolation import IsolationSpec, parse_endpoint
from trustcap.gateway.egress import LinkAttacher

pytestmark = pytest.mark.usefixtures("no_leftovers")

CONTROL = "echo control > /scratch/ok && cat /scratch/ok && hostile true"


def _run(docker_engine: Any, scratch_root: Path, image: str, script: str, *, attacher: Any = None,
         egress: tuple[str, ...] = (), **kw: Any) -> RunResult:
    spec = IsolationSpec(image=image, command=("sh", "-c", script), egress=tuple(parse_endpoint(e) for e in egress),
                         **{"timeout_s": 30, "on_violation": "report", **kw})
    result = Executor(docker_engine, scratch_root=scratch_root, attacher=attacher).run(spec)
    assert result.wipe["verified"], f"every run must end wiped and verified: {result.wipe}"
    return result


def _kinds(result: RunResult) -> set[str]:
    return {v.kind for v in result.violations}


def _audited(result: RunResult, kind: str) -> list[str]:
    """What the kernel's audit rules saw attempted, of one kind (each names the path)."""
    assert result.reporting == {"status": "full", "reasons": []}, result.reporting
    return [v.attempted for v in result.violations if v.kind == kind and v.source == "audit"]


def _our_audit_rules() -> list[str]:
    out = subprocess.run(["auditctl", "-l"], capture_output=True, text=True, timeout=30, check=True).stdout
    return [line for line in out.splitlines() if "trustcap-" in line]


@pytest.mark.parametrize(("action", "inside", "kind"), [
    pytest.param("mount", "mount rc=-1 errno=Operation not permitted", "mount", id="mount"),
    # EPERM, or ENOSYS on a kernel built without module support: refused either way
    pytest.param("module", "init_module rc=-1 errno=", "module", id="kernel-module"),
    pytest.param("rawsock", "raw socket rc=-1 errno=Operation not permitted", "socket", id="raw-socket"),
    pytest.param("packetsock", "packet socket rc=-1 errno=Operation not permitted", "socket", id="packet-socket"),
    pytest.param("blockdev", "mknod /scratch/blk b 7 0 rc=-1 errno=Operation not permitted", "device",
                 id="block-device"),
    pytest.param("setuid", "setuid(0) rc=-1 errno=Operation not permitted", "privilege", id="setuid-binary"),
])
def test_denied_call_is_stopped_and_reported(docker_engine: Any, hostile_image: str, scratch_root: Path,
                                             action: str, inside: str, kind: str) -> None:
    r = _run(docker_engine, scratch_root, hostile_image, f"{CONTROL}; hostile {action}; echo status=$?")
    assert "control" in r.stdout and "helper ran" in r.stdout, f"positive control failed: {r.stdout} {r.stderr}"
    assert inside in r.stdout, r.stdout
    assert "status=0" in r.stdout, f"the forbidden call succeeded: {r.stdout}"
    assert kind in _kinds(r), f"attempt not reported: {r.violations}"
    assert r.reason == "completed"
    if action == "setuid":  # the run's own (non-root) uid before and after: the setuid bit granted nothing
        before, after = re.findall(r"euid(?:-after)?=(\d+)", r.stdout)
        assert before == after and int(after) >= 1_000_000_000, r.stdout


@pytest.mark.usefixtures("kernel_audit")
def test_normal_capsule_yields_no_violation(docker_engine: Any, hostile_image: str, scratch_root: Path) -> None:
    """Positive control for the audit rules: a program that imports modules, looks for files that are not
    there (ENOENT on every start-up), reads /dev/null and /dev/urandom and writes scratch is not reported."""
    program = ("import os, re, collections, hashlib, struct, functools; "
               "open('/scratch/out', 'w').write(hashlib.sha256(os.urandom(8)).hexdigest()); "
               "os.makedirs('/scratch/a/b'); os.rename('/scratch/out', '/scratch/a/b/out'); "
               "print('py', len(open('/scratch/a/b/out').read()), os.path.exists('/etc/nonexistent'))")
    r = _run(docker_engine, scratch_root, hostile_image,
             f'python3 -c "{program}"; cat /dev/null; head -c 4 /dev/urandom >/dev/null; ls /nonexistent 2>/dev/null;'
             " echo sh > /scratch/sh && cat /scratch/sh")
    assert "py 64 False" in r.stdout and "sh" in r.stdout, (r.stdout, r.stderr)
    assert r.violations == [], r.violations
    assert r.reporting == {"status": "full", "reasons": []}, r.reporting


@pytest.mark.usefixtures("kernel_audit")
def test_block_device_open_is_stopped_and_reported(docker_engine: Any, hostile_image: str,
                                                   scratch_root: Path) -> None:
    """Stopped: no device node exists (ENOENT). Reported: the run's audit rule on failed opens, each with
    the path, however it was spelled (relative to the cwd, doubled slashes, through /proc/self/root)."""
    r = _run(docker_engine, scratch_root, hostile_image,
             f"{CONTROL}; hostile blockdev; cd /scratch && cat ../dev/sdb; cat //dev/./sdc /proc/self/root/dev/sdd; "
             "ls /dev")
    assert "helper ran" in r.stdout, r.stdout
    devs = ("/dev/sda", "/dev/vda", "/dev/nvme0n1", "/dev/loop0", "/dev/mmcblk0")
    for dev in devs:
        assert f"open {dev} rc=-1 errno=No such file or directory" in r.stdout, r.stdout
    assert "loop" not in r.stdout.split("errno")[-1]
    seen = _audited(r, "device")
    for dev in (*devs, "/dev/sdb", "/dev/sdc", "/dev/sdd"):
        assert any(f" {dev} by " in a for a in seen), (dev, seen)
    assert any(a.startswith("openat /dev/sda by hostile (/usr/local/bin/hostile)") for a in seen), seen


@pytest.mark.parametrize(("action", "kind"), [
    pytest.param("ptrace", "ptrace", id="ptrace"),
    pytest.param("userns", "namespace", id="user-namespace"),
])
def test_uncovered_call_kills_the_process_and_is_reported(docker_engine: Any, hostile_image: str,
                                                          scratch_root: Path, action: str, kind: str) -> None:
    r = _run(docker_engine, scratch_root, hostile_image, f"{CONTROL}; hostile {action}; echo status=$?")
    assert "helper ran" in r.stdout
    assert "status=159" in r.stdout, f"expected SIGSYS (128+31): {r.stdout}"
    assert kind in _kinds(r), r.violations


@pytest.mark.usefixtures("kernel_audit")
def test_write_outside_scratch_is_stopped_and_reported(docker_engine: Any, hostile_image: str,
                                                       scratch_root: Path) -> None:
    """Stopped by the read-only root (EROFS); reported by the run's audit rule on EROFS, with the path: the
    file for an existing one, its directory for a new one (the kernel records no more for a create)."""
    r = _run(docker_engine, scratch_root, hostile_image,
             "echo ok > /scratch/in && cat /scratch/in; for p in /etc/evil /usr/evil /evil /tmp/evil /var/evil; "
             "do echo x > $p || echo blocked $p; done; echo x >> /etc/passwd || echo blocked passwd; "
             "chmod 777 /bin/sh || echo blocked chmod; mkdir /opt/x || echo blocked mkdir; "
             "rm -f /etc/hostname || echo blocked rm")
    assert "ok" in r.stdout
    for p in ("/etc/evil", "/usr/evil", "/evil", "/tmp/evil", "/var/evil"):  # noqa: S108 - inside the capsule
        assert f"blocked {p}" in r.stdout, r.stdout
    for what in ("passwd", "chmod", "mkdir", "rm"):
        assert f"blocked {what}" in r.stdout, r.stdout
    assert "Read-only file system" in r.stderr
    seen = _audited(r, "write")
    for expected in ("openat entry in /etc/ by sh", "openat entry in /usr/ by sh",
                     "openat entry in / by sh", "openat entry in /tmp/ by sh",
                     "openat entry in /var/ by sh",
                     "openat /etc/passwd by sh (/usr/bin/dash)", "fchmodat /bin/sh by chmod",
                     "mkdir entry in /opt/ by mkdir", "unlinkat entry in /etc/ by rm"):
        assert any(a.startswith(expected) for a in seen), (expected, seen)
    assert "ok" not in " ".join(seen) and "/scratch" not in " ".join(seen)  # scratch writes are not attempts
    after = _run(docker_engine, scratch_root, hostile_image, "ls /etc/evil /usr/evil /evil /tmp/evil 2>&1 || true")
    assert after.stdout.count("No such file") == 4, after.stdout


@pytest.mark.usefixtures("kernel_audit")
def test_write_through_the_i386_abi_is_reported(docker_engine: Any, hostile_image: str, scratch_root: Path) -> None:
    """A 64-bit process can make i386 syscalls (int 0x80), which b64 audit rules do not see: the run's b32
    rules must report it (an evasion attempt, not a curiosity)."""
    r = _run(docker_engine, scratch_root, hostile_image, f"{CONTROL}; hostile write32; echo status=$?")
    assert "helper ran" in r.stdout and "open32 /etc/evil32 rc=-30" in r.stdout, r.stdout  # -EROFS: stopped
    assert "status=0" in r.stdout, r.stdout
    seen = _audited(r, "write")
    assert "open entry in /etc/ by hostile (/usr/local/bin/hostile)" in seen, seen


@pytest.mark.usefixtures("kernel_audit")
def test_audit_rules_live_only_during_their_run(docker_engine: Any, hostile_image: str, scratch_root: Path) -> None:
    """The run's rules are in the kernel while it runs (seen from outside) and gone after, also after a run
    that failed to start; the next run's rules carry its own key (nothing leaks between runs)."""
    assert _our_audit_rules() == []
    during: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set() and not during:
            during.extend(_our_audit_rules())
            done.wait(0.1)

    t = threading.Thread(target=watch)
    t.start()
    try:
        r = _run(docker_engine, scratch_root, hostile_image, "sleep 3; echo x > /etc/evil")
    finally:
        done.set()
        t.join(timeout=30)
    assert during and all(f"trustcap-{r.run_id}" in line for line in during), during
    assert any("exit=-EROFS" in line and "arch=b64" in line for line in during), during
    assert _our_audit_rules() == []
    failed = _run(docker_engine, scratch_root, hostile_image, "exec /no/such/binary")
    assert failed.reason == "error" or failed.exit_code != 0, failed
    assert _our_audit_rules() == []
    assert _audited(r, "write") and failed.run_id != r.run_id


def test_fork_bomb_hits_the_pids_limit_and_is_reported(docker_engine: Any, scratch_root: Path,
                                                       hostile_image: str) -> None:
    bomb = textwrap.dedent("""
        import os, time
        ok = failed = 0
        for _ in range(300):
            try:
                pid = os.fork()
            except OSError:
                failed += 1
                continue
            if pid == 0:
                time.sleep(2)
                os._exit(0)
            ok += 1
        print("forked", ok, "failed", failed, flush=True)
    """)
    r = _run(docker_engine, scratch_root, hostile_image, f"python3 -c '{bomb}'", pids_limit=32, timeout_s=20)
    forked, failed = (int(x) for x in r.stdout.split()[1::2])
    assert 0 < forked < 32 and failed > 0, r.stdout
    assert "pids" in _kinds(r), r.violations


def test_memory_bomb_is_oom_killed(docker_engine: Any, scratch_root: Path, hostile_image: str) -> None:
    r = _run(docker_engine, scratch_root, hostile_image,
             "python3 -c 'b = bytearray(8 << 20); print(\"control\", flush=True); x = b\"x\" * (512 << 20); "
             "print(\"survived\")'", memory_bytes=64 * 1024 * 1024)
    assert "control" in r.stdout and "survived" not in r.stdout
    assert r.reason == "oom" and "memory" in _kinds(r), (r.reason, r.violations)


def test_infinite_loop_times_out(docker_engine: Any, scratch_root: Path, hostile_image: str) -> None:
    r = _run(docker_engine, scratch_root, hostile_image, "echo started; while :; do :; done", timeout_s=2)
    assert "started" in r.stdout
    assert r.reason == "timeout" and r.exit_code == 137


def test_next_run_cannot_read_leftovers(docker_engine: Any, scratch_root: Path, hostile_image: str) -> None:
    first = _run(docker_engine, scratch_root, hostile_image,
                 "echo TOPSECRET-leftover > /scratch/secret; echo TOPSECRET-leftover > /dev/shm/s; cat /scratch/secret")
    assert "TOPSECRET-leftover" in first.stdout  # positive control: it was written
    scratch_proof = next(i for i in first.wipe["items"] if i["what"] == "scratch")
    assert scratch_proof["verified"] and scratch_proof["digest_before"] != scratch_proof["digest_after"]
    second = _run(docker_engine, scratch_root, hostile_image,
                  "ls -A /scratch /dev/shm; grep -rs TOPSECRET /scratch /dev/shm /tmp /var/tmp; echo searched")
    assert "searched" in second.stdout and "TOPSECRET" not in second.stdout, second.stdout
    assert first.wipe["state_restored"] and second.wipe["state_restored"]


def test_a_call_the_allowlist_does_not_name_is_refused(docker_engine: Any, scratch_root: Path,
                                                       hostile_image: str) -> None:
    """Issue 12 item 20: the profile is an allowlist. personality(ADDR_NO_RANDOMIZE) needs no capability,
    so a denylist over allow-all lets a capsule turn off its own ASLR; Docker's default (and ours) refuse it.
    Positive control: the personality query Docker's default allows still answers."""
    r = _run(docker_engine, scratch_root, hostile_image,
             f"{CONTROL}; hostile persona; echo query=$?; hostile noaslr; echo status=$?")
    assert "helper ran" in r.stdout and "query=0" in r.stdout, f"positive control failed: {r.stdout} {r.stderr}"
    assert "personality(ADDR_NO_RANDOMIZE) rc=-1 errno=Operation not permitted" in r.stdout, r.stdout
    assert "status=0" in r.stdout, f"the call the allowlist does not name succeeded: {r.stdout}"
    assert r.reason == "completed"


def test_policy_stop_kills_the_run_on_first_violation(docker_engine: Any, scratch_root: Path,
                                                      hostile_image: str) -> None:
    r = _run(docker_engine, scratch_root, hostile_image, "hostile mount; sleep 25; echo finished",
             on_violation="stop")
    assert r.reason == "killed-by-policy" and "finished" not in r.stdout
    assert "mount" in _kinds(r)
    assert r.seconds < 20


def test_inet_socket_without_declared_egress_is_reported(docker_engine: Any, scratch_root: Path,
                                                         hostile_image: str) -> None:
    r = _run(docker_engine, scratch_root, hostile_image,
             "python3 -c 'import socket; s = socket.socket(); print(s.connect_ex((\"198.18.1.1\", 8080)))'")
    assert r.stdout.strip() == "101", r.stdout  # ENETUNREACH: network none has no route at all
    assert "socket" in _kinds(r)


_NET = textwrap.dedent("""
    import socket, struct
    def gw():
        for line in open("/proc/net/route").read().splitlines()[1:]:
            f = line.split()
            if f[1] == "00000000":
                return socket.inet_ntoa(struct.pack("<L", int(f[2], 16)))
    def tcp(h, p):
        s = socket.socket(); s.settimeout(1.5)
        try:
            s.connect((h, p)); print("CONNECTED", h, p, s.recv(64).decode(), flush=True)
        except OSError as e:
            print("BLOCKED", h, p, type(e).__name__, flush=True)
    def udp(h, p):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        query = bytes.fromhex("123401000001000000000000") + b"\\x07example\\x03com\\x00" + bytes.fromhex("00010001")
        s.sendto(query, (h, p))
        s.settimeout(1.5)
        try:
            s.recv(512); print("ANSWERED", h, p, flush=True)
        except OSError as e:
            print("BLOCKED", h, p, type(e).__name__, flush=True)
    tcp("198.18.1.1", 8080)
""")


@pytest.mark.parametrize(("attack", "attempted", "blocked"), [
    pytest.param('tcp("198.18.1.2", 9090)', "tcp 198.18.1.2:9090", "BLOCKED 198.18.1.2 9090", id="undeclared-host"),
    pytest.param('udp("198.18.1.53", 53)', "udp 198.18.1.53:53", "BLOCKED 198.18.1.53 53", id="dns-lookup"),
    pytest.param('tcp(gw(), 7000)', "tcp {gw}:7000", "BLOCKED {gw} 7000", id="gateway-services"),
])
def test_network_attempt_is_stopped_and_reported(docker_engine: Any, hostile_image: str, scratch_root: Path,
                                                 netlab: Any, attack: str, attempted: str, blocked: str) -> None:
    attacher = LinkAttacher(gateway_netns=netlab.gw)
    r = _run(docker_engine, scratch_root, hostile_image, f"python3 -c '{_NET}\n{attack}'", attacher=attacher,
             egress=(netlab.declared,))
    gw = r.egress["gateway_addr"]
    # positive control: the declared endpoint IS reachable, seen from inside and by the listener outside
    assert "CONNECTED 198.18.1.1 8080 hello-from-8080" in r.stdout, (r.stdout, r.stderr, r.error)
    assert any(h.startswith("tcp 198.18.1.1:8080") for h in netlab.hits())
    # stopped: from inside, and no listener outside saw anything else
    assert blocked.format(gw=gw) in r.stdout, r.stdout
    assert all(h.startswith("tcp 198.18.1.1:8080") for h in netlab.hits()), netlab.hits()
    # reported: the gateway's own nftables attempts set and counters, read back from the kernel
    assert attempted.format(gw=gw) in {v.attempted for v in r.violations if v.source == "nftables"}, r.violations
    counters = r.egress["counters"]
    assert counters["allowed"]["packets"] >= 1
    assert counters["denied"]["packets"] + counters["denied_gateway"]["packets"] >= 1
