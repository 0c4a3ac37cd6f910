"""Build the stack's Go tools once from their modules at pinned versions, into the cache.

kube-apiserver and kubectl come from k8s.io/kubernetes through the wrapper module in `tools/kube`
(its go.mod maps the staging modules to their published releases: `go install pkg@version` refuses
a module with replace directives). kubo's `ipfs` comes through `tools/kubo` for the same reason: kubo's
go.mod replaces go-libp2p with a fork. kine and helm have none, so `go install pkg@version` builds them.
A stamp next to each binary records what it was built from; a changed pin rebuilds it.

The node's tools (`NODE_TOOLS`: controller-manager, scheduler, kubelet, kube-proxy, containerd with its
shim and `ctr`, coredns) are built only for `stack up --node`, so the quick API-server-only stack does
not wait for them.
containerd's go.mod has no replace directives, so `go install pkg@version` builds it; cgo is off (a
static binary, as containerd's own static releases) with btrfs left out, which needs cgo headers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from trustcap.errors import StackError
from trustcap.stack import paths, versions

__all__ = ["NODE_TOOLS", "TOOLS", "Tool", "ensure_tools", "missing_tools"]


@dataclass(frozen=True)
class Tool:
    name: str
    version: str
    #: go arguments after `go`; `{out}` is replaced by the output path
    args: tuple[str, ...]
    #: run in this folder of the checkout (a wrapper module), or None for `go install pkg@version`
    module_dir: str | None = None
    cgo: bool = False
    env: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return paths.bin_dir() / self.name

    @property
    def stamp(self) -> Path:
        return paths.bin_dir() / f".{self.name}.stamp"

    @property
    def fingerprint(self) -> str:
        """What the binary was built from: a changed pin or flag rebuilds it."""
        return f"{self.version} " + hashlib.sha256("\0".join(self.args).encode()).hexdigest()[:16]

    def is_current(self) -> bool:
        return self.path.is_file() and self.stamp.is_file() and self.stamp.read_text() == self.fingerprint


_LDFLAGS = "-s -w"
_K8S_MINOR = versions.KUBERNETES.split(".")[1]
# Without these the binaries report v0.0.0-master, which kubectl refuses to parse and Helm's
# kubeVersion checks reject. Both the server's and client-go's version variables are set.
_K8S_LDFLAGS = " ".join(
    [_LDFLAGS]
    + [
        f"-X {pkg}.{var}={val}"
        for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
        for var, val in (
            ("gitVersion", versions.KUBERNETES),
            ("gitMajor", "1"),
            ("gitMinor", _K8S_MINOR),
            ("gitTreeState", "clean"),
            ("buildDate", "1970-01-01T00:00:00Z"),
        )
    ]
)

TOOLS: tuple[Tool, ...] = (
    Tool(
        "kube-apiserver",
        versions.KUBERNETES,
        ("build", "-trimpath", f"-ldflags={_K8S_LDFLAGS}", "-o", "{out}", "k8s.io/kubernetes/cmd/kube-apiserver"),
        module_dir="tools/kube",
    ),
    Tool(
        "kubectl",
        versions.KUBERNETES,
        ("build", "-trimpath", f"-ldflags={_K8S_LDFLAGS}", "-o", "{out}", "k8s.io/kubernetes/cmd/kubectl"),
        module_dir="tools/kube",
    ),
    # kubo's go.mod replaces go-libp2p, so `go install .../cmd/ipfs@version` refuses it: the wrapper module
    # repeats the replace (pointed at a release the module proxy serves; see tools/kubo/go.mod).
    Tool(
        "ipfs",
        versions.KUBO,
        ("build", "-trimpath", f"-ldflags={_LDFLAGS}", "-o", "{out}", "github.com/ipfs/kubo/cmd/ipfs"),
        module_dir="tools/kubo",
    ),
    Tool(
        "kine",
        versions.KINE,
        ("install", "-trimpath", f"-ldflags={_LDFLAGS}", f"github.com/k3s-io/kine@{versions.KINE}"),
        cgo=True,
    ),
    Tool(
        "helm",
        versions.HELM,
        ("install", "-trimpath", f"-ldflags={_LDFLAGS}", f"helm.sh/helm/v3/cmd/helm@{versions.HELM}"),
    ),
)


def _k8s_cmd(name: str) -> Tool:
    return Tool(
        name,
        versions.KUBERNETES,
        ("build", "-trimpath", f"-ldflags={_K8S_LDFLAGS}", "-o", "{out}", f"k8s.io/kubernetes/cmd/{name}"),
        module_dir="tools/kube",
    )


def _containerd_cmd(name: str) -> Tool:
    return Tool(
        name,
        versions.CONTAINERD,
        ("install", "-trimpath", "-tags=no_btrfs urfave_cli_no_docs",
         f"-ldflags={_LDFLAGS} -X github.com/containerd/containerd/v2/version.Version={versions.CONTAINERD}",
         f"github.com/containerd/containerd/v2/cmd/{name}@{versions.CONTAINERD}"),
    )


NODE_TOOLS: tuple[Tool, ...] = (
    _k8s_cmd("kube-controller-manager"),
    _k8s_cmd("kube-scheduler"),
    _k8s_cmd("kubelet"),
    _k8s_cmd("kube-proxy"),
    _containerd_cmd("containerd"),
    _containerd_cmd("containerd-shim-runc-v2"),
    _containerd_cmd("ctr"),
    # The cluster's DNS (Services by name, as a chart's pods and `helm test` use them); coredns's go.mod has
    # no replace directives either.
    Tool(
        "coredns",
        versions.COREDNS,
        ("install", "-trimpath", f"-ldflags={_LDFLAGS}", f"github.com/coredns/coredns@{versions.COREDNS}"),
    ),
)


def missing_tools(tools: tuple[Tool, ...] = TOOLS) -> list[Tool]:
    return [t for t in tools if not t.is_current()]


def _go() -> str:
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if go is None:
        raise StackError(
            "the Go toolchain is not on PATH: install Go 1.26+ (it builds kube-apiserver, kubectl, kubo, kine, helm)"
        )
    return go


def build_tool(tool: Tool) -> float:
    """Build one tool into the cache; returns the seconds it took. Raises StackError with the log's tail."""
    bindir = paths.bin_dir()
    bindir.mkdir(parents=True, exist_ok=True)
    logdir = paths.cache_dir() / "build-logs"
    logdir.mkdir(parents=True, exist_ok=True)
    log = logdir / f"{tool.name}.log"
    env = dict(os.environ)
    env.update(tool.env)
    env["CGO_ENABLED"] = "1" if tool.cgo else "0"
    env["GOFLAGS"] = "-mod=mod"
    if tool.module_dir is None:
        env["GOBIN"] = str(bindir)
        cwd = paths.cache_dir()
    else:
        cwd = paths.repo_root() / tool.module_dir
        if not (cwd / "go.mod").is_file():
            raise StackError(
                f"{cwd}/go.mod is missing: the stack builds {tool.name} from the trustcap source checkout; "
                "run trustcap from a clone of the repository (pip install -e .)"
            )
    args = [a.replace("{out}", str(tool.path)) for a in tool.args]
    start = time.monotonic()
    with log.open("w") as fh:
        proc = subprocess.run([_go(), *args], cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise StackError(
            f"building {tool.name} {tool.version} failed (exit {proc.returncode}); full log: {log}\n"
            + "\n".join(tail)
        )
    tool.stamp.write_text(tool.fingerprint)
    return time.monotonic() - start


def ensure_tools(
    on_progress: Callable[[Tool, str], None] | None = None, tools: tuple[Tool, ...] = TOOLS
) -> dict[str, float]:
    """Build every tool that is missing or stale; returns seconds per tool built (empty when all cached)."""
    built: dict[str, float] = {}
    for tool in missing_tools(tools):
        if on_progress:
            on_progress(tool, "building")
        built[tool.name] = build_tool(tool)
        if on_progress:
            on_progress(tool, "built")
    return built
