"""Helpers for the enrolment e2e (importable by its unique name): the whole join on real components.

    host (test process)                 gateway namespace (tcegw*)              hpc namespace (tcehpc*)
      kube-apiserver 127.0.0.1:P  <--  ClusterLink: 127.0.0.1:P inside  <-- python3 -m trustcap.gateway
      (the stack's)                    the gateway namespace, forwarded     --listen 169.254.78.1:7790
      python -m trustcap.operator      by a host thread (the Pi's cluster   --kubeconfig (unchanged:
      (a real process)                 link; TLS name unchanged)             same 127.0.0.1:P)
                                                                          <-- veth --> 169.254.78.2
                                                                               python3 -m trustcap.agent

The agent's only link is the veth to the gateway namespace; the gateway reaches the API server only
through the cluster link, as a hostNetwork DaemonSet on a Pi would. Everything the fixtures make is
removed at teardown, even when a test fails; no address outside this machine is ever used.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netlab import Lab, in_netns, need_root, veth_lab

GW_IP, HPC_IP = "169.254.78.1", "169.254.78.2"
AGENT_PORT = 7790
RELAY = "127.0.0.1:7791"  # the relay on the gateway namespace's own loopback (unused by these tests)
GROUP, VERSION = "trustcap.io", "v1alpha1"
OPERATOR_NS = "trustcap-e2e-enrol"  # the operator's namespace filter; HPCNode & co. are cluster-scoped





@contextlib.contextmanager
def make_lab() -> Iterator[Lab]:
    need_root("enrolment e2e")
    with veth_lab("tce", GW_IP, HPC_IP) as lab:
        yield lab

class ClusterLink:
    """A TCP forwarder: 127.0.0.1:port inside the gateway namespace -> 127.0.0.1:port on the host.

    The listening socket is made inside the namespace; the threads that accept and dial are the
    test's own (host namespace), so each forwarded connection really crosses from one to the other.
    """

    def __init__(self, netns: str, port: int) -> None:
        self.port = port
        with in_netns(netns):
            self._sock = socket.create_server(("127.0.0.1", port))
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name="cluster-link", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                inner, _ = self._sock.accept()
            except OSError:
                return
            try:
                outer = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            except OSError:
                inner.close()
                continue
            outer.settimeout(None)
            self._conns += [inner, outer]
            for a, b in ((inner, outer), (outer, inner)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.close()
        self._thread.join(timeout=5)


@dataclass
class Proc:
    """A child process with its combined output in a log file."""

    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def wait_log(self, needle: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in (t := self.text()):
                return t
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} never appeared in {self.log.name}:\n{self.text()[-4000:]}")


def start_operator(env: dict[str, str], log: Path) -> Proc:
    """`python -m trustcap.operator` as a real process, away from the repo root (decision 0001)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-P", "-m", "trustcap.operator", "--namespace", OPERATOR_NS,
                                 "--standalone", "--verbose"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=log.parent)
    return Proc(proc, log)


def start_gateway(lab: Lab, *, env: dict[str, str], home: Path, kek: Path, node: str, boot_digests: list[str],
                  policy: Path, token_file: Path, kubeconfig: Path, log: Path) -> Proc:
    """`python3 -m trustcap.gateway --kubeconfig ...` in the gateway namespace; waits for its ready line."""
    args = ["ip", "netns", "exec", lab.gw, sys.executable, "-P", "-m", "trustcap.gateway",
            "--trustroot", str(home), "--kek-file", str(kek), "--node", node, "--policy", str(policy),
            "--listen", f"{GW_IP}:{AGENT_PORT}", "--relay", RELAY, "--token-file", str(token_file),
            "--kubeconfig", str(kubeconfig)]
    for d in boot_digests:
        args += ["--boot-digest", d]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd="/")
    gw = Proc(proc, log)
    gw.wait_log("ready agent=", timeout=30)
    return gw


def start_agent(lab: Lab, *, env: dict[str, str], gateway_address: str, token: str, node: str, boot_hex: str,
                log: Path) -> Proc:
    """`python3 -m trustcap.agent` in the hpc namespace, in pid and mount namespaces of its own."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.hpc, "unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
             sys.executable, "-P", "-m", "trustcap.agent", "--gateway", f"{GW_IP}:{AGENT_PORT}", "--token", token,
             "--bootdigest", f"sha256:{boot_hex}", "--gatewayaddr", gateway_address, "--node", node],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd="/")
    return Proc(proc, log)


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 60.0, every: float = 0.5) -> Any:
    """Poll until probe() is truthy: a bounded wait, never a speed assertion."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@dataclass
class Cluster:
    """Cluster-scoped trustcap objects through the real API server; deletes what it created."""

    custom: Any
    core: Any
    created: list[tuple[str, str]] = field(default_factory=list)

    def create(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.create_cluster_custom_object(GROUP, VERSION, plural, body,
                                                                       field_validation="Strict")
        self.created.append((plural, body["metadata"]["name"]))
        return obj

    def get(self, plural: str, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_cluster_custom_object(GROUP, VERSION, plural, name)
        return obj

    def patch_status(self, plural: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.patch_cluster_custom_object_status(GROUP, VERSION, plural, name,
                                                                             {"status": status})
        return obj

    def events_for(self, name: str) -> list[dict[str, str]]:
        """Events about the object `name` (cluster-scoped objects' events land in `default`)."""
        items = self.core.list_event_for_all_namespaces(field_selector=f"involvedObject.name={name}").items
        return [{"type": e.type, "reason": e.reason, "message": e.message} for e in items]

    def cleanup(self) -> None:
        from kubernetes.client.exceptions import ApiException

        for plural, name in reversed(self.created):
            try:
                self.custom.patch_cluster_custom_object(GROUP, VERSION, plural, name,
                                                        {"metadata": {"finalizers": None}})
                self.custom.delete_cluster_custom_object(GROUP, VERSION, plural, name)
            except ApiException as exc:
                if exc.status != 404:
                    raise
