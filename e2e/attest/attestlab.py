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

The launchers (`start_agent`, `start_gateway` with `trust_root_files` and `write_policy`) start the two
components as the processes a node runs; bench/bench_memory.py measures the same processes through them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from netlab import Lab, in_netns, need_root, veth_lab

from trustcap.gateway.enrol import TokenBook
from trustcap.gateway.server import AttestationServer
from trustcap.trustroot import SoftwareTrustRoot, new_kek_file

GW_IP, HPC_IP = "169.254.77.1", "169.254.77.2"
NODE = "hpc-e2e"
BOOT_HEX = "5e" * 32
BOOT = "0x" + BOOT_HEX


@pytest.fixture
def lab() -> Iterator[Lab]:
    need_root("attestation e2e")
    with veth_lab("tc", GW_IP, HPC_IP) as made:
        yield made

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
                boot: str = BOOT_HEX, gateway_ip: str = GW_IP) -> AgentProc:
    """`python3 -m trustcap.agent` in the hpc namespace, in pid and mount namespaces of its own."""
    with log.open("wb") as out:
        proc = lab.exec_in_hpc(
            "unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
            sys.executable, "-P", "-m", "trustcap.agent",
            "--gateway", f"{gateway_ip}:{port}", "--token", token, "--bootdigest", f"sha256:{boot}",
            "--gatewayaddr", gateway_address, "--node", node,
            stdout=out, stderr=subprocess.STDOUT, cwd="/",
        )
    return AgentProc(proc, log)


def stop_agent(agent: AgentProc) -> None:
    if agent.proc.poll() is None:
        agent.proc.send_signal(signal.SIGKILL)  # --kill-child takes the agent down with it
        agent.proc.wait(timeout=10)


def trust_root_files(folder: Path) -> tuple[Path, Path, str]:
    """A software trust root as `python -m trustcap.gateway` opens it (`--trustroot`, `--kek-file`):
    (its home in `folder`/tr, its KEK file `folder`/kek, its address)."""
    home, kek = folder / "tr", folder / "kek"
    home.mkdir()
    SoftwareTrustRoot.create(home, new_kek_file(kek)).close()
    with SoftwareTrustRoot.open(home, bytes.fromhex(kek.read_text().strip())) as root:
        return home, kek, root.address


def write_policy(path: Path, *, node: str, boot: str, mean_interval: float, min_interval: float) -> Path:
    """A gateway policy for the lab: `boot` (0x-hex) the one boot image, any measurement allowed."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "trustcap.io/v1alpha1", "kind": "GatewayPolicy",
        "monitor": {"meanIntervalSeconds": mean_interval, "minIntervalSeconds": min_interval,
                    "maxQuoteAgeSeconds": 30},
        "attestation": {"node": node, "bootImages": [boot], "allowUnlistedMeasurements": True},
    }))
    return path


@dataclass
class GatewayProc:
    """One `python3 -m trustcap.gateway` in the gateway namespace; `ready` is its first line, `log` its stderr."""

    proc: subprocess.Popen[bytes]
    log: Path
    ready: str

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, as an init system stops it; its exit code. Killed if it has not exited by `timeout`."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()


def start_gateway(lab: Lab, *, home: Path, kek: Path, node: str, boot: str, policy: Path, listen: str, relay: str,
                  token_file: Path, verifiers: list[str], log: Path, extra: tuple[str, ...] = ()) -> GatewayProc:
    """`python3 -m trustcap.gateway` in the gateway namespace, once it has said it is ready."""
    with log.open("wb") as err:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.gw, sys.executable, "-P", "-m", "trustcap.gateway",
             "--trustroot", str(home), "--kek-file", str(kek), "--node", node, "--boot-digest", boot,
             "--policy", str(policy), "--listen", listen, "--relay", relay, "--token-file", str(token_file),
             *extra, *[x for v in verifiers for x in ("--verifier", v)]],
            stdout=subprocess.PIPE, stderr=err, cwd="/")
    assert proc.stdout is not None
    gateway = GatewayProc(proc, log, proc.stdout.readline().decode())
    if not gateway.ready.startswith("ready "):
        gateway.stop()
        raise AssertionError(f"the gateway did not start; its log:\n{log.read_text(errors='replace')}")
    return gateway


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
