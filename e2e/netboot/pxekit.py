"""Fixtures for the netboot e2e: a real lab link (namespaces, bridge, tap), real dnsmasq, our TFTP/HTTP
services in the gateway namespace (`trustcap netboot serve`), and a qemu PC that PXE-boots from them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pxelab import GW_IP, HPC_MAC, LabLink, QemuHpc, in_netns, qemu_available

from trustcap.netboot.image.builder import INITRD_FILE, BuildInputs, BuiltImage, build_image, copy_image

TOKEN = "tok-e2e-0001"  # noqa: S105 -- a test enrolment token, not a secret
NODE = "hpc-netboot-e2e"
AGENT_PORT = 7443


@pytest.fixture(scope="session")
def image() -> BuiltImage:
    return build_image(BuildInputs())


@dataclass
class Gateway:
    lab: LabLink
    root: Path
    events: Path
    proc: subprocess.Popen[str]
    log: Path

    def events_list(self) -> list[dict[str, str]]:
        if not self.events.exists():
            return []
        return [json.loads(line) for line in self.events.read_text().splitlines() if line.strip()]

    def wait_event(self, kind: str, timeout: float) -> dict[str, str] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events_list():
                if ev["event"] == kind:
                    return ev
            time.sleep(0.25)
        return None


def _start_gateway(lab: LabLink, root: Path, manifest: Path, state: Path, extra: list[str] | None = None) -> Gateway:
    events, log = state / "events.jsonl", state / "serve.log"
    cmd = lab.in_gw([
        sys.executable, "-P", "-m", "trustcap.cli", "netboot", "serve", "--root", str(root), "--bind", GW_IP,
        "--tftp-port", "69", "--http-port", "8080", "--manifest", str(manifest),
        "--dhcp-interface", lab.gw_if, "--dhcp-range", "10.77.0.100,10.77.0.150",
        *(extra or ["--mac", f"{HPC_MAC}={TOKEN}"]), "--state-dir", str(state / "dnsmasq"), "--events", str(events),
    ])
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and '"tftp_port"' not in log.read_text():
        if proc.poll() is not None:
            raise AssertionError(f"netboot serve exited {proc.returncode}: {log.read_text()}")
        time.sleep(0.2)
    if '"tftp_port"' not in log.read_text():
        proc.kill()
        raise AssertionError(f"netboot serve did not come up: {log.read_text()}")
    return Gateway(lab, root, events, proc, log)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Our own temporary folder: pytest's shared basetemp is pruned by other pytest runs on this machine
    (it keeps the last three), which deleted a boot root under a running container once."""
    with tempfile.TemporaryDirectory(prefix="tcnb-e2e-") as tmp:
        yield Path(tmp)


@pytest.fixture
def pxe_rig(workdir: Path, image: BuiltImage) -> Iterator[tuple[LabLink, Path]]:
    reason = qemu_available()
    if reason:
        print(f"SKIP netboot e2e: {reason}")
        pytest.skip(reason)
    root = workdir / "root"
    copy_image(image, root)
    manifest = workdir / "approved.json"
    manifest.write_text(json.dumps(image.digests))
    with LabLink(tag=f"{os.getpid()}-{int(time.time() * 1000) % 100000}") as lab:
        yield lab, root


@pytest.fixture
def boot(pxe_rig: tuple[LabLink, Path], workdir: Path) -> Iterator[tuple[Gateway, QemuHpc]]:
    """Start the gateway services, then power the HPC on. Tests may tamper with files before `boot`."""
    lab, root = pxe_rig
    state = workdir / "state"
    state.mkdir()
    gw = _start_gateway(lab, root, workdir / "approved.json", state)
    hpc = QemuHpc(lab, workdir / "serial.log")
    try:
        hpc.start()
        yield gw, hpc
    finally:
        hpc.stop()
        if gw.proc.poll() is None:
            gw.proc.send_signal(signal.SIGTERM)
            try:
                gw.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                gw.proc.kill()
                gw.proc.wait(timeout=10)


@pytest.fixture
def tampered(pxe_rig: tuple[LabLink, Path]) -> Path:
    """Flip one byte of the approved initrd after approval (the manifest keeps the approved digest)."""
    _, root = pxe_rig
    return tamper_initrd(root)


def tamper_initrd(root: Path) -> Path:
    """Flip one byte in the middle of the initrd under `root`: the bytes no longer match the approval."""
    p: Path = root / INITRD_FILE
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    return p


@pytest.fixture
def container_boot(pxe_rig: tuple[LabLink, Path], workdir: Path) -> Iterator[tuple[subprocess.Popen[str], Path,
                                                                                     Path, QemuHpc]]:
    """Seed Task 3: the boot services in a container that owns the link and exits after the boot."""
    lab, root = pxe_rig
    reason = _docker_unavailable()
    if reason:
        print(f"SKIP container boot: {reason}")
        pytest.skip(reason)
    state = workdir / "state"
    state.mkdir()
    events, log = state / "events.jsonl", state / "serve.log"
    cmd = lab.in_gw([
        sys.executable, "-P", "-m", "trustcap.cli", "netboot", "serve", "--container", "--root", str(root),
        "--bind", GW_IP, "--tftp-port", "69", "--http-port", "8080", "--manifest", str(workdir / "approved.json"),
        "--dhcp-interface", lab.gw_if, "--dhcp-range", "10.77.0.100,10.77.0.150", "--mac", f"{HPC_MAC}={TOKEN}",
        "--events", str(events),
    ])
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True)
    hpc = QemuHpc(lab, workdir / "serial.log")
    try:
        deadline = time.monotonic() + 300  # the first run builds the image (apt-get inside docker build)
        while '"container"' not in log.read_text() and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"netboot serve --container exited {proc.returncode}: {log.read_text()}")
            time.sleep(0.5)
        hpc.start()
        yield proc, events, log, hpc
    finally:
        hpc.stop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _docker_unavailable() -> str | None:
    try:
        proc = subprocess.run(["docker", "image", "inspect", "trustcap/base:bookworm"], capture_output=True,
                              timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker CLI not usable: {exc}"
    if proc.returncode != 0:
        return "trustcap/base:bookworm is missing: run trustcap stack up"
    return None


@pytest.fixture(scope="session")
def agent_image() -> BuiltImage:
    """The boot image with Python and the trustcap agent inside (init starts it after the network)."""
    return build_image(BuildInputs(with_agent=True))


@dataclass
class AgentBoot:
    gw: Gateway
    hpc: QemuHpc
    server: Any
    tokens: Any
    root: Any
    image: BuiltImage
    node: str
    cluster: Any  # enrolkit.Cluster on the stack's API server
    objects: Any  # joinkit.JoinObjects: the Gateway, BootImage and HPCNode of this boot
    publisher: Any  # gateway.publish.EnrolmentPublisher, hooked to the server
    operator: Any  # enrolkit.Proc of the operator process


@pytest.fixture
def agent_boot(request: pytest.FixtureRequest, agent_image: BuiltImage, workdir: Path, stack: dict[str, Any],
               kubeconfig: Path, join_cluster: Any, join_operator: Any) -> Iterator[AgentBoot]:
    """The whole join: the real gateway attestation server in the gateway namespace (publishing the
    enrolment into the HPCNode through the cluster link), a token for this boot, the netboot services
    handing out its endpoint, address and token by DHCP and reporting refusals on the HPCNode, the
    operator judging the evidence, and the HPC PXE-booting the agent image. Parametrize indirectly with
    "tampered" to flip one byte of the initrd after approval (the approval keeps the approved digest)."""
    from joinkit import ClusterLink, apiserver_port, create_join_objects

    from trustcap.gateway.enrol import TokenBook
    from trustcap.gateway.publish import EnrolmentPublisher, KubeHPCNodes
    from trustcap.gateway.server import AttestationServer
    from trustcap.trustroot import SoftwareTrustRoot

    reason = qemu_available()
    if reason:
        print(f"SKIP netboot e2e: {reason}")
        pytest.skip(reason)
    tamper = getattr(request, "param", None) == "tampered"
    tag = f"{os.getpid()}-{int(time.time() * 1000) % 100000}"
    root = workdir / "root"
    copy_image(agent_image, root)
    (workdir / "approved.json").write_text(json.dumps(agent_image.digests))
    (workdir / "tr").mkdir()
    trust_root = SoftwareTrustRoot.create(workdir / "tr", os.urandom(32))
    objects = create_join_objects(join_cluster, tag, agent_image, trust_root.address, trust_root.public_key())
    node = objects.node
    if tamper:
        tamper_initrd(root)
    tokens = TokenBook(["0x" + agent_image.bootdigest.split(":", 1)[1]])
    token = tokens.issue(node)
    state = workdir / "state"
    state.mkdir()
    try:
        with LabLink(tag=f"a{tag}") as lab:
            link = ClusterLink(lab.gw_ns, apiserver_port(stack))
            server = None
            gw = None
            publisher = None
            hpc = QemuHpc(lab, workdir / "serial.log", memory_mb=1024)
            try:
                with in_netns(lab.gw_ns):
                    server = AttestationServer(trust_root, node, tokens, host=GW_IP, port=AGENT_PORT)
                # The publisher's threads start from the server's (gateway-namespace) threads, so they reach
                # the API server the way the Pi's gateway does: through the cluster link.
                publisher = EnrolmentPublisher(server, node, KubeHPCNodes(str(kubeconfig)), wait_s=120)
                server.on_session = publisher.on_session
                gw = _start_gateway(lab, root, workdir / "approved.json", state, extra=[
                    "--mac", f"{HPC_MAC}={token}@{node}", "--agent-endpoint", f"{GW_IP}:{AGENT_PORT}",
                    "--gateway-address", trust_root.address, "--report-node", node, "--kubeconfig", str(kubeconfig),
                ])
                hpc.start()
                yield AgentBoot(gw, hpc, server, tokens, trust_root, agent_image, node, join_cluster, objects,
                                publisher, join_operator)
            finally:
                hpc.stop()
                if publisher is not None:
                    publisher.stop()  # its refresh thread would outlive the lab and call a gone API server
                if server is not None:
                    server.close()
                if gw is not None:
                    _stop(gw.proc)
                link.close()
    finally:
        trust_root.close()


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
