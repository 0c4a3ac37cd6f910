"""Helpers and fixtures for the attestation e2e (importable by its unique name): a real agent process
on an "HPC" whose only link is its gateway.

    gateway namespace (tcgw*)                           hpc namespace (tchpc*)
      AttestationServer socket on 169.254.77.1   <-- veth -->  169.254.77.2
      (bound from this test process through             python3 -m trustcap.agent, run by
       setns on the calling thread, then back)           `unshare --pid --fork --mount-proc`: its own
      Monitor, relay, verifiers: in this process         pid and mount namespaces, so its process and
                                                          mount readings are its own, like a real HPC

Nothing is faked: the channel is real TCP over the veth, the agent measures the real /proc of its
namespaces, the gateway signs with a real software trust root. Addresses are link-local (169.254/16)
inside namespaces the fixture makes, so no packet can leave them; everything is removed at teardown,
even when a test fails.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from trustcap.gateway.enrol import TokenBook
from trustcap.gateway.server import AttestationServer

from trustcap.trustroot import SoftwareTrustRoot

GW_IP, HPC_IP = "169.254.77.1", "169.254.77.2"
NODE = "hpc-e2e"
BOOT_HEX = "5e" * 32
BOOT = "0x" + BOOT_HEX
_CLONE_NEWNET = 0x40000000


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("attestation e2e needs root (network, pid and mount namespaces); run it as root in CI")
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"attestation e2e needs {tool!r} (iproute2 / util-linux)")


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")


_libc = ctypes.CDLL(None, use_errno=True)


@contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block with the calling thread in network namespace `name` (sockets made here stay there)."""
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name} failed")
        try:
            yield
        finally:
            if _libc.setns(back, _CLONE_NEWNET) != 0:  # pragma: no cover - would leave the thread stranded
                raise OSError(ctypes.get_errno(), "setns back to the test's namespace failed")
    finally:
        os.close(target)
        os.close(back)


@dataclass
class Lab:
    gw: str
    hpc: str

    def exec_in_hpc(self, *cmd: str, **kw: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["ip", "netns", "exec", self.hpc, *cmd], **kw)


@pytest.fixture
def lab() -> Iterator[Lab]:
    _need_root()
    tag = uuid.uuid4().hex[:6]
    lab = Lab(gw=f"tcgw{tag}", hpc=f"tchpc{tag}")
    vg, vh = f"tcg{tag}", f"tch{tag}"
    try:
        _run("ip", "netns", "add", lab.gw)
        _run("ip", "netns", "add", lab.hpc)
        _run("ip", "link", "add", vg, "netns", lab.gw, "type", "veth", "peer", "name", vh, "netns", lab.hpc)
        _run("ip", "-n", lab.gw, "addr", "add", f"{GW_IP}/30", "dev", vg)
        _run("ip", "-n", lab.hpc, "addr", "add", f"{HPC_IP}/30", "dev", vh)
        for ns, dev in ((lab.gw, vg), (lab.hpc, vh)):
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "link", "set", dev, "up")
        yield lab
    finally:
        for ns in (lab.hpc, lab.gw):  # deleting a namespace removes its veth end and the peer with it
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)


@pytest.fixture
def trust_root(tmp_path: Path) -> Iterator[SoftwareTrustRoot]:
    (tmp_path / "tr").mkdir()
    root = SoftwareTrustRoot.create(tmp_path / "tr", os.urandom(32))
    yield root
    root.close()


@dataclass
class Gateway:
    server: AttestationServer
    tokens: TokenBook
    root: SoftwareTrustRoot

    @property
    def port(self) -> int:
        return int(self.server.address[1])


@pytest.fixture
def gateway(lab: Lab, trust_root: SoftwareTrustRoot) -> Iterator[Gateway]:
    tokens = TokenBook([BOOT])
    with in_netns(lab.gw):
        server = AttestationServer(trust_root, NODE, tokens, host=GW_IP, port=0, rekey_after=3)
    yield Gateway(server, tokens, trust_root)
    server.close()


@dataclass
class AgentProc:
    """One `python3 -m trustcap.agent` in the hpc namespace; `log` is its stderr."""

    proc: subprocess.Popen[bytes]
    log: Path

    def agent_pid(self, timeout: float = 10) -> int:
        """The agent's host pid: `unshare --fork`'s only child (pid 1 of the agent's pid namespace)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            except OSError:
                kids = []
            if kids:
                return int(kids[0])
            time.sleep(0.05)
        raise AssertionError(f"agent process did not start; its log:\n{self.text()}")

    def kill(self) -> None:
        os.kill(self.agent_pid(), signal.SIGKILL)
        self.proc.wait(timeout=10)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_log(self, needle: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in (t := self.text()):
                return t
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} never appeared in the agent's log:\n{self.text()}")


def start_agent(lab: Lab, port: int, gateway_address: str, token: str, log: Path, *, node: str = NODE,
                boot: str = BOOT_HEX) -> AgentProc:
    """`python3 -m trustcap.agent` in the hpc namespace, in pid and mount namespaces of its own."""
    with log.open("wb") as out:
        proc = lab.exec_in_hpc(
            "unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
            sys.executable, "-P", "-m", "trustcap.agent",
            "--gateway", f"{GW_IP}:{port}", "--token", token, "--bootdigest", f"sha256:{boot}",
            "--gatewayaddr", gateway_address, "--node", node,
            stdout=out, stderr=subprocess.STDOUT, cwd="/",
        )
    return AgentProc(proc, log)


def stop_agent(agent: AgentProc) -> None:
    if agent.proc.poll() is None:
        agent.proc.send_signal(signal.SIGKILL)  # --kill-child takes the agent down with it
        agent.proc.wait(timeout=10)


@pytest.fixture
def spawn_agent(lab: Lab, gateway: Gateway, tmp_path: Path) -> Iterator[Callable[..., AgentProc]]:
    started: list[AgentProc] = []

    def spawn(token: str | None = None, *, node: str = NODE, boot: str = BOOT_HEX) -> AgentProc:
        token = token if token is not None else gateway.tokens.issue(NODE)
        agent = start_agent(lab, gateway.port, gateway.root.address, token,
                            tmp_path / f"agent-{len(started)}.log", node=node, boot=boot)
        started.append(agent)
        return agent

    yield spawn
    for agent in started:
        stop_agent(agent)


@contextmanager
def hpc_listener(lab: Lab, port: int) -> Iterator[None]:
    """An extra TCP listener inside the hpc namespace (a stand-in for anything that opens a port)."""
    code = (f"import socket,time;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
            f"s.bind(('0.0.0.0',{port}));s.listen();print('up',flush=True);time.sleep(300)")
    proc = lab.exec_in_hpc(sys.executable, "-P", "-c", code, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"up"
        yield
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
