"""Fixtures for the node e2e suite: the real Docker Engine, real namespaces, real nftables.

Nothing here is faked. The network lab is a "gateway" namespace and a "world" namespace the tests make
(198.18.0.0/15 benchmark-test addresses, 169.254/16 link-local on the run links); no packet can leave
them. Everything made here is removed at teardown, even when a test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
HOSTILE_IMAGE = "trustcap/hostile-test:e2e"


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("node e2e tests need root (namespaces, nftables, loop devices); run them as root in CI")


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Any]:
    _need_root()
    import docker

    from trustcap.stack.images import ensure_base_image

    client = docker.from_env(timeout=120)
    try:
        client.ping()
    except Exception as exc:  # a missing engine is a failed precondition, stated plainly
        pytest.fail(f"Docker Engine does not answer ({exc}); start it (trustcap stack up, or dockerd)")
    ensure_base_image(client)
    yield client
    client.close()


@pytest.fixture(scope="session")
def hostile_image(docker_engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base image plus a static syscall helper installed setuid root (to test no-new-privileges)."""
    ctx = tmp_path_factory.mktemp("hostile")
    subprocess.run(["gcc", "-static", "-O1", "-o", str(ctx / "hostile"), str(HERE / "hostile.c")], check=True,
                   timeout=120)
    os.chmod(ctx / "hostile", 0o4755)  # noqa: S103 - the setuid binary under test
    (ctx / "Dockerfile").write_text("FROM trustcap/base:bookworm\nCOPY hostile /usr/local/bin/hostile\n")
    docker_engine.images.build(path=str(ctx), tag=HOSTILE_IMAGE, rm=True, forcerm=True)
    yield HOSTILE_IMAGE
    docker_engine.images.remove(HOSTILE_IMAGE, force=True)


@pytest.fixture(scope="session")
def kernel_audit() -> None:
    """Tests of audit-rule reporting need the kernel audit subsystem and auditctl (Debian auditd). Only
    their absence skips, with the reason printed; the executor then reports `reporting: degraded`."""
    _need_root()
    why = ""
    if not shutil.which("auditctl"):
        why = "auditctl is not installed (apt-get install auditd)"
    else:
        st = subprocess.run(["auditctl", "-s"], capture_output=True, text=True, timeout=30, check=False)
        if st.returncode != 0:
            why = f"kernel audit is unavailable here: {(st.stderr or st.stdout).strip()}"
        elif "enabled 2" in st.stdout:
            why = "kernel audit configuration is locked (enabled 2)"
    if why:
        print(f"SKIP audit-rule reporting tests: {why}", file=sys.stderr)
        pytest.skip(why)


@pytest.fixture
def scratch_root(tmp_path: Path) -> Path:
    return tmp_path / "scratch"


_LISTENER = textwrap.dedent("""
    import socket, sys, threading
    log = open(sys.argv[1], "a", buffering=1)
    def tcp(host, port):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((host, port)); s.listen()
        while True:
            c, peer = s.accept(); log.write(f"tcp {host}:{port} from {peer[0]}\\n")
            c.sendall(b"hello-from-" + str(port).encode()); c.close()
    def udp(host, port):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((host, port))
        while True:
            data, peer = s.recvfrom(2048); log.write(f"udp {host}:{port} from {peer[0]}\\n")
    for spec in sys.argv[2:]:
        proto, host, port = spec.split(":")
        threading.Thread(target=tcp if proto == "tcp" else udp, args=(host, int(port)), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
""")


@dataclass
class NetLab:
    """gateway netns <-> world netns. World holds the declared endpoint, an undeclared host and a resolver."""

    gw: str
    world: str
    log: Path
    declared: str = "198.18.1.1:8080"
    undeclared: str = "198.18.1.2:9090"
    resolver: str = "198.18.1.53:53"
    gateway_service_port: int = 7000
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def hits(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def netlab(tmp_path: Path) -> Iterator[NetLab]:
    _need_root()
    tag = uuid.uuid4().hex[:6]
    lab = NetLab(gw=f"tcgw-{tag}", world=f"tcwd-{tag}", log=tmp_path / "hits.log")
    try:
        _ip("netns", "add", lab.gw)
        _ip("netns", "add", lab.world)
        _ip("link", "add", f"tcx{tag}", "type", "veth", "peer", "name", f"tcy{tag}")
        _ip("link", "set", f"tcx{tag}", "netns", lab.gw)
        _ip("link", "set", f"tcy{tag}", "netns", lab.world)
        for ns, dev, addr in ((lab.gw, f"tcx{tag}", "198.18.0.1/30"), (lab.world, f"tcy{tag}", "198.18.0.2/30")):
            _ip("-n", ns, "addr", "add", addr, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        for a in ("198.18.1.1/32", "198.18.1.2/32", "198.18.1.53/32"):
            _ip("-n", lab.world, "addr", "add", a, "dev", "lo")
        # The gateway's default route points into the dead-end world namespace, so that every forwarded
        # packet reaches the forward hook (and is counted) instead of dying in a routing miss.
        _ip("-n", lab.gw, "route", "add", "default", "via", "198.18.0.2")
        _ip("-n", lab.world, "route", "add", "169.254.0.0/16", "via", "198.18.0.1")
        script = tmp_path / "listener.py"
        script.write_text(_LISTENER)
        for ns, specs in ((lab.world, [f"tcp:{lab.declared}", f"tcp:{lab.undeclared}", f"udp:{lab.resolver}"]),
                          (lab.gw, [f"tcp:0.0.0.0:{lab.gateway_service_port}"])):
            p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(script), str(lab.log), *specs],
                                 stdout=subprocess.PIPE, text=True)
            lab.procs.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        yield lab
    finally:
        for p in lab.procs:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
            if p.stdout is not None:
                p.stdout.close()
        for ns in (lab.gw, lab.world):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)
        time.sleep(0.05)


@pytest.fixture
def no_leftovers(docker_engine: Any) -> Iterator[None]:
    """After the test: no run container, no loop device over a scratch file, no stray nft table or audit
    rule of ours."""
    yield
    left = docker_engine.containers.list(all=True, filters={"label": "io.trustcap.run"})
    loops = subprocess.run(["losetup", "-l", "-n", "-O", "BACK-FILE"], capture_output=True, text=True,
                           timeout=30, check=False).stdout
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=30,
                            check=False).stdout
    rules = subprocess.run(["auditctl", "-l"], capture_output=True, text=True, timeout=30, check=False).stdout \
        if shutil.which("auditctl") else ""
    for c in left:
        c.remove(force=True)
    assert not left, f"run containers left behind: {[c.name for c in left]}"
    assert "scratch.img" not in loops, f"scratch loop devices left behind: {loops}"
    assert "trustcap_eg_" not in tables, f"egress tables left behind: {tables}"
    assert "trustcap-" not in rules, f"audit rules left behind: {rules}"
    assert shutil.which("nft")
