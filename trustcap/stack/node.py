"""The one-node cluster of `trustcap stack up --node`: what each node daemon is started with.

    kube-apiserver  binds the node IP (pods must reach it; loopback is not routable from a pod)
    controller-manager, scheduler   -> the API server, admin kubeconfig, no listening port
    containerd 2.x  its own socket, root and state under the stack's state folder
      └── CNI bridge (Debian's containernetworking-plugins), host-local IPAM, no masquerade
    kubelet         node IP on the pods' bridge, which the stack creates; cgroup v1 and swap allowed
    kube-proxy      nftables mode: Services (the API server's 10.96.0.1 for in-cluster clients)
    coredns         on the node IP, port 53: Service names (cluster.local) for pods; nothing forwarded

The kubelet refuses a loopback node IP and the API server's `kubernetes` Service cannot point at one, so
the node gets its own address: the pods' gateway, the first address of the pod subnet, on the pods'
bridge. The stack creates the bridge before the API server binds that address; the CNI bridge plugin
then finds its gateway already there (it refuses a bridge with any other IPv4 address). This kernel has
no `dummy` link type, and a bridge without an uplink has no wire either, so nothing sent to the node or
a pod leaves the machine.
Pure rendering only: the Stack starts the daemons (trustcap/stack/stack.py).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["CLUSTER_DOMAIN", "NodeNet", "NodePaths", "cgroup_root", "cni_conflist", "containerd_config",
           "controller_manager_argv", "coredns_argv", "corefile", "forward_rule", "kube_proxy_argv",
           "kubeconfig", "kubelet_argv", "kubelet_config", "lacks_cap_sys_resource", "scheduler_argv"]


@dataclass(frozen=True)
class NodeNet:
    """The node's addresses. Two stacks on one machine (the shared one and a test's) need different ones."""

    name: str = "trustcap-node"
    #: the CNI bridge, at most 15 characters (IFNAMSIZ)
    bridge: str = "trustcapbr0"
    #: the pods' subnet; its first address is the pods' gateway and the node IP
    pod_cidr: str = "10.213.0.0/24"
    kubelet_port: int = 10250

    def __post_init__(self) -> None:
        if not 0 < len(self.bridge) <= 15:
            raise ValueError(f"bridge name {self.bridge!r} must be 1 to 15 characters (Linux IFNAMSIZ)")
        net = ipaddress.ip_network(self.pod_cidr)
        if net.version != 4 or net.prefixlen > 29:
            raise ValueError(f"pod subnet {self.pod_cidr} must be IPv4 with room for pods (/29 or wider)")
        if net.is_loopback:
            raise ValueError(f"pod subnet {self.pod_cidr} is loopback: the kubelet refuses a loopback node IP")

    @property
    def ip(self) -> str:
        return str(next(ipaddress.ip_network(self.pod_cidr).hosts()))

    @property
    def ip_with_prefix(self) -> str:
        return f"{self.ip}/{ipaddress.ip_network(self.pod_cidr).prefixlen}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "bridge": self.bridge,
                "pod_cidr": self.pod_cidr, "kubelet_port": self.kubelet_port}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NodeNet:
        return cls(**{k: data[k] for k in cls().to_json() if k in data})


@dataclass(frozen=True)
class NodePaths:
    """Everything of the node under the stack's state folder, so that two stacks never share a file."""

    state: Path

    @property
    def containerd_dir(self) -> Path:
        return self.state / "containerd"

    @property
    def containerd_config(self) -> Path:
        return self.containerd_dir / "config.toml"

    @property
    def containerd_socket(self) -> Path:
        return self.containerd_dir / "containerd.sock"

    @property
    def cni_conf_dir(self) -> Path:
        return self.state / "cni" / "net.d"

    @property
    def cni_ipam_dir(self) -> Path:
        return self.state / "cni" / "ipam"

    @property
    def kubelet_dir(self) -> Path:
        return self.state / "kubelet"

    @property
    def kubelet_config(self) -> Path:
        return self.state / "kubelet-config.yaml"

    @property
    def kubelet_kubeconfig(self) -> Path:
        return self.state / "kubelet.kubeconfig"


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def containerd_config(p: NodePaths, *, sandbox_image: str, cni_bin_dir: str, runc: str,
                      restrict_oom_score_adj: bool) -> str:
    """containerd 2.x configuration (version 3): its own socket and folders, runc with cgroupfs (the
    machine's Docker Engine and this kubelet use cgroupfs on cgroup v1), the locally loaded sandbox image,
    CRI streaming on loopback only, no metrics or debug listener."""
    d = p.containerd_dir
    return "\n".join([
        "version = 3",
        f"root = {_toml_str(str(d / 'root'))}",
        f"state = {_toml_str(str(d / 'run'))}",
        "",
        "[grpc]",
        f"  address = {_toml_str(str(p.containerd_socket))}",
        "",
        "[ttrpc]",
        f"  address = {_toml_str(str(d / 'containerd.sock.ttrpc'))}",
        "",
        "[debug]",
        '  address = ""',
        "",
        "[metrics]",
        '  address = ""',
        "",
        "[plugins.'io.containerd.grpc.v1.cri']",
        "  disable_tcp_service = true",
        '  stream_server_address = "127.0.0.1"',
        '  stream_server_port = "0"',
        "",
        "[plugins.'io.containerd.cri.v1.images']",
        '  snapshotter = "overlayfs"',
        "",
        "[plugins.'io.containerd.cri.v1.images'.pinned_images]",
        f"  sandbox = {_toml_str(sandbox_image)}",
        "",
        "[plugins.'io.containerd.cri.v1.runtime']",
        "  enable_cdi = false",
        # The machine's root has no CAP_SYS_RESOURCE (a container's bounding set), so runc cannot lower
        # oom_score_adj below containerd's own: without this every pod sandbox (the kubelet asks -998)
        # fails with "failed to update /proc/self/oom_score_adj: Permission denied".
        f"  restrict_oom_score_adj = {'true' if restrict_oom_score_adj else 'false'}",
        "",
        "[plugins.'io.containerd.cri.v1.runtime'.containerd]",
        '  default_runtime_name = "runc"',
        "",
        "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]",
        '  runtime_type = "io.containerd.runc.v2"',
        "",
        "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]",
        f"  BinaryName = {_toml_str(runc)}",
        "  SystemdCgroup = false",
        "",
        "[plugins.'io.containerd.cri.v1.runtime'.cni]",
        f"  bin_dirs = [{_toml_str(cni_bin_dir)}]",
        f"  conf_dir = {_toml_str(str(p.cni_conf_dir))}",
        "  max_conf_num = 1",
        "",
    ])


def cni_conflist(net: NodeNet, p: NodePaths) -> dict[str, Any]:
    """A bridge with host-local addresses. No masquerade: pod traffic has nowhere to go but this machine."""
    return {
        "cniVersion": "1.0.0",
        "name": "trustcap",
        "plugins": [
            {
                "type": "bridge",
                "bridge": net.bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": net.pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(p.cni_ipam_dir),
                },
            },
        ],
    }


def kubelet_config(net: NodeNet, p: NodePaths, *, ca_file: Path) -> dict[str, Any]:
    """KubeletConfiguration for a node inside a cgroup-v1 container without swap accounting."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # Kubernetes 1.35+ refuses cgroup v1 unless told; this machine mounts v1 hierarchies (docs/decisions/0111).
        "failCgroupV1": False,
        "failSwapOn": False,
        "cgroupDriver": "cgroupfs",
        "containerRuntimeEndpoint": f"unix://{p.containerd_socket}",
        "address": net.ip,
        "port": net.kubelet_port,
        "readOnlyPort": 0,
        "healthzPort": 0,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca_file)},
        },
        "authorization": {"mode": "Webhook"},
        # Images are loaded locally and cannot be pulled again: image GC must never remove one.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        # A development machine's disk is often fuller than the defaults allow; eviction would taint the
        # node and stop every test, so only a nearly full disk counts.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "2%", "imagefs.available": "2%",
                         "nodefs.inodesFree": "2%"},
        "resolvConf": "/etc/resolv.conf",
        "clusterDNS": [net.ip],
        "clusterDomain": CLUSTER_DOMAIN,
        # Each node has its own cgroup subtree (created by the stack) and pod log folder, so that a test's
        # node and the shared one do not manage each other's pods.
        "cgroupRoot": cgroup_root(net),
        "podLogsDir": str(p.state / "pod-logs"),
        "staticPodPath": "",
        "registerNode": True,
        "serializeImagePulls": False,
    }


CLUSTER_DOMAIN = "cluster.local"


def corefile(net: NodeNet, *, kubeconfig: Path) -> str:
    """CoreDNS answers the cluster's names on the node IP only. No `forward`: no name outside the cluster
    resolves, since no outside address may be reached from here."""
    return "\n".join([
        ".:53 {",
        f"    bind {net.ip}",
        "    errors",
        f"    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{",
        f"        kubeconfig {kubeconfig} trustcap-local",
        "        pods insecure",
        "        fallthrough in-addr.arpa ip6.arpa",
        "    }",
        "    cache 30",
        "}",
        "",
    ])


def coredns_argv(binary: Path, corefile_path: Path) -> list[str]:
    return [str(binary), "-conf", str(corefile_path)]


def kube_proxy_argv(binary: Path, net: NodeNet, *, kubeconfig: Path) -> list[str]:
    return [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        f"--hostname-override={net.name}",
        "--proxy-mode=nftables",
        f"--cluster-cidr={net.pod_cidr}",
        # conntrack is the machine's, not ours to resize (and /sys/module is read-only in a container)
        "--conntrack-max-per-core=0",
        # no health or metrics listener: nothing probes them, and a fixed port would clash across stacks
        "--healthz-bind-address=",
        "--metrics-bind-address=",
        "--v=1",
    ]


def forward_rule(net: NodeNet) -> list[str]:
    """iptables rule (after `-I`/`-D FORWARD`) that lets pods reach each other across the bridge: bridged
    frames pass the iptables FORWARD chain (bridge-nf-call-iptables), whose policy Docker sets to DROP."""
    return ["-i", net.bridge, "-o", net.bridge, "-m", "comment", "--comment", f"trustcap node {net.name}",
            "-j", "ACCEPT"]


def cgroup_root(net: NodeNet) -> str:
    return f"/{net.name}"


def kubeconfig(server: str, ca: Path, crt: Path, key: Path, user: str) -> str:
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "trustcap-local", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(crt), "client-key": str(key)}}],
        "contexts": [{"name": "trustcap-local", "context": {"cluster": "trustcap-local", "user": user}}],
        "current-context": "trustcap-local",
    }
    return yaml.safe_dump(cfg, sort_keys=False)


def controller_manager_argv(binary: Path, *, kubeconfig: Path, ca_crt: Path, ca_key: Path, sa_key: Path,
                            service_cidr: str) -> list[str]:
    return [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        # The token controller signs legacy tokens and the root-CA publisher fills kube-root-ca.crt,
        # which every projected service-account volume needs before a pod can start.
        f"--service-account-private-key-file={sa_key}",
        f"--root-ca-file={ca_crt}",
        f"--cluster-signing-cert-file={ca_crt}",
        f"--cluster-signing-key-file={ca_key}",
        f"--service-cluster-ip-range={service_cidr}",
        "--use-service-account-credentials=true",
        "--leader-elect=false",
        # The CNI's host-local IPAM hands out pod addresses; no node CIDR is allocated.
        "--allocate-node-cidrs=false",
        # No serving port: two stacks on one machine would collide on 10257, and nothing scrapes it.
        "--secure-port=0",
        "--v=1",
    ]


def scheduler_argv(binary: Path, *, kubeconfig: Path) -> list[str]:
    return [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        "--leader-elect=false",
        "--secure-port=0",
        "--v=1",
    ]


def kubelet_argv(binary: Path, net: NodeNet, p: NodePaths) -> list[str]:
    return [
        str(binary),
        f"--config={p.kubelet_config}",
        f"--kubeconfig={p.kubelet_kubeconfig}",
        f"--root-dir={p.kubelet_dir}",
        f"--cert-dir={p.kubelet_dir / 'pki'}",
        f"--hostname-override={net.name}",
        f"--node-ip={net.ip}",
        "--v=1",
    ]


#: CAP_SYS_RESOURCE, needed to lower a process's oom_score_adj (capabilities(7))
_CAP_SYS_RESOURCE = 24


def lacks_cap_sys_resource(status: str) -> bool:
    """True when the `/proc/self/status` text shows no effective CAP_SYS_RESOURCE (e.g. inside a container)."""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return not (int(line.split()[1], 16) >> _CAP_SYS_RESOURCE) & 1
    return False
