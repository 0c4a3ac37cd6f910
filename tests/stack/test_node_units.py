"""The node of `stack up --node` without starting it: addresses, rendered configs, argv, certificates."""

from __future__ import annotations

import ipaddress
import json
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from trustcap.stack import build, node, pki
from trustcap.stack.stack import Stack, _containerd_name

NET = node.NodeNet(name="n1", bridge="tcbr1", pod_cidr="10.213.7.0/24", kubelet_port=10350)


def test_node_ip_is_the_pods_gateway() -> None:
    # The CNI bridge plugin refuses a bridge holding any IPv4 address but its gateway, so the node IP must
    # be exactly the subnet's first address.
    assert NET.ip == "10.213.7.1"
    assert NET.ip_with_prefix == "10.213.7.1/24"
    assert node.NodeNet.from_json(json.loads(json.dumps(NET.to_json()))) == NET


@pytest.mark.parametrize(("kwargs", "match"), [
    pytest.param({"bridge": "a-bridge-name-too-long"}, "15 characters", id="ifnamsiz"),
    pytest.param({"pod_cidr": "127.0.0.0/24"}, "loopback", id="loopback-node-ip"),
    pytest.param({"pod_cidr": "10.0.0.0/30"}, "room for pods", id="subnet-too-small"),
    pytest.param({"pod_cidr": "fd00::/64"}, "IPv4", id="ipv6"),
])
def test_node_net_rejects(kwargs: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        node.NodeNet(**kwargs)  # type: ignore[arg-type]


def test_containerd_config(tmp_path: Path) -> None:
    p = node.NodePaths(tmp_path)
    text = node.containerd_config(p, sandbox_image="docker.io/trustcap/pause:bookworm", cni_bin_dir="/usr/lib/cni",
                                  runc="/usr/sbin/runc", restrict_oom_score_adj=True)
    cfg = tomllib.loads(text)
    assert cfg["version"] == 3
    assert cfg["grpc"]["address"] == str(p.containerd_socket)
    assert cfg["root"].startswith(str(tmp_path)) and cfg["state"].startswith(str(tmp_path))
    assert cfg["metrics"]["address"] == "" and cfg["debug"]["address"] == ""
    plugins = cfg["plugins"]
    assert plugins["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"] == "docker.io/trustcap/pause:bookworm"
    runtime = plugins["io.containerd.cri.v1.runtime"]
    assert runtime["restrict_oom_score_adj"] is True
    runc = runtime["containerd"]["runtimes"]["runc"]
    assert runc["options"] == {"BinaryName": "/usr/sbin/runc", "SystemdCgroup": False}
    assert runtime["cni"]["conf_dir"] == str(p.cni_conf_dir)
    assert runtime["cni"]["bin_dirs"] == ["/usr/lib/cni"]
    assert plugins["io.containerd.grpc.v1.cri"]["stream_server_address"] == "127.0.0.1"
    off = tomllib.loads(node.containerd_config(p, sandbox_image="x", cni_bin_dir="/c", runc="/r",
                                               restrict_oom_score_adj=False))
    assert off["plugins"]["io.containerd.cri.v1.runtime"]["restrict_oom_score_adj"] is False


@pytest.mark.parametrize(("capeff", "lacks"), [
    # this machine's root: every capability but CAP_SYS_RESOURCE (bit 24)
    pytest.param("000001fffeffffff", True, id="container-without-sys-resource"),
    pytest.param("000001ffffffffff", False, id="full-root"),
    pytest.param("0000000000000000", True, id="unprivileged"),
])
def test_lacks_cap_sys_resource(capeff: str, lacks: bool) -> None:
    status = f"Name:\tpython3\nCapInh:\t0000000000000000\nCapEff:\t{capeff}\nCapBnd:\t{capeff}\n"
    assert node.lacks_cap_sys_resource(status) is lacks


def test_kubelet_config(tmp_path: Path) -> None:
    p = node.NodePaths(tmp_path)
    cfg = node.kubelet_config(NET, p, ca_file=tmp_path / "ca.crt")
    assert cfg["kind"] == "KubeletConfiguration"
    assert cfg["failCgroupV1"] is False and cfg["failSwapOn"] is False
    assert cfg["cgroupDriver"] == "cgroupfs"
    assert cfg["containerRuntimeEndpoint"] == f"unix://{p.containerd_socket}"
    assert (cfg["address"], cfg["port"]) == ("10.213.7.1", 10350)
    assert cfg["clusterDNS"] == ["10.213.7.1"] and cfg["clusterDomain"] == "cluster.local"
    assert cfg["authentication"]["anonymous"]["enabled"] is False
    assert cfg["authorization"]["mode"] == "Webhook"
    assert cfg["readOnlyPort"] == 0 and cfg["healthzPort"] == 0
    # locally loaded images cannot be pulled again
    assert cfg["imageGCHighThresholdPercent"] == 100
    assert cfg["cgroupRoot"] == "/n1"
    assert cfg["podLogsDir"].startswith(str(tmp_path))


def test_cni_conflist_keeps_traffic_local(tmp_path: Path) -> None:
    conf = node.cni_conflist(NET, node.NodePaths(tmp_path))
    (bridge,) = conf["plugins"]
    assert bridge["type"] == "bridge" and bridge["bridge"] == "tcbr1"
    assert bridge["ipMasq"] is False
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.213.7.0/24"}]]
    assert bridge["ipam"]["dataDir"].startswith(str(tmp_path))


def test_daemon_argv(tmp_path: Path) -> None:
    p = node.NodePaths(tmp_path)
    kubelet = node.kubelet_argv(Path("/b/kubelet"), NET, p)
    assert kubelet[0] == "/b/kubelet"
    assert "--node-ip=10.213.7.1" in kubelet and "--hostname-override=n1" in kubelet
    assert f"--root-dir={p.kubelet_dir}" in kubelet
    proxy = node.kube_proxy_argv(Path("/b/kube-proxy"), NET, kubeconfig=tmp_path / "kp")
    assert "--proxy-mode=nftables" in proxy and "--cluster-cidr=10.213.7.0/24" in proxy
    assert "--healthz-bind-address=" in proxy and "--metrics-bind-address=" in proxy
    kcm = node.controller_manager_argv(Path("/b/kcm"), kubeconfig=tmp_path / "k", ca_crt=tmp_path / "ca.crt",
                                       ca_key=tmp_path / "ca.key", sa_key=tmp_path / "sa.key",
                                       service_cidr="10.96.0.0/16")
    assert f"--root-ca-file={tmp_path / 'ca.crt'}" in kcm and "--secure-port=0" in kcm
    assert "--secure-port=0" in node.scheduler_argv(Path("/b/s"), kubeconfig=tmp_path / "k")
    corefile = node.corefile(NET, kubeconfig=tmp_path / "kc")
    assert "bind 10.213.7.1" in corefile and "kubernetes cluster.local" in corefile
    assert "forward" not in corefile
    rule = node.forward_rule(NET)
    assert rule[:4] == ["-i", "tcbr1", "-o", "tcbr1"] and rule[-2:] == ["-j", "ACCEPT"]


# The flags of the API-server-only stack, as the shared stack runs them: `up` compares the running
# API server's flags as a set and restarts it on a difference, so this list must not drift.
_APISERVER_ONLY_FLAGS = {
    "--storage-backend=etcd3", "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
    "--secure-port=36443", "--service-account-issuer=https://kubernetes.default.svc",
    "--api-audiences=https://kubernetes.default.svc", "--service-cluster-ip-range=10.96.0.0/16",
    "--authorization-mode=RBAC", "--disable-admission-plugins=ServiceAccount",
    "--enable-priority-and-fairness=false", "--profiling=false", "--v=1",
}


def test_apiserver_flags_without_and_with_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRUSTCAP_KUBECONFIG", raising=False)
    plain = Stack(state=tmp_path / "a")
    assert plain.node_net is None
    flags = {a for a in plain.apiserver.argv[1:] if not any(k in a for k in ("pki", "etcd-servers"))}
    assert flags == _APISERVER_ONLY_FLAGS
    assert plain.apiserver_url == "https://127.0.0.1:36443"

    with_node = Stack(state=tmp_path / "b", kine_port=32479, apiserver_port=36543, node_net=NET)
    argv = with_node.apiserver.argv
    assert "--bind-address=10.213.7.1" in argv and "--advertise-address=10.213.7.1" in argv
    assert "--authorization-mode=Node,RBAC" in argv and "--enable-admission-plugins=NodeRestriction" in argv
    assert "--etcd-servers=http://127.0.0.1:32479" in argv and "--secure-port=36543" in argv
    assert not any(a.startswith("--disable-admission-plugins") for a in argv)
    assert with_node.apiserver_url == "https://10.213.7.1:36543"


def test_recorded_node_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `up --node` records the node; a later Stack() on the same state (a plain `up`, `status`, `down`)
    # must keep its flags, or it would restart the API server without the node's.
    monkeypatch.delenv("TRUSTCAP_KUBECONFIG", raising=False)
    (tmp_path / "node.json").write_text(json.dumps(NET.to_json()))
    s = Stack(state=tmp_path)
    assert s.node_net == NET
    assert "--bind-address=10.213.7.1" in s.apiserver.argv


def test_pki_serving_ips_and_client_certs(tmp_path: Path) -> None:
    p = pki.ensure_pki(tmp_path / "pki")
    ca = x509.load_pem_x509_certificate(p.ca_crt.read_bytes())
    assert pki.ensure_server_ips(p, ("10.213.7.1",)) is True
    assert pki.ensure_server_ips(p, ("10.213.7.1",)) is False
    server = x509.load_pem_x509_certificate(p.server_crt.read_bytes())
    server.verify_directly_issued_by(ca)
    ips = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.IPAddress)
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.213.7.1")} <= set(ips)

    crt, key = pki.ensure_client_cert(p, "kubelet", "system:node:n1", "system:nodes")
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "system:node:n1"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:nodes"
    assert key.stat().st_mode & 0o077 == 0
    assert pki.ensure_client_cert(p, "kubelet", "system:node:n1", "system:nodes") == (crt, key)
    assert crt.read_bytes() == pki.ensure_client_cert(p, "kubelet", "system:node:n1", "system:nodes")[0].read_bytes()
    # a renamed node gets a new identity, not the old one
    pki.ensure_client_cert(p, "kubelet", "system:node:n2", "system:nodes")
    renamed = x509.load_pem_x509_certificate(crt.read_bytes())
    assert renamed.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "system:node:n2"


@pytest.mark.parametrize(("short", "full"), [
    ("trustcap/base:bookworm", "docker.io/trustcap/base:bookworm"),
    ("busybox:1", "docker.io/library/busybox:1"),
    ("registry.example/x/y:1", "registry.example/x/y:1"),
    ("localhost/x:1", "localhost/x:1"),
])
def test_containerd_names_like_the_kubelet(short: str, full: str) -> None:
    assert _containerd_name(short) == full


def test_node_tools_are_built_only_for_the_node() -> None:
    names = {t.name for t in build.NODE_TOOLS}
    assert {"kubelet", "kube-controller-manager", "kube-scheduler", "kube-proxy", "containerd",
            "containerd-shim-runc-v2", "ctr", "coredns"} == names
    assert not names & {t.name for t in build.TOOLS}
    # the wrapper module must import every Kubernetes command it is asked to build
    tools_go = (Path(__file__).parents[2] / "tools" / "kube" / "tools.go").read_text()
    for t in build.NODE_TOOLS:
        if t.module_dir == "tools/kube":
            assert f'"k8s.io/kubernetes/cmd/{t.name}"' in tools_go
