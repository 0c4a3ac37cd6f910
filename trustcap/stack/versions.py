"""Pinned versions of the tools the local stack builds or installs, and why each (docs/versions.md).

One place, so that the build, the docs and the tests agree. Changing a version here invalidates the
cached binary (its stamp records the version it was built at).
"""

from __future__ import annotations

#: k8s.io/kubernetes release for kube-apiserver and kubectl (wrapper module in tools/kube).
KUBERNETES = "v1.36.3"
#: containerd 2.x, the node's container runtime (go install; `stack up --node`). Kubernetes 1.36's kubelet
#: needs a CRI runtime that reports its cgroup driver (containerd 2.x); Debian bookworm's containerd is 1.6.
CONTAINERD = "v2.2.9"
#: CoreDNS, the node's cluster DNS (go install; `stack up --node`).
COREDNS = "v1.14.7"
#: kubo, the IPFS node (`ipfs`) the content store's kubo backend talks to. Built through the wrapper module
#: in tools/kubo: kubo's go.mod replaces go-libp2p with a fork, which `go install pkg@version` refuses, and the
#: module proxy does not serve that fork, so the wrapper points the replace at go-libp2p v0.50.0 instead.
KUBO = "v0.43.1"
#: kine, k3s's datastore shim: SQLite behind an etcd API (go install, cgo for SQLite).
KINE = "v0.17.5"
#: helm v3 CLI (go install).
HELM = "v3.22.0"
#: anvil from npm (@foundry-rs/anvil-linux-amd64); no download at run time, the binary is in the package.
ANVIL_NPM = "1.7.1"
#: Debian suite the base images are built from (debootstrap against the machine's own apt mirror).
DEBIAN_SUITE = "bookworm"
