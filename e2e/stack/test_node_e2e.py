"""`stack up --node`: a real one-node cluster that runs pods, serves Services by name and deletes namespaces.

The node runs in its own stack (own state folder, kine and API server ports, bridge and pod subnet), so
the shared API-server-only stack at 127.0.0.1:36443 that other suites use is never touched. Only one
node stack may run per machine (kube-proxy's nftables table is machine-wide): stop the shared stack's
node (`trustcap stack down`) before running this file if it has one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trustcap.stack import versions
from trustcap.stack.images import BASE_IMAGE
from trustcap.stack.node import NodeNet
from trustcap.stack.stack import Stack

NET = NodeNet(name="trustcap-e2e", bridge="tcape2ebr0", pod_cidr="10.213.1.0/24", kubelet_port=10350)


class Cluster:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(self.stack.bin / "kubectl"), f"--kubeconfig={self.stack.kubeconfig}", *args],
                              capture_output=True, text=True, input=input, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr}")
        return proc

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def wait_phase(self, ns: str, pod: str, phases: set[str], timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        obj: dict[str, Any] = {}
        while time.monotonic() < deadline:
            obj = self.get("pod", "-n", ns, pod)
            if obj.get("status", {}).get("phase") in phases:
                return obj
            time.sleep(0.5)
        events = self.kubectl("get", "events", "-n", ns, check=False).stdout
        raise AssertionError(f"pod {ns}/{pod} not in {phases} after {timeout}s: {obj.get('status')}\n{events}")


def _pod(name: str, script: str, *, restart: str = "Never") -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 2,
            "containers": [{"name": "main", "image": BASE_IMAGE, "imagePullPolicy": "Never",
                            "command": ["/bin/sh", "-c", script]}],
        },
    })


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state = tmp_path_factory.mktemp("node")
    stack = Stack(state=state, kine_port=32479, apiserver_port=36543, node_net=NET)
    start = time.monotonic()
    try:
        stack.up(with_image=True, with_node=True)
        print(f"\nnode stack up (cold, images loaded) in {time.monotonic() - start:.1f}s")
        # a second up finds everything running: the warm start time of `up --node`
        start = time.monotonic()
        stack.up(with_image=True, with_node=True)
        print(f"node stack up again (warm) in {time.monotonic() - start:.1f}s")
        yield Cluster(stack)
    finally:
        stack.down()
        shutil.rmtree(state, ignore_errors=True)


def test_node_is_ready_with_the_pinned_kubelet_and_containerd(cluster: Cluster) -> None:
    n = cluster.get("node", NET.name)
    conds = {c["type"]: c["status"] for c in n["status"]["conditions"]}
    assert conds["Ready"] == "True", n["status"]["conditions"]
    info = n["status"]["nodeInfo"]
    assert info["kubeletVersion"] == versions.KUBERNETES
    assert info["containerRuntimeVersion"] == f"containerd://{versions.CONTAINERD.lstrip('v')}"
    assert {"type": "InternalIP", "address": NET.ip} in n["status"]["addresses"]
    names = [p.name for p in cluster.stack.status()]
    for part in ("containerd", "kube-controller-manager", "kube-scheduler", "kube-proxy", "coredns", "kubelet"):
        assert part in names
    assert all(p.running for p in cluster.stack.status()), cluster.stack.status()


def test_a_pod_of_the_local_base_image_runs_to_completion(cluster: Cluster) -> None:
    cluster.kubectl("apply", "-n", "default", "-f", "-",
                    input=_pod("done", "echo ran-on-$(cat /etc/hostname); cat /var/run/secrets/kubernetes.io/"
                                       "serviceaccount/namespace"))
    obj = cluster.wait_phase("default", "done", {"Succeeded", "Failed"})
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    assert obj["spec"]["nodeName"] == NET.name
    term = obj["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0
    # logs come from the kubelet through the API server; the service-account token volume was mounted
    assert cluster.kubectl("logs", "-n", "default", "done").stdout.split() == ["ran-on-done", "default"]
    # the control: a failing command fails the pod with its own exit code, so Succeeded above is real
    cluster.kubectl("apply", "-n", "default", "-f", "-", input=_pod("fails", "exit 3"))
    failed = cluster.wait_phase("default", "fails", {"Succeeded", "Failed"})
    assert failed["status"]["phase"] == "Failed"
    assert failed["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3


def test_pods_reach_the_api_by_service_name_and_exec_works(cluster: Cluster) -> None:
    # CoreDNS resolves the Service name, kube-proxy carries 10.96.0.1:443 to the API server on the node IP
    script = ("exec python3 -c \"import socket; a = socket.getaddrinfo('kubernetes.default.svc', 443)[0][4][0]; "
              "socket.create_connection((a, 443), timeout=5).close(); print('reached', a)\"")
    cluster.kubectl("apply", "-n", "default", "-f", "-", input=_pod("svc", script))
    obj = cluster.wait_phase("default", "svc", {"Succeeded", "Failed"})
    logs = cluster.kubectl("logs", "-n", "default", "svc").stdout
    assert obj["status"]["phase"] == "Succeeded", logs
    assert logs.split() == ["reached", "10.96.0.1"]
    # the control: a Service that does not exist does not resolve (CoreDNS answers, and answers no)
    cluster.kubectl("apply", "-n", "default", "-f", "-",
                    input=_pod("nosvc", script.replace("kubernetes.default.svc", "absent.default.svc")))
    assert cluster.wait_phase("default", "nosvc", {"Succeeded", "Failed"})["status"]["phase"] == "Failed"
    assert "gaierror" in cluster.kubectl("logs", "-n", "default", "nosvc").stdout
    # exec goes API server -> kubelet -> containerd
    cluster.kubectl("apply", "-n", "default", "-f", "-", input=_pod("long", "exec sleep 600"))
    cluster.kubectl("wait", "-n", "default", "--for=condition=Ready", "pod/long", "--timeout=120s")
    assert cluster.kubectl("exec", "-n", "default", "long", "--", "cat", "/etc/hostname").stdout.strip() == "long"


def test_a_namespace_deletion_finishes(cluster: Cluster) -> None:
    cluster.kubectl("create", "namespace", "goes-away")
    cluster.kubectl("apply", "-n", "goes-away", "-f", "-", input=_pod("runner", "exec sleep 600"))
    cluster.kubectl("wait", "-n", "goes-away", "--for=condition=Ready", "pod/runner", "--timeout=120s")
    cluster.kubectl("delete", "namespace", "goes-away", "--wait=false")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        proc = cluster.kubectl("get", "namespace", "goes-away", "-o", "json", check=False)
        if proc.returncode != 0 and "NotFound" in proc.stderr:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"namespace goes-away still there: {proc.stdout[-800:]}")


def test_down_stops_the_node_and_leaves_no_bridge(cluster: Cluster) -> None:
    stack = cluster.stack
    daemons = (stack.kubelet, stack.kube_proxy, stack.coredns, stack.scheduler, stack.controller_manager,
               stack.containerd)
    assert all(d.pid() is not None for d in daemons)
    stopped = stack.down()
    for d in daemons:
        assert d.name in stopped
        assert d.pid() is None
    assert subprocess.run(["ip", "link", "show", "dev", NET.bridge], capture_output=True, check=False).returncode != 0
    rules = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True, check=False).stdout
    assert f"trustcap node {NET.name}" not in rules
    # no mount of the kubelet or containerd is left behind, so the state folder can be removed
    assert str(stack.state) not in Path("/proc/self/mountinfo").read_text()
    # no container outlives the node: every shim of this containerd is gone
    sock = str(stack.node_paths.containerd_socket).encode()
    shims = [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_has(p, sock)]
    assert not shims, f"containerd shims still running: {shims}"
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False).stdout
    assert "kube-proxy" not in tables
    assert not any(Path("/sys/fs/cgroup", h, NET.name).exists() for h in ("memory", "cpu", "pids"))


def _cmdline_has(proc: Path, needle: bytes) -> bool:
    try:
        return needle in (proc / "cmdline").read_bytes()
    except OSError:
        return False
