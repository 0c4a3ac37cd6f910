"""The local stack, part by part: kine (SQLite) -> kube-apiserver, Docker Engine, anvil, base image.

    trustcap stack up
      ├── build tools once (kube-apiserver, kubectl, kine, helm, kubo) ~/.cache/trustcap/bin
      ├── PKI + kubeconfig                                         ~/.local/state/trustcap/stack
      ├── kine        127.0.0.1:32379  (etcd API over SQLite, k3s's datastore)
      ├── apiserver   https://127.0.0.1:36443  (waits for /readyz)
      ├── dockerd     unix:///var/run/docker.sock  (started only when none answers)
      ├── anvil       http://127.0.0.1:8545  (chain id 31337)
      └── image       trustcap/base:bookworm  (debootstrap, imported once)

Every step checks before it acts, so `up` is idempotent: a part that answers is left alone and a part
that died is restarted. With an external kubeconfig (a real k3s) the Kubernetes parts are not started.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from trustcap.errors import StackError
from trustcap.stack import build, paths, pki, procs, versions

__all__ = ["Endpoints", "PartStatus", "Stack"]

KINE_ADDR = "127.0.0.1:32379"
APISERVER_PORT = 36443
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
    def __init__(self, state: Path | None = None, kubeconfig: Path | None = None) -> None:
        self.state = state or paths.state_dir()
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
             "--listen-address", KINE_ADDR, "--metrics-bind-address", "0"],
            self.state,
        )
        self.apiserver = procs.Daemon("kube-apiserver", self._apiserver_argv(), self.state)
        self.dockerd = procs.Daemon("dockerd", [shutil.which("dockerd") or "/usr/sbin/dockerd"], self.state)
        self.anvil = procs.Daemon(
            "anvil",
            [str(self._anvil_path()), "--host", "127.0.0.1", "--port", str(ANVIL_PORT),
             "--chain-id", str(ANVIL_CHAIN_ID), "--silent"],
            self.state,
        )

    # ---- paths and endpoints -------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        return self.external_kubeconfig or self.state / "kubeconfig"

    @property
    def apiserver_url(self) -> str:
        if self.external_kubeconfig:
            cfg = yaml.safe_load(self.external_kubeconfig.read_text())
            return str(cfg["clusters"][0]["cluster"]["server"])
        return f"https://127.0.0.1:{APISERVER_PORT}"

    def endpoints(self) -> Endpoints:
        from trustcap.stack.images import BASE_IMAGE

        return Endpoints(
            kubeconfig=str(self.kubeconfig), apiserver=self.apiserver_url,
            kine=None if self.external_kubeconfig else KINE_ADDR,
            docker=os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"),
            chain_rpc=f"http://127.0.0.1:{ANVIL_PORT}", chain_id=ANVIL_CHAIN_ID, bin_dir=str(self.bin),
            base_image=BASE_IMAGE, external_kubernetes=self.external_kubeconfig is not None,
        )

    def _anvil_path(self) -> Path:
        return paths.cache_dir() / "npm" / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"

    def _apiserver_argv(self) -> list[str]:
        p = self.pki
        return [
            str(self.bin / "kube-apiserver"),
            f"--etcd-servers=http://{KINE_ADDR}",
            "--storage-backend=etcd3",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={APISERVER_PORT}",
            f"--cert-dir={self.state / 'pki'}",
            f"--tls-cert-file={p.server_crt}",
            f"--tls-private-key-file={p.server_key}",
            f"--client-ca-file={p.ca_crt}",
            f"--service-account-key-file={p.sa_pub}",
            f"--service-account-signing-key-file={p.sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc",
            "--api-audiences=https://kubernetes.default.svc",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--authorization-mode=RBAC",
            # No controller-manager runs: the ServiceAccount admission plugin would wait for token
            # controllers that never come. Pods are not run by this stack (no kubelet).
            "--disable-admission-plugins=ServiceAccount",
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            "--v=1",
        ]

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
    def up(self, progress: Progress | None = None, *, with_image: bool = True) -> Endpoints:
        say = progress or (lambda part, msg: None)
        self.state.mkdir(parents=True, exist_ok=True)
        if not self.external_kubeconfig:
            self._up_kubernetes(say)
        else:
            say("kubernetes", f"using external kubeconfig {self.external_kubeconfig}")
            self._ensure_kubectl_helm(say)
            if not self._kubectl_ok():
                raise StackError(f"the Kubernetes API in {self.external_kubeconfig} does not answer /readyz")
        self._up_docker(say)
        self._up_anvil(say)
        if with_image:
            from trustcap.stack.images import ensure_base_image

            say("image", "ensuring trustcap/base image (first time: debootstrap, a few minutes)")
            ensure_base_image()
            say("image", "ready")
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
        self._write_kubeconfig()
        (self.state / "kine").mkdir(parents=True, exist_ok=True)
        if self.kine.pid() is None or not _port_open(KINE_ADDR):
            if _port_open(KINE_ADDR) and self.kine.pid() is None:
                raise StackError(f"{KINE_ADDR} is taken by another program; stop it or set TRUSTCAP_STATE")
            say("kine", "starting")
            self.kine.start()
            _wait("kine", lambda: _port_open(KINE_ADDR), 30, self.kine)
        say("kine", f"listening on {KINE_ADDR}")
        if self.apiserver.pid() is None:
            say("kube-apiserver", "starting")
            self.apiserver.start()
        _wait("kube-apiserver", self.apiserver_ready, 120, self.apiserver)
        say("kube-apiserver", f"ready at {self.apiserver_url}")

    def _write_kubeconfig(self) -> None:
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "trustcap-local", "cluster": {
                "server": f"https://127.0.0.1:{APISERVER_PORT}",
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
            parts.append(PartStatus("kine", self.kine.pid() is not None and _port_open(KINE_ADDR), KINE_ADDR,
                                    "SQLite " + str(self.state / "kine" / "state.db")))
            parts.append(PartStatus("kube-apiserver", self.apiserver_ready(), eps.apiserver,
                                    f"kubeconfig {eps.kubeconfig}"))
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
