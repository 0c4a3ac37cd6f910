"""The local stack, part by part: kine (SQLite) -> kube-apiserver, Docker Engine, anvil, base image.

    trustcap stack up
      ├── build tools once (kube-apiserver, kubectl, kine, helm, kubo) ~/.cache/trustcap/bin
      ├── PKI + kubeconfig                                         ~/.local/state/trustcap/stack
      ├── kine        127.0.0.1:32379  (etcd API over SQLite, k3s's datastore)
      ├── apiserver   https://127.0.0.1:36443  (waits for /readyz)
      ├── dockerd     unix:///var/run/docker.sock  (started only when none answers)
      ├── anvil       http://127.0.0.1:8545  (chain id 31337)
      ├── image       trustcap/base:bookworm  (debootstrap, imported once)
      └── node        only with `up --node` (trustcap/stack/node.py, docs/decisions/0111):
            bridge trustcapbr0 with the node IP 10.213.0.1 (the pods' gateway), which the API server binds
            containerd 2.x -> kube-controller-manager, kube-scheduler, kubelet; the node reaches Ready

Every step checks before it acts, so `up` is idempotent: a part that answers is left alone and a part
that died is restarted. With an external kubeconfig (a real k3s) the Kubernetes parts are not started.
`up --node` records the node in the state folder (node.json), so a later plain `up` keeps the node;
`down` stops it and forgets it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from trustcap.errors import StackError
from trustcap.stack import build, node, paths, pki, procs, versions

__all__ = ["Endpoints", "PartStatus", "Stack"]

KINE_PORT = 32379
KINE_ADDR = f"127.0.0.1:{KINE_PORT}"
APISERVER_PORT = 36443
SERVICE_CIDR = "10.96.0.0/16"
#: where Debian's containernetworking-plugins puts the CNI plugins
CNI_BIN_DIR = "/usr/lib/cni"
ANVIL_PORT = 8545
ANVIL_CHAIN_ID = 31337
K3S_KUBECONFIG = Path("/etc/rancher/k3s/k3s.yaml")

Progress = Callable[[str, str], None]


@dataclass(frozen=True)
class Endpoints:
    kubeconfig: str
    apiserver: str
    kine: str | None
    docker: str
    chain_rpc: str
    chain_id: int
    bin_dir: str
    base_image: str
    external_kubernetes: bool


@dataclass(frozen=True)
class PartStatus:
    name: str
    running: bool
    where: str
    detail: str = ""


def _port_open(addr: str, timeout: float = 0.5) -> bool:
    host, port = addr.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def _wait(what: str, check: Callable[[], bool], timeout: float, daemon: procs.Daemon | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if daemon is not None and daemon.pid() is None:
            raise StackError(f"{what} exited during start-up; its log ({daemon.log}) ends with:\n{daemon.tail()}")
        time.sleep(0.2)
    tail = f"; its log ({daemon.log}) ends with:\n{daemon.tail()}" if daemon else ""
    raise StackError(f"{what} did not become ready within {timeout:.0f}s{tail}")


class Stack:
    def __init__(self, state: Path | None = None, kubeconfig: Path | None = None, *,
                 kine_port: int = KINE_PORT, apiserver_port: int = APISERVER_PORT,
                 node_net: node.NodeNet | None = None) -> None:
        self.state = state or paths.state_dir()
        self.kine_addr = f"127.0.0.1:{kine_port}"
        self.apiserver_port = apiserver_port
        #: the node of `up --node` (None: API server only); a node recorded by an earlier `up --node` is kept
        self.node_net: node.NodeNet | None = node_net or self._recorded_node()
        self.node_paths = node.NodePaths(self.state)
        self.bin = paths.bin_dir()
        self.pki = pki.Pki(self.state / "pki")
        env_kc = os.environ.get("TRUSTCAP_KUBECONFIG")
        if kubeconfig is None and env_kc:
            kubeconfig = Path(env_kc)
        if kubeconfig is None and K3S_KUBECONFIG.is_file():
            kubeconfig = K3S_KUBECONFIG
        self.external_kubeconfig = kubeconfig
        self.kine = procs.Daemon(
            "kine",
            [str(self.bin / "kine"), "--endpoint",
             f"sqlite://{self.state}/kine/state.db?_journal=WAL&cache=shared&_busy_timeout=30000",
             "--listen-address", self.kine_addr, "--metrics-bind-address", "0"],
            self.state,
        )
        self.apiserver = procs.Daemon("kube-apiserver", self._apiserver_argv(), self.state)
        self._make_node_daemons()
        self.dockerd = procs.Daemon("dockerd", [shutil.which("dockerd") or "/usr/sbin/dockerd"], self.state)
        self.anvil = procs.Daemon(
            "anvil",
            [str(self._anvil_path()), "--host", "127.0.0.1", "--port", str(ANVIL_PORT),
             "--chain-id", str(ANVIL_CHAIN_ID), "--silent"],
            self.state,
        )

    def _recorded_node(self) -> node.NodeNet | None:
        try:
            return node.NodeNet.from_json(json.loads((self.state / "node.json").read_text()))
        except FileNotFoundError:
            return None

    def _make_node_daemons(self) -> None:
        net, np, b = self.node_net or node.NodeNet(), self.node_paths, self.bin
        # containerd finds its shim (containerd-shim-runc-v2) on PATH
        self.containerd = procs.Daemon(
            "containerd", [str(b / "containerd"), f"--config={np.containerd_config}"], self.state,
            env={"PATH": f"{b}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"},
        )
        self.controller_manager = procs.Daemon("kube-controller-manager", node.controller_manager_argv(
            b / "kube-controller-manager", kubeconfig=self.state / "controller-manager.kubeconfig",
            ca_crt=self.pki.ca_crt, ca_key=self.pki.ca_key, sa_key=self.pki.sa_key, service_cidr=SERVICE_CIDR,
        ), self.state)
        self.scheduler = procs.Daemon("kube-scheduler", node.scheduler_argv(
            b / "kube-scheduler", kubeconfig=self.state / "scheduler.kubeconfig"), self.state)
        self.kubelet = procs.Daemon("kubelet", node.kubelet_argv(b / "kubelet", net, np), self.state)
        self.kube_proxy = procs.Daemon("kube-proxy", node.kube_proxy_argv(
            b / "kube-proxy", net, kubeconfig=self.state / "kube-proxy.kubeconfig"), self.state)
        self.coredns = procs.Daemon("coredns", node.coredns_argv(b / "coredns", self.state / "Corefile"), self.state)

    def _node_daemons(self) -> tuple[procs.Daemon, ...]:
        """In stop order: the kubelet first, so it does not restart what is being torn down."""
        return (self.kubelet, self.kube_proxy, self.coredns, self.scheduler, self.controller_manager,
                self.containerd)

    # ---- paths and endpoints -------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        return self.external_kubeconfig or self.state / "kubeconfig"

    @property
    def apiserver_url(self) -> str:
        if self.external_kubeconfig:
            cfg = yaml.safe_load(self.external_kubeconfig.read_text())
            return str(cfg["clusters"][0]["cluster"]["server"])
        # With a node the API server binds the node IP: a pod cannot reach the machine's loopback.
        host = self.node_net.ip if self.node_net else "127.0.0.1"
        return f"https://{host}:{self.apiserver_port}"

    def endpoints(self) -> Endpoints:
        from trustcap.stack.images import BASE_IMAGE

        return Endpoints(
            kubeconfig=str(self.kubeconfig), apiserver=self.apiserver_url,
            kine=None if self.external_kubeconfig else self.kine_addr,
            docker=os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"),
            chain_rpc=f"http://127.0.0.1:{ANVIL_PORT}", chain_id=ANVIL_CHAIN_ID, bin_dir=str(self.bin),
            base_image=BASE_IMAGE, external_kubernetes=self.external_kubeconfig is not None,
        )

    def _anvil_path(self) -> Path:
        return paths.cache_dir() / "npm" / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"

    def _apiserver_argv(self) -> list[str]:
        p = self.pki
        host = self.node_net.ip if self.node_net else "127.0.0.1"
        argv = [
            str(self.bin / "kube-apiserver"),
            f"--etcd-servers=http://{self.kine_addr}",
            "--storage-backend=etcd3",
            f"--bind-address={host}",
            f"--advertise-address={host}",
            f"--secure-port={self.apiserver_port}",
            f"--cert-dir={self.state / 'pki'}",
            f"--tls-cert-file={p.server_crt}",
            f"--tls-private-key-file={p.server_key}",
            f"--client-ca-file={p.ca_crt}",
            f"--service-account-key-file={p.sa_pub}",
            f"--service-account-signing-key-file={p.sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc",
            "--api-audiences=https://kubernetes.default.svc",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            "--v=1",
        ]
        if self.node_net is None:
            argv += [
                "--authorization-mode=RBAC",
                # No controller-manager runs: the ServiceAccount admission plugin would wait for token
                # controllers that never come. Pods are not run by this stack (no kubelet).
                "--disable-admission-plugins=ServiceAccount",
            ]
        else:
            argv += [
                # The kubelet acts as system:node:<name>: the Node authorizer and NodeRestriction keep it
                # to its own node and pods, as in a real cluster.
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                # The chart's netboot and gateway pods need host networking and capabilities.
                "--allow-privileged=true",
                # logs, exec and port-forward: the API server calls the kubelet as the admin
                f"--kubelet-client-certificate={p.admin_crt}",
                f"--kubelet-client-key={p.admin_key}",
                "--kubelet-preferred-address-types=InternalIP",
            ]
        return argv

    # ---- health checks ---------------------------------------------------------------------------
    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_crt))
        ctx.load_cert_chain(str(self.pki.admin_crt), str(self.pki.admin_key))
        return ctx

    def apiserver_ready(self) -> bool:
        if self.external_kubeconfig:
            return self._kubectl_ok()
        if not self.pki.complete():
            return False
        try:
            with urllib.request.urlopen(f"{self.apiserver_url}/readyz", context=self._ssl(), timeout=2) as r:  # noqa: S310
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError, ssl.SSLError):
            return False

    def _kubectl_ok(self) -> bool:
        kubectl = self.bin / "kubectl"
        if not kubectl.is_file():
            return False
        proc = subprocess.run(
            [str(kubectl), f"--kubeconfig={self.kubeconfig}", "get", "--raw=/readyz"],
            capture_output=True, timeout=15, check=False,
        )
        return proc.returncode == 0

    @staticmethod
    def docker_ready() -> bool:
        docker_bin = shutil.which("docker")
        if docker_bin is None:
            return False
        proc = subprocess.run([docker_bin, "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, timeout=20, check=False)
        return proc.returncode == 0

    def anvil_ready(self) -> bool:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}).encode()
        req = urllib.request.Request(self.endpoints().chain_rpc, data=body,  # noqa: S310
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=2) as r:  # noqa: S310
                return int(json.loads(r.read())["result"], 16) == ANVIL_CHAIN_ID
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            return False

    # ---- up / down / status ----------------------------------------------------------------------
    def up(self, progress: Progress | None = None, *, with_image: bool = True, with_node: bool = False) -> Endpoints:
        """Start what is not running. `with_node=True` (or a node recorded by an earlier `up --node`) also starts
        the one-node cluster: containerd, controller-manager, scheduler and kubelet, until the node is Ready."""
        say = progress or (lambda part, msg: None)
        self.state.mkdir(parents=True, exist_ok=True)
        if with_node and self.external_kubeconfig:
            raise StackError("--node starts a kubelet for the local API server; with an external kubeconfig "
                             "the cluster brings its own nodes: drop --node or --kubeconfig")
        if with_node and self.node_net is None:
            self.node_net = node.NodeNet()
        if self.node_net is not None:
            self._make_node_daemons()
            self.apiserver = procs.Daemon("kube-apiserver", self._apiserver_argv(), self.state)
        if not self.external_kubeconfig:
            self._up_kubernetes(say)
        else:
            say("kubernetes", f"using external kubeconfig {self.external_kubeconfig}")
            self._ensure_kubectl_helm(say)
            if not self._kubectl_ok():
                raise StackError(f"the Kubernetes API in {self.external_kubeconfig} does not answer /readyz")
        self._up_docker(say)
        self._up_anvil(say)
        if with_image or self.node_net is not None:
            from trustcap.stack.images import ensure_base_image

            say("image", "ensuring trustcap/base image (first time: debootstrap, a few minutes)")
            ensure_base_image()
            say("image", "ready")
        if self.node_net is not None:
            self._up_node(say)
        eps = self.endpoints()
        (self.state / "stack.json").write_text(json.dumps(asdict(eps), indent=2))
        return eps

    def _ensure_kubectl_helm(self, say: Progress) -> None:
        for tool in build.missing_tools():
            if tool.name in ("kubectl", "helm"):
                say(tool.name, f"building {tool.name} {tool.version} (first time only)")
                secs = build.build_tool(tool)
                say(tool.name, f"built in {secs:.0f}s")

    def _up_kubernetes(self, say: Progress) -> None:
        for tool in build.missing_tools():
            say(tool.name, f"building {tool.name} {tool.version} from its Go module (first time only)")
            secs = build.build_tool(tool)
            say(tool.name, f"built in {secs:.0f}s")
        pki.ensure_pki(self.pki.dir)
        if self.node_net is not None:
            self._prepare_node(say)
        self._write_kubeconfig()
        (self.state / "kine").mkdir(parents=True, exist_ok=True)
        if self.kine.pid() is None or not _port_open(self.kine_addr):
            if _port_open(self.kine_addr) and self.kine.pid() is None:
                raise StackError(f"{self.kine_addr} is taken by another program; stop it or set TRUSTCAP_STATE")
            say("kine", "starting")
            self.kine.start()
            _wait("kine", lambda: _port_open(self.kine_addr), 30, self.kine)
        say("kine", f"listening on {self.kine_addr}")
        running = self.apiserver.running_argv()
        if running is not None and set(running) != set(self.apiserver.argv):
            # e.g. `up --node` on a stack started without it: the bind address and admission plugins differ
            say("kube-apiserver", "restarting with the flags this stack now needs")
            self.apiserver.stop()
            running = None
        if running is None:
            say("kube-apiserver", "starting")
            self.apiserver.start()
        _wait("kube-apiserver", self.apiserver_ready, 120, self.apiserver)
        say("kube-apiserver", f"ready at {self.apiserver_url}")

    # ---- the node (`up --node`) -------------------------------------------------------------------
    def _prepare_node(self, say: Progress) -> None:
        """What must exist before the API server starts in node mode: the node IP and the certificates."""
        assert self.node_net is not None
        net = self.node_net
        for tool in build.missing_tools(build.NODE_TOOLS):
            say(tool.name, f"building {tool.name} {tool.version} from its Go module (first time only)")
            secs = build.build_tool(tool)
            say(tool.name, f"built in {secs:.0f}s")
        self._check_node_prerequisites()
        _ensure_bridge(net)
        say("node", f"node IP {net.ip} on bridge {net.bridge}")
        if pki.ensure_server_ips(self.pki, (net.ip,)):
            say("pki", f"serving certificate reissued for {net.ip}")
        server = f"https://{net.ip}:{self.apiserver_port}"
        for name, cn, org, target in (
            ("kubelet", f"system:node:{net.name}", "system:nodes", self.node_paths.kubelet_kubeconfig),
            ("controller-manager", "system:kube-controller-manager", None,
             self.state / "controller-manager.kubeconfig"),
            ("scheduler", "system:kube-scheduler", None, self.state / "scheduler.kubeconfig"),
            # the built-in system:node-proxier binding names the user system:kube-proxy
            ("kube-proxy", "system:kube-proxy", None, self.state / "kube-proxy.kubeconfig"),
            # CoreDNS lists Services, EndpointSlices, Pods and Namespaces of the whole cluster; Kubernetes has
            # no built-in role for it, so it reads as the administrator (a local stack only)
            ("coredns", "trustcap-coredns", "system:masters", self.state / "coredns.kubeconfig"),
        ):
            crt, key = pki.ensure_client_cert(self.pki, name, cn, org)
            _write_private(target, node.kubeconfig(server, self.pki.ca_crt, crt, key, cn))
        (self.state / "node.json").write_text(json.dumps(net.to_json(), indent=2))

    @staticmethod
    def _check_node_prerequisites() -> None:
        missing = [f"{CNI_BIN_DIR}/{b}" for b in ("bridge", "host-local") if not Path(CNI_BIN_DIR, b).is_file()]
        if missing:
            raise StackError(f"the CNI plugins are missing ({', '.join(missing)}): "
                             "apt-get install containernetworking-plugins (scripts/apt-packages.txt)")
        if shutil.which("runc") is None:
            raise StackError("runc is not installed: apt-get install runc (containerd starts containers with it)")
        for cmd, pkg, why in (("ip", "iproute2", "it makes the node's bridge"),
                              ("nft", "nftables", "kube-proxy programs Services with it"),
                              ("iptables", "iptables", "pods on the bridge are let through Docker's FORWARD DROP")):
            if shutil.which(cmd) is None:
                raise StackError(f"the {cmd} command is missing: apt-get install {pkg} ({why})")

    def _up_node(self, say: Progress) -> None:
        from trustcap.stack.images import BASE_IMAGE, PAUSE_IMAGE, ensure_pause_image

        assert self.node_net is not None
        net, np = self.node_net, self.node_paths
        np.containerd_dir.mkdir(parents=True, exist_ok=True)
        np.cni_conf_dir.mkdir(parents=True, exist_ok=True)
        np.containerd_config.write_text(node.containerd_config(
            np, sandbox_image=_containerd_name(PAUSE_IMAGE), cni_bin_dir=CNI_BIN_DIR,
            runc=shutil.which("runc") or "/usr/sbin/runc",
            restrict_oom_score_adj=node.lacks_cap_sys_resource(Path("/proc/self/status").read_text())))
        (np.cni_conf_dir / "10-trustcap.conflist").write_text(json.dumps(node.cni_conflist(net, np), indent=2))
        np.kubelet_config.write_text(yaml.safe_dump(node.kubelet_config(net, np, ca_file=self.pki.ca_crt),
                                                    sort_keys=False))
        _ensure_cgroup_root(node.cgroup_root(net))
        _ensure_forward_rule(net)
        (self.state / "Corefile").write_text(node.corefile(net, kubeconfig=self.state / "coredns.kubeconfig"))
        self._check_one_kube_proxy()
        if self.containerd.pid() is None:
            say("containerd", "starting")
            self.containerd.start()
        _wait("containerd", self._containerd_ready, 60, self.containerd)
        say("containerd", f"answering at {np.containerd_socket}")
        ensure_pause_image()
        loaded = self.load_images(PAUSE_IMAGE, BASE_IMAGE)
        say("containerd", "images loaded: " + (", ".join(loaded) if loaded else "all current"))
        for d in (self.controller_manager, self.scheduler, self.coredns, self.kube_proxy, self.kubelet):
            if d.pid() is None:
                say(d.name, "starting")
                d.start()
        _wait(f"node {net.name}", self.node_ready, 180, self.kubelet)
        # Until the controller-manager has made it, the ServiceAccount admission plugin refuses every pod.
        _wait("kube-controller-manager (ServiceAccount default/default)",
              lambda: self._api_get("/api/v1/namespaces/default/serviceaccounts/default") is not None, 120,
              self.controller_manager)
        say("node", f"{net.name} Ready ({net.ip})")

    def _check_one_kube_proxy(self) -> None:
        """kube-proxy's nftables table has a fixed name (`kube-proxy`): a second node stack on this machine
        would take over the first one's Services. Refuse, naming the other one."""
        ours = self.kube_proxy.pid()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == ours:
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"/kube-proxy"):
                raise StackError(
                    f"another kube-proxy runs on this machine (pid {proc.name}: "
                    f"{b' '.join(argv[:3]).decode(errors='replace')}): its nftables table `kube-proxy` is shared, "
                    "so one node stack per machine; stop that one (`trustcap stack down` with its state folder)")

    def _ctr(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [str(self.bin / "ctr"), f"--address={self.node_paths.containerd_socket}", "--namespace=k8s.io", *args],
            capture_output=True, timeout=kw.pop("timeout", 300), check=False, **kw)

    def _containerd_ready(self) -> bool:
        if not self.node_paths.containerd_socket.exists():
            return False
        return self._ctr("version", timeout=10).returncode == 0

    def load_images(self, *images: str) -> list[str]:
        """Copy images from Docker into the node's containerd (pods use them with imagePullPolicy Never:
        no registry is reachable). An image is copied again only when its Docker image id changed."""
        import docker
        from docker.errors import DockerException

        marks = self.node_paths.containerd_dir / "loaded"
        marks.mkdir(parents=True, exist_ok=True)
        todo: list[str] = []
        try:
            client = docker.from_env()
            for image in images:
                image_id = client.images.get(image).id
                mark = marks / (image.replace("/", "_").replace(":", "@") + ".id")
                if not (mark.is_file() and mark.read_text() == image_id
                        and self._ctr("images", "ls", "-q", f"name=={_containerd_name(image)}",
                                      timeout=30).stdout.strip()):
                    todo.append(image)
                    mark.unlink(missing_ok=True)
        except DockerException as exc:
            raise StackError(f"cannot read {', '.join(images)} from Docker: {exc} (build the image first)") from exc
        if not todo:
            return []
        docker_bin = shutil.which("docker") or "docker"
        with subprocess.Popen([docker_bin, "save", *todo], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as save:
            imp = self._ctr("images", "import", "-", stdin=save.stdout, timeout=600)
            _, save_err = save.communicate()
        if save.returncode != 0 or imp.returncode != 0:
            raise StackError(f"loading {', '.join(todo)} into containerd failed: docker save: "
                             f"{save_err.decode(errors='replace').strip()[-400:]}; ctr import: "
                             f"{imp.stderr.decode(errors='replace').strip()[-400:]}")
        client = docker.from_env()
        for image in todo:
            (marks / (image.replace("/", "_").replace(":", "@") + ".id")).write_text(client.images.get(image).id)
        return todo

    def _api_get(self, path: str) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"{self.apiserver_url}{path}", context=self._ssl(), timeout=5) as r:  # noqa: S310
                data: dict[str, Any] = json.loads(r.read())
                return data
        except (urllib.error.URLError, OSError, ssl.SSLError, ValueError):
            return None

    def node_ready(self) -> bool:
        if self.node_net is None or not self.pki.complete():
            return False
        obj = self._api_get(f"/api/v1/nodes/{self.node_net.name}")
        if obj is None:
            return False
        return any(c.get("type") == "Ready" and c.get("status") == "True"
                   for c in obj.get("status", {}).get("conditions", []))

    def _stop_pods(self) -> None:
        """Kill the node's containers before containerd stops: their shims would outlive it otherwise."""
        if self.containerd.pid() is None or not self._containerd_ready():
            return
        tasks = self._ctr("tasks", "ls", "-q", timeout=30).stdout.decode().split()
        for task in tasks:
            self._ctr("tasks", "kill", "--all", "--signal=SIGKILL", task, timeout=30)
        deadline = time.monotonic() + 20
        for task in tasks:
            while time.monotonic() < deadline and self._ctr("tasks", "delete", "--force", task,
                                                             timeout=30).returncode != 0:
                time.sleep(0.2)

    def _write_kubeconfig(self) -> None:
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "trustcap-local", "cluster": {
                "server": self.apiserver_url,
                "certificate-authority": str(self.pki.ca_crt)}}],
            "users": [{"name": "trustcap-admin", "user": {
                "client-certificate": str(self.pki.admin_crt), "client-key": str(self.pki.admin_key)}}],
            "contexts": [{"name": "trustcap-local",
                          "context": {"cluster": "trustcap-local", "user": "trustcap-admin", "namespace": "default"}}],
            "current-context": "trustcap-local",
        }
        path = self.state / "kubeconfig"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            yaml.safe_dump(cfg, fh, sort_keys=False)

    def _up_docker(self, say: Progress) -> None:
        if self.docker_ready():
            say("docker", "Docker Engine answers")
            return
        if shutil.which("dockerd") is None:
            raise StackError("dockerd is not installed: run scripts/install-deps (apt-get install docker.io)")
        say("docker", "starting dockerd")
        if self.dockerd.pid() is None:
            self.dockerd.start()
        _wait("dockerd", self.docker_ready, 60, self.dockerd)
        say("docker", "Docker Engine answers")

    def _install_anvil(self, say: Progress) -> None:
        if self._anvil_path().is_file():
            return
        npm = shutil.which("npm")
        if npm is None:
            raise StackError("npm is not on PATH: install Node.js (it installs anvil from the npm registry)")
        prefix = paths.cache_dir() / "npm"
        prefix.mkdir(parents=True, exist_ok=True)
        say("anvil", f"installing @foundry-rs/anvil-linux-amd64@{versions.ANVIL_NPM} from npm")
        proc = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix),
             f"@foundry-rs/anvil-linux-amd64@{versions.ANVIL_NPM}"],
            capture_output=True, text=True, timeout=600, check=False,
        )
        if proc.returncode != 0 or not self._anvil_path().is_file():
            raise StackError(f"npm could not install anvil: {proc.stderr.strip()[-600:]}")
        self._anvil_path().chmod(0o755)

    def _up_anvil(self, say: Progress) -> None:
        self._install_anvil(say)
        if self.anvil_ready():
            say("anvil", f"answering at {self.endpoints().chain_rpc}")
            return
        say("anvil", "starting")
        self.anvil.start()
        _wait("anvil", self.anvil_ready, 30, self.anvil)
        say("anvil", f"answering at {self.endpoints().chain_rpc}")

    def down(self, progress: Progress | None = None) -> list[str]:
        """Stop what this stack started (never a Docker Engine it found running); keeps data and cache."""
        say = progress or (lambda part, msg: None)
        stopped = []
        # The node first, while the API server still answers its last status updates. The kubelet stops
        # before the pods are killed (it would start their sandboxes again), containerd after.
        for d in self._node_daemons():
            if d is self.containerd:
                self._stop_pods()
            if d.stop():
                stopped.append(d.name)
                say(d.name, "stopped")
        _kill_shims(self.node_paths.containerd_socket)
        _unmount_under(self.state)
        if self.node_net is not None:
            if "kube-proxy" in stopped:
                _remove_kube_proxy_tables()
            _remove_forward_rule(self.node_net)
            _remove_bridge(self.node_net)
            _remove_cgroup_root(node.cgroup_root(self.node_net))
            (self.state / "node.json").unlink(missing_ok=True)
            self.node_net = None
        for d in (self.anvil, self.apiserver, self.kine, self.dockerd):
            if d.stop():
                stopped.append(d.name)
                say(d.name, "stopped")
        return stopped

    def status(self) -> list[PartStatus]:
        eps = self.endpoints()
        parts: list[PartStatus] = []
        if self.external_kubeconfig:
            parts.append(PartStatus("kubernetes", self._kubectl_ok(), eps.apiserver, "external kubeconfig"))
        else:
            parts.append(PartStatus("kine", self.kine.pid() is not None and _port_open(self.kine_addr), self.kine_addr,
                                    "SQLite " + str(self.state / "kine" / "state.db")))
            parts.append(PartStatus("kube-apiserver", self.apiserver_ready(), eps.apiserver,
                                    f"kubeconfig {eps.kubeconfig}"))
        if self.node_net is not None and not self.external_kubeconfig:
            np = self.node_paths
            parts.append(PartStatus("containerd", self.containerd.pid() is not None and self._containerd_ready(),
                                    f"unix://{np.containerd_socket}", f"containerd {versions.CONTAINERD}"))
            for d in (self.controller_manager, self.scheduler, self.kube_proxy):
                parts.append(PartStatus(d.name, d.pid() is not None, "-", f"log {d.log}"))
            parts.append(PartStatus("coredns", self.coredns.pid() is not None, f"{self.node_net.ip}:53",
                                    f"{node.CLUSTER_DOMAIN}, nothing forwarded"))
            parts.append(PartStatus("kubelet", self.kubelet.pid() is not None and self.node_ready(),
                                    f"{self.node_net.ip}:{self.node_net.kubelet_port}",
                                    f"node {self.node_net.name}"))
        managed = "started by trustcap" if self.dockerd.pid() else "system"
        parts.append(PartStatus("docker", self.docker_ready(), eps.docker, managed))
        parts.append(PartStatus("anvil", self.anvil_ready(), eps.chain_rpc, f"chain id {ANVIL_CHAIN_ID}"))
        return parts

    def env_lines(self) -> list[str]:
        eps = self.endpoints()
        lines = [
            f"export KUBECONFIG={eps.kubeconfig}",
            f"export TRUSTCAP_CHAIN_RPC={eps.chain_rpc}",
            f"export TRUSTCAP_CHAIN_ID={eps.chain_id}",
            f'export PATH="{eps.bin_dir}:$PATH"',
        ]
        if "DOCKER_HOST" in os.environ:
            lines.append(f"export DOCKER_HOST={os.environ['DOCKER_HOST']}")
        return lines


def _containerd_name(image: str) -> str:
    """How containerd (and the kubelet) name a Docker short name: `trustcap/x:t` is `docker.io/trustcap/x:t`."""
    first = image.split("/", 1)[0]
    if "/" in image and ("." in first or ":" in first or first == "localhost"):
        return image
    return f"docker.io/{image}" if "/" in image else f"docker.io/library/{image}"


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)


def _ensure_bridge(net: node.NodeNet) -> None:
    """The pods' bridge with the node IP, the pods' gateway. Made here, not by the CNI plugin, because the
    API server and the kubelet bind the node IP before the first pod exists."""
    if _ip("link", "show", "dev", net.bridge).returncode != 0:
        made = _ip("link", "add", net.bridge, "type", "bridge")
        if made.returncode != 0:
            raise StackError(f"cannot create bridge {net.bridge} for the node: {made.stderr.strip()} "
                             "(`up --node` needs root, or CAP_NET_ADMIN)")
    addrs = _ip("-j", "addr", "show", "dev", net.bridge).stdout
    if f'"{net.ip}"' not in addrs:
        added = _ip("addr", "add", net.ip_with_prefix, "dev", net.bridge)
        if added.returncode != 0:
            raise StackError(f"cannot put the node IP {net.ip} on {net.bridge}: {added.stderr.strip()}")
    up = _ip("link", "set", net.bridge, "up")
    if up.returncode != 0:
        raise StackError(f"cannot bring {net.bridge} up: {up.stderr.strip()}")


def _remove_bridge(net: node.NodeNet) -> None:
    if _ip("link", "show", "dev", net.bridge).returncode == 0:
        _ip("link", "del", net.bridge)


_CGROUP_V1 = Path("/sys/fs/cgroup")


def _ensure_cgroup_root(root: str) -> None:
    """The kubelet refuses a cgroupRoot that does not exist; make it in every mounted hierarchy."""
    for hierarchy in sorted(_CGROUP_V1.iterdir()) if _CGROUP_V1.is_dir() else []:
        if (hierarchy / "cgroup.procs").is_file():
            try:
                (hierarchy / root.lstrip("/")).mkdir(exist_ok=True)
            except OSError as exc:
                raise StackError(f"cannot create the node's cgroup {hierarchy / root.lstrip('/')}: {exc}") from exc


def _unmount_under(root: Path) -> None:
    """Unmount what the kubelet and containerd left mounted (the kubelet's root folder, pods' projected
    volumes, sandboxes' /dev/shm): with them stopped nothing else would, and the state folder could not be
    removed."""
    prefix = str(root.resolve())
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    points = [line.split()[4].encode().decode("unicode_escape") for line in lines]
    for point in sorted({p for p in points if p == prefix or p.startswith(prefix + "/")}, key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=30, check=False)


def _iptables(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["iptables", "-w", "10", *args], capture_output=True, text=True, timeout=30, check=False)


def _ensure_forward_rule(net: node.NodeNet) -> None:
    if _iptables("-C", "FORWARD", *node.forward_rule(net)).returncode == 0:
        return
    added = _iptables("-I", "FORWARD", "1", *node.forward_rule(net))
    if added.returncode != 0:
        raise StackError(f"cannot let pods on {net.bridge} reach each other (iptables FORWARD): {added.stderr.strip()}")


def _remove_forward_rule(net: node.NodeNet) -> None:
    while _iptables("-D", "FORWARD", *node.forward_rule(net)).returncode == 0:
        pass


def _remove_kube_proxy_tables() -> None:
    """kube-proxy leaves its nftables tables behind when it stops; their DNAT rules would point at the
    stopped API server and pods."""
    for family in ("ip", "ip6"):
        subprocess.run(["nft", "delete", "table", family, "kube-proxy"], capture_output=True, timeout=30,
                       check=False)


def _remove_cgroup_root(root: str) -> None:
    for hierarchy in sorted(_CGROUP_V1.iterdir()) if _CGROUP_V1.is_dir() else []:
        top = hierarchy / root.lstrip("/")
        if not top.is_dir():
            continue
        for sub in sorted((d for d in top.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True):
            with contextlib.suppress(OSError):
                sub.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def _proc_table() -> dict[int, tuple[int, list[bytes]]]:
    """pid -> (parent pid, argv) of every process we can read."""
    table: dict[int, tuple[int, list[bytes]]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        table[int(proc.name)] = (ppid, argv)
    return table


def _kill_shims(socket_path: Path) -> None:
    """Kill what is left of this containerd's containers: shims outlive containerd by design, and a shim
    killed alone would leave its container's processes running. So each shim started for our socket is
    killed with every process below it, the leaves first."""
    table = _proc_table()
    sock = str(socket_path).encode()
    shims = [pid for pid, (_, argv) in table.items()
             if argv and argv[0].endswith(b"containerd-shim-runc-v2") and sock in argv]
    for shim in shims:
        tree = [shim]
        for parent in tree:
            tree.extend(pid for pid, (ppid, _) in table.items() if ppid == parent and pid not in tree)
        for pid in reversed(tree):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
