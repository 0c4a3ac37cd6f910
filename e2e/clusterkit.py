"""The cluster side every e2e suite that runs the operator needs: our CRDs on the stack's real API
server, the operator as a real process, a tracker that deletes the cluster-scoped objects a test made,
and the gateway namespace's link to the API server.

Importable by its unique name from any e2e folder (pytest puts e2e/ on sys.path for e2e/conftest.py),
like netlab. The suites keep their own fixture names (e2e/enrol: `enrol_crds`, `cluster`, `child_env`,
`operator_proc`; e2e/netboot: `join_crds`, `join_cluster`, `join_operator`) as thin wrappers over the
helpers here, so one piece of code applies the CRDs, tracks objects and runs the operator for both.

    host: kube-apiserver 127.0.0.1:P  <--  ClusterLink  <--  gateway namespace: 127.0.0.1:P
          python -m trustcap.operator      (a host thread)     (the Pi's cluster link; TLS name unchanged)

Everything made here is removed at teardown, even when a test fails; no address outside this machine is
ever used.
"""

from __future__ import annotations

import contextlib
import os
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

import yaml
from netlab import in_netns

__all__ = ["CRD_DIR", "GROUP", "NODE_CRDS", "OPERATOR_NS", "VERSION", "Cluster", "ClusterLink", "Proc",
           "apiserver_port", "apply_node_crds", "operator_env", "register_node", "running_operator", "start_operator",
           "tracked_cluster", "wait_for"]

GROUP, VERSION = "trustcap.io", "v1alpha1"
OPERATOR_NS = "trustcap-e2e-enrol"  # the operator's namespace filter; HPCNode & co. are cluster-scoped
CRD_DIR = Path(__file__).resolve().parents[1] / "crds"
#: the CRD files of the node join, and the names `kubectl wait` needs for each
NODE_CRDS = {"hpcnode.yaml": "crd/hpcnodes.trustcap.io", "gateway.yaml": "crd/gateways.trustcap.io",
             "bootimage.yaml": "crd/bootimages.trustcap.io"}


def apply_node_crds(kubectl: Any) -> None:
    """The CRDs of the node join, Established, and the operator's namespace (kopf watches nothing while
    its namespace filter matches none; kept, never deleted: decision 0002). Idempotent, so any suite may
    apply them first."""
    kubectl("apply", *(a for f in NODE_CRDS for a in ("-f", str(CRD_DIR / f))))
    kubectl("wait", "--for=condition=Established", *NODE_CRDS.values(), "--timeout=60s", timeout=90)
    kubectl("apply", "-f", "-", input=yaml.safe_dump(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NS}}))


def apiserver_port(stack: dict[str, Any]) -> int:
    """The stack's kube-apiserver port: the one a ClusterLink forwards."""
    return int(str(stack["apiserver"]).rsplit(":", 1)[1])


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


def operator_env(kube_env: dict[str, str]) -> dict[str, str]:
    """The stack's environment for a child process, minus what must not reach it."""
    env = dict(kube_env)
    env.pop("PYTHONPATH", None)  # never let the repo root shadow the stdlib `operator` module
    env.pop("TRUSTCAP_CHAIN_DEPLOYMENT", None)  # the chain-writer stays off: not under test here
    return env


def start_operator(env: dict[str, str], log: Path) -> Proc:
    """`python -m trustcap.operator` as a real process, away from the repo root (decision 0001)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-P", "-m", "trustcap.operator", "--namespace", OPERATOR_NS,
                                 "--standalone", "--verbose"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=log.parent)
    return Proc(proc, log)


@contextlib.contextmanager
def running_operator(env: dict[str, str], log: Path) -> Iterator[Proc]:
    """The operator for the block, stopped after it even when a test fails; its log is printed at the
    end when TRUSTCAP_E2E_SHOW_LOGS is set."""
    op = start_operator(env, log)
    try:
        yield op
    finally:
        op.stop()
        if os.environ.get("TRUSTCAP_E2E_SHOW_LOGS"):
            print(op.text())


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


@contextlib.contextmanager
def tracked_cluster(k8s_api: Any) -> Iterator[Cluster]:
    """A Cluster on the stack's API server whose objects are deleted after the block."""
    from kubernetes import client

    tracker = Cluster(client.CustomObjectsApi(k8s_api), client.CoreV1Api(k8s_api))
    try:
        yield tracker
    finally:
        tracker.cleanup()


def register_node(cluster: Cluster, *, node: str, gateway: str, boot_image: str, address: str, signing_key: str,
                  endpoint: str, files: dict[str, dict[str, str]], image_digest: str, mac: str) -> None:
    """What the operator needs to judge one enrolment: the Gateway (its trust root's address and key), an
    Approved BootImage (`files`: kernel, initrd, ipxeScript as {path, digest}; `image_digest`, the approved
    boot digest) and the HPCNode behind that gateway; all deleted with the cluster tracker."""
    cluster.create("gateways", {"apiVersion": "trustcap.io/v1alpha1", "kind": "Gateway", "metadata": {"name": gateway},
                                "spec": {"address": address, "signingKey": signing_key, "vrfKey": "0x02" + "00" * 32,
                                         "trustRoot": "software", "endpoint": endpoint}})
    cluster.create("bootimages", {"apiVersion": "trustcap.io/v1alpha1", "kind": "BootImage",
                                  "metadata": {"name": boot_image}, "spec": {"version": "e2e", **files}})
    cluster.patch_status("bootimages", boot_image, {"phase": "Approved", "approvedOnChain": True,
                                                    "imageDigest": image_digest})
    cluster.create("hpcnodes", {"apiVersion": "trustcap.io/v1alpha1", "kind": "HPCNode", "metadata": {"name": node},
                                "spec": {"gateway": gateway, "mac": mac, "bootImage": boot_image}})
