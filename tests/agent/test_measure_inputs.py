"""The agent's measurements that decide trust (issue 4, defects 3-6): each reading is stable where the
machine did not change, changes where it did, and carries no secret.

Readings are taken from trees this test builds (a fake /proc, a fake /sys/block, a scratch root, a copy
of the agent package) where the real one cannot be varied, and from the real machine where it can (a
loop device attached for real, as root).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from trustcap import canonical
from trustcap.agent import measure
from trustcap.agent.identity import BootConfig, BootKey
from trustcap.agent.service import Agent

TOKEN = "Tok3n-one-time-0123456789abcdef"  # noqa: S105 - a test token, not a credential
BOOT = "0x" + "ab" * 32
GATEWAY = "0x" + "11" * 20


class Engine:  # our own reader's collaborator: a fake engine with the SDK's shape
    class containers:
        @staticmethod
        def list() -> list[object]:
            return []

    class images:
        @staticmethod
        def list(all: bool = False) -> list[object]:
            return []

    class volumes:
        @staticmethod
        def list() -> list[object]:
            return []


# --- processes: kernel threads and zombies are not the machine's software (defect 3) --------------------
def _proc_entry(proc: Path, pid: int, comm: str, state: str, ppid: int, flags: int, exe: str | None) -> None:
    d = proc / str(pid)
    d.mkdir()
    (d / "stat").write_text(f"{pid} ({comm}) {state} {ppid} 0 0 0 -1 {flags} 0 0 0 0 0 0 0 0 20 0 1 0\n")
    (d / "comm").write_text(comm + "\n")
    if exe is not None:
        (d / "exe").symlink_to(exe)


@pytest.mark.parametrize(("comm", "state", "ppid", "flags", "exe", "seen"), [
    pytest.param("kworker/0:1-events", "I", 2, 0x04208060, None, False, id="kworker-by-flag"),
    pytest.param("sleep", "S", 2, 0x00400000, "/usr/bin/sleep", True, id="child-of-pid-2-in-a-pid-namespace"),
    pytest.param("odd (name) x", "S", 2, 0x00200040, None, False, id="kthread-with-parens-in-comm"),
    pytest.param("defunct", "Z", 1, 0x00400100, None, False, id="zombie"),
    pytest.param("python3", "S", 1, 0x00400100, "/usr/bin/python3", True, id="user-process"),
    pytest.param("hidden", "S", 1, 0x00400100, None, True, id="user-process-without-readable-exe"),
])
def test_processes_reading_keeps_only_user_space(tmp_path: Path, comm: str, state: str, ppid: int,
                                                  flags: int, exe: str | None, seen: bool) -> None:
    _proc_entry(tmp_path, 1, "init", "S", 0, 0x00400100, "/sbin/init")
    _proc_entry(tmp_path, 3, "kthreadd", "S", 0, 0x00208040, None)
    _proc_entry(tmp_path, 77, comm, state, ppid, flags, exe)
    base = {"/sbin/init"}
    got = set(measure.processes(tmp_path))
    assert (got - base != set()) is seen, got
    assert "[kthreadd]" not in got


def test_a_kernel_thread_changing_its_workqueue_does_not_change_the_reading(tmp_path: Path) -> None:
    _proc_entry(tmp_path, 1, "init", "S", 0, 0x00400100, "/sbin/init")
    _proc_entry(tmp_path, 40, "kworker/0:1-events", "I", 2, 0x04208060, None)
    before = measure.processes(tmp_path)
    (tmp_path / "40" / "stat").write_text("40 (kworker/0:1-mm_percpu_wq) I 2 0 0 0 -1 69238880 0\n")
    (tmp_path / "40" / "comm").write_text("kworker/0:1-mm_percpu_wq\n")
    assert measure.processes(tmp_path) == before == ["/sbin/init"]


# --- hardware fingerprint: only physical, fixed disks (defect 4) -------------------------------------------
def _sys_block(base: Path, name: str, size: int, *, device: bool, model: str = "", removable: bool = False) -> None:
    d = base / name
    d.mkdir(parents=True)
    (d / "size").write_text(f"{size}\n")
    (d / "removable").write_text("1\n" if removable else "0\n")
    if device:
        (d / "device").mkdir()
        if model:
            (d / "device" / "model").write_text(model + "\n")


@pytest.mark.parametrize(("name", "device", "removable"), [
    pytest.param("loop0", False, False, id="loop"),
    pytest.param("ram0", False, False, id="ram"),
    pytest.param("zram0", False, False, id="zram"),
    pytest.param("dm-0", False, False, id="device-mapper"),
    pytest.param("md127", False, False, id="md-raid"),
    pytest.param("nbd3", False, False, id="nbd"),
    pytest.param("loop9", True, False, id="loop-even-with-a-device-link"),
    pytest.param("sr0", True, True, id="removable-optical"),
    pytest.param("sdz", True, True, id="removable-usb-stick"),
    pytest.param("weird0", False, False, id="no-device-link"),
])
def test_software_and_removable_block_devices_are_not_hardware(tmp_path: Path, name: str, device: bool,
                                                               removable: bool) -> None:
    _sys_block(tmp_path, "nvme0n1", 1000215216, device=True, model="Samsung SSD 980")
    base = measure.hardware_readings(tmp_path)["disks"]
    _sys_block(tmp_path, name, 4096, device=device, removable=removable)
    assert measure.hardware_readings(tmp_path)["disks"] == base == "Samsung SSD 980:1000215216"


def test_a_second_physical_disk_changes_the_fingerprint(tmp_path: Path) -> None:
    _sys_block(tmp_path, "sda", 2048, device=True, model="DISK-A")
    before = measure.hardware_readings(tmp_path)
    _sys_block(tmp_path, "sdb", 4096, device=True, model="DISK-B")
    assert measure.hardware_readings(tmp_path)["disks"] != before["disks"]


def test_attaching_a_real_loop_device_leaves_the_fingerprint_unchanged(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("attaching a loop device needs root and util-linux losetup")
    before = measure.measure()
    backing = tmp_path / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(8 * 1024 * 1024)
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True,
                         timeout=30, check=True).stdout.strip()
    try:
        during = measure.measure()
        assert during["hw_fingerprint"] == before["hw_fingerprint"]
        assert during["block_devices"] != before["block_devices"], "the state change stays visible"
    finally:
        subprocess.run(["losetup", "-d", dev], timeout=30, check=False)


# --- the command line: secrets redacted before measuring (defect 6) ----------------------------------------
@pytest.mark.parametrize(("text", "secret"), [
    pytest.param(f"quiet trustcap.token={TOKEN} trustcap.node=hpc-1", TOKEN, id="enrolment-token"),
    pytest.param("ro rd.luks.key=hunter2-secret-value", "hunter2-secret-value", id="luks-key"),
    pytest.param("ro app.password=s3cr3t-pw", "s3cr3t-pw", id="password"),
])
def test_secrets_are_redacted_and_the_rest_kept(text: str, secret: str) -> None:
    out = measure.redact_cmdline(text)
    assert secret not in out and measure.REDACTED in out
    assert out.split()[0] == text.split()[0]


def _agent_with_cmdline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: str) -> Agent:
    cmd = tmp_path / f"cmdline-{token}"
    cmd.write_text(f"console=ttyS0 trustcap.gateway=10.0.0.1:7000 trustcap.token={token} "
                   f"trustcap.bootdigest=sha256:{'ab' * 32} trustcap.node=hpc-1\n")
    monkeypatch.setattr(measure, "CMDLINE_PATH", cmd)
    config = BootConfig("10.0.0.1", 7000, token, BOOT, GATEWAY, "hpc-1")
    return Agent(config, key=BootKey(), docker_client=Engine,
                 scratch_root=tmp_path / "scratch")


def test_the_enrolment_token_never_reaches_a_quote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = _agent_with_cmdline(tmp_path, monkeypatch, TOKEN)
    resp = agent.handle_quote({"nonce": "0x" + "42" * 32})
    wire = canonical.encode(resp)
    assert TOKEN.encode() not in wire
    assert resp["quote"]["measurements"]["cmdline"] == measure._digest(measure.redact_cmdline(
        (tmp_path / f"cmdline-{TOKEN}").read_text().strip()))
    # a verifier holding the quote cannot confirm a guessed token: the digest does not depend on it
    other = _agent_with_cmdline(tmp_path, monkeypatch, "another-token-abcdef")
    assert other.measure()["cmdline"] == agent.measure()["cmdline"]


# --- scratch area and the agent's own code (defect 5) -------------------------------------------------------
def test_scratch_digest_sees_residue_and_returns_when_it_is_gone(tmp_path: Path) -> None:
    root = tmp_path / "scratch"
    root.mkdir()
    idle = measure.measure(scratch_root=root)["scratch"]
    (root / "run-1").mkdir()
    (root / "run-1" / "leftover").write_bytes(b"secret result")
    left = measure.measure(scratch_root=root)["scratch"]
    (root / "run-1" / "leftover").write_bytes(b"other  result")  # same size, other content
    changed = measure.measure(scratch_root=root)["scratch"]
    shutil.rmtree(root / "run-1")
    assert len({idle, left, changed}) == 3
    assert measure.measure(scratch_root=root)["scratch"] == idle


def test_missing_readers_are_unmeasured_never_an_empty_state(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    m = measure.measure()
    assert m["containers"] == m["scratch"] == m["agent_config"] == measure._digest(measure.UNMEASURED)
    assert measure.measure(scratch_root=empty)["scratch"] != m["scratch"]
    assert measure.measure(containers=lambda: {"running": [], "images": [], "volumes": []})["containers"] \
        != m["containers"]


def test_the_agents_own_code_is_measured(tmp_path: Path) -> None:
    pkg = measure._package_dir()
    assert {row.split()[0] for row in measure.agent_code()} >= {"service.py", "measure.py", "seccomp.json"}
    copy = tmp_path / "agent"
    shutil.copytree(pkg, copy, ignore=shutil.ignore_patterns("__pycache__"))
    genuine = measure.measure(code_dir=copy)["agent_code"]
    assert genuine == measure.measure()["agent_code"]
    (copy / "__pycache__").mkdir()
    (copy / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"cache")
    assert measure.measure(code_dir=copy)["agent_code"] == genuine, "byte-code caches are not code"
    profile = json.loads((copy / "seccomp.json").read_text())
    (copy / "seccomp.json").write_text(json.dumps(profile) + " ")  # one byte more in the seccomp profile
    assert measure.measure(code_dir=copy)["agent_code"] != genuine


def test_the_agent_default_reads_engine_scratch_code_and_config(tmp_path: Path) -> None:
    config = BootConfig("10.0.0.1", 7000, TOKEN, BOOT, GATEWAY, "hpc-1")

    root = tmp_path / "scratch"
    root.mkdir()
    m = Agent(config, key=BootKey(), docker_client=Engine, scratch_root=root).measure()
    assert m["containers"] == measure._digest({"running": [], "images": [], "volumes": []})
    assert m["scratch"] == measure._digest([])
    assert m["agent_code"] == measure.measure()["agent_code"]
    assert m["agent_config"] != measure._digest(measure.UNMEASURED)


def test_an_engine_that_does_not_answer_is_its_own_reading(tmp_path: Path) -> None:
    from trustcap.agent.errors import EngineError

    def down() -> object:
        raise EngineError("connecting to the Docker Engine: does not answer")

    config = BootConfig("10.0.0.1", 7000, TOKEN, BOOT, GATEWAY, "hpc-1")
    m = Agent(config, key=BootKey(), docker_client=down, scratch_root=tmp_path).measure()
    assert m["containers"] == measure._digest({"engine": "unavailable"})
