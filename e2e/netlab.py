"""The two-namespace lab the attestation and enrolment e2e share: an "hpc" network namespace whose only
link is a veth to a "gateway" namespace, link-local addresses, and `in_netns` to make sockets inside.

Importable by its unique name from any e2e folder (pytest puts e2e/ on sys.path for e2e/conftest.py).
Everything `veth_lab` makes is removed when the block ends, even when a test fails; no address outside
this machine is ever used.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

__all__ = ["Lab", "in_netns", "need_root", "run", "veth_lab"]

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def need_root(what: str) -> None:
    """Skip, saying why, where the lab cannot be made (not root, or iproute2/util-linux missing)."""
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (network, pid and mount namespaces); run it as root in CI")
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"{what} needs {tool!r} (iproute2 / util-linux)")


def run(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")


@contextlib.contextmanager
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
            if _libc.setns(back, _CLONE_NEWNET) != 0:  # pragma: no cover - would strand the thread
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


@contextlib.contextmanager
def veth_lab(prefix: str, gw_ip: str, hpc_ip: str) -> Iterator[Lab]:
    """Gateway and hpc namespaces joined by one veth (/30), named `<prefix>gw<tag>` / `<prefix>hpc<tag>`."""
    tag = uuid.uuid4().hex[:6]
    lab = Lab(gw=f"{prefix}gw{tag}", hpc=f"{prefix}hpc{tag}")
    vg, vh = f"{prefix}g{tag}", f"{prefix}h{tag}"
    try:
        run("ip", "netns", "add", lab.gw)
        run("ip", "netns", "add", lab.hpc)
        run("ip", "link", "add", vg, "netns", lab.gw, "type", "veth", "peer", "name", vh, "netns", lab.hpc)
        run("ip", "-n", lab.gw, "addr", "add", f"{gw_ip}/30", "dev", vg)
        run("ip", "-n", lab.hpc, "addr", "add", f"{hpc_ip}/30", "dev", vh)
        for ns, dev in ((lab.gw, vg), (lab.hpc, vh)):
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "link", "set", dev, "up")
        yield lab
    finally:
        for ns in (lab.hpc, lab.gw):  # deleting a namespace removes its veth end and the peer with it
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)
