"""`helm install` of the trustcap chart on a real one-node cluster (`stack up --node`): operator, gateway and
netboot pods reach Ready, and `helm test` passes.

Needs the component images in Docker at the chart's appVersion (trustcap/operator, trustcap/gateway,
trustcap/netboot); the test loads them into the node's containerd (no registry: pullPolicy Never). Like
e2e/stack/test_node_e2e.py it runs its own node stack (own state, ports, bridge and subnet), never the
shared stack, and only one node stack may run per machine.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import docker
import pytest
import yaml

from trustcap.stack.node import NodeNet
from trustcap.stack.paths import repo_root
from trustcap.stack.stack import Stack
from trustcap.trustroot.software import SoftwareTrustRoot

NET = NodeNet(name="trustcap-chart", bridge="tcapchartbr0", pod_cidr="10.213.2.0/24", kubelet_port=10351)
NS = "trustcap"
RELEASE = "trustcap"
CHART = repo_root()
APP_VERSION = str(yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"])
IMAGES = [f"trustcap/{part}:{APP_VERSION}" for part in ("operator", "gateway", "netboot")]


class Cluster:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.env = {"KUBECONFIG": str(stack.kubeconfig), "PATH": f"{stack.bin}:/usr/sbin:/usr/bin:/sbin:/bin",
                    "HOME": str(stack.state)}

    def run(self, tool: str, *args: str, check: bool = True, input: str | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(self.stack.bin / tool), *args], capture_output=True, text=True, env=self.env,
                              input=input, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stdout}\n"
                                 f"{proc.stderr}\n{self.diagnose()}")
        return proc

    def get(self, *args: str) -> Any:
        return json.loads(self.run("kubectl", "get", *args, "-o", "json").stdout)

    def diagnose(self) -> str:
        pods = subprocess.run([str(self.stack.bin / "kubectl"), "get", "pods,events", "-A", "-o", "wide"],
                              capture_output=True, text=True, env=self.env, timeout=60, check=False)
        return pods.stdout[-4000:]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # The images are built from this checkout (cached: seconds when nothing changed, a rebuilt layer when
    # the code did), so the pods run the code under test, never a stale image.
    from trustcap.stack import component_images, images

    component_images.build([images.host_arch()])
    client = docker.from_env()
    for image in IMAGES:
        client.images.get(image)  # build() tagged them: a missing one is a failure, not a skip
    state = tmp_path_factory.mktemp("chart-node")
    stack = Stack(state=state, kine_port=32579, apiserver_port=36643, node_net=NET)
    try:
        stack.up(with_image=True, with_node=True)
        stack.load_images(*IMAGES)
        yield Cluster(stack)
    finally:
        stack.down()
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def installed(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> float:
    """Install the chart with every part on this amd64 node; returns the seconds to a Ready install."""
    host = tmp_path_factory.mktemp("chart-host")
    cluster.run("kubectl", "create", "namespace", NS)
    # a software trust root for the gateway (no Zymkey on this machine), provisioned in its host folder
    kek = secrets.token_bytes(32)
    cluster.run("kubectl", "-n", NS, "create", "secret", "generic", "gateway-kek", f"--from-literal=kek={kek.hex()}")
    SoftwareTrustRoot.create(host / "trustroot", kek)
    values = {
        "global": {"image": {"pullPolicy": "Never"}, "bootStateHostPath": str(host / "boot")},
        "gateway": {
            "nodeSelector": None,
            "listen": f"{NET.ip}:7443",
            "bootDigests": ["sha256:" + "ab" * 32],
            "trustRoot": {"hostPath": str(host / "trustroot"), "zymkey": {"enabled": False},
                          "kekSecret": "gateway-kek"},
            "journalHostPath": str(host / "journal"),
            # the chart's default policy has no attestation section, which the gateway requires
            "policy": {
                "apiVersion": "trustcap.io/v1alpha1", "kind": "GatewayPolicy",
                "monitor": {"meanIntervalSeconds": 10, "minIntervalSeconds": 0.5, "maxQuoteAgeSeconds": 30},
                "actions": {"critical": "quarantine", "high": "stop", "medium": "report",
                            "unreachable": "stop"},
                "attestation": {"apiVersion": "trustcap.io/v1alpha1", "kind": "AttestationPolicy",
                                "bootImages": ["0x" + "ab" * 32]},
            },
        },
        "netboot": {"nodeSelector": None, "bind": NET.ip, "tftpPort": 10069, "httpPort": 18080,
                    "bootRootHostPath": str(host / "boot-root")},
    }
    values_file = host / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    start = time.monotonic()
    cluster.run("helm", "install", RELEASE, str(CHART), "-n", NS, "-f", str(values_file), "--wait",
                "--timeout", "8m")
    # helm's --wait counts a one-node DaemonSet ready with none ready (desired - maxUnavailable = 0)
    cluster.run("kubectl", "wait", "-n", NS, "--for=condition=Ready", "pod", "--all", "--timeout=300s")
    # The workloads' own status lags their pods' (the controllers write it): a Ready pod can still be
    # counted numberReady 0 by its DaemonSet for a moment on a loaded machine (seen once in CI).
    for kind in ("deployment", "daemonset"):
        cluster.run("kubectl", "rollout", "status", kind, "-n", NS, "-l", f"app.kubernetes.io/instance={RELEASE}",
                    "--timeout=120s")
    took = time.monotonic() - start
    print(f"\nhelm install to a Ready release: {took:.1f}s")
    return took


def _ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def test_install_brings_up_operator_gateway_and_netboot(cluster: Cluster, installed: float) -> None:
    status = json.loads(cluster.run("helm", "status", RELEASE, "-n", NS, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    crds = {c["metadata"]["name"] for c in cluster.get("crds")["items"]}
    assert any(name.endswith(".trustcap.io") for name in crds), crds
    deploy = cluster.get("deployment", "-n", NS, "-l", "app.kubernetes.io/component=operator")["items"]
    assert len(deploy) == 1 and deploy[0]["status"].get("readyReplicas") == 1, deploy
    for component in ("gateway", "netboot"):
        (ds,) = cluster.get("daemonset", "-n", NS, "-l", f"app.kubernetes.io/component={component}")["items"]
        assert ds["status"]["numberReady"] == ds["status"]["desiredNumberScheduled"] == 1, (component, ds["status"])
    pods = cluster.get("pods", "-n", NS)["items"]
    by_component = {p["metadata"]["labels"].get("app.kubernetes.io/component"): p for p in pods}
    for component in ("operator", "gateway", "netboot"):
        pod = by_component.get(component)
        assert pod is not None, f"no {component} pod: {[p['metadata']['name'] for p in pods]}"
        assert pod["spec"]["nodeName"] == NET.name
        assert _ready(pod), pod["status"]
        restarts = {c["name"]: c.get("restartCount", 0) for c in pod["status"].get("containerStatuses", [])}
        if any(restarts.values()):
            previous = cluster.run("kubectl", "logs", "-n", NS, pod["metadata"]["name"], "--previous", check=False)
            raise AssertionError(f"{component} restarted {restarts}; its previous run said:\n"
                                 f"{(previous.stdout + previous.stderr)[-3000:]}")
        # the pods run the locally built images, not something pulled
        assert pod["spec"]["containers"][0]["image"].endswith(f"trustcap/{component}:{APP_VERSION}")


def test_helm_test_passes(cluster: Cluster, installed: float) -> None:
    proc = cluster.run("helm", "test", RELEASE, "-n", NS, "--logs", "--timeout", "5m")
    phases = [line.split(":", 1)[1].strip() for line in proc.stdout.splitlines() if line.startswith("Phase:")]
    assert phases and all(p == "Succeeded" for p in phases), proc.stdout
    assert "all checks passed" in proc.stdout, proc.stdout


def test_uninstall_and_namespace_deletion_finish(cluster: Cluster, installed: float) -> None:
    cluster.run("helm", "uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "5m")
    cluster.run("kubectl", "delete", "namespace", NS, "--timeout=180s")
    assert cluster.run("kubectl", "get", "namespace", NS, check=False).returncode != 0

