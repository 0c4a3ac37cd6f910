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
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from clusterkit import Cluster, ClusterLink, Proc, wait_for
from netlab import Lab, need_root, veth_lab

# The cluster side (Cluster, ClusterLink, Proc, the operator) lives in e2e/clusterkit.py, shared with the
# netboot join; the names the enrolment tests use are re-exported so they import one kit.
__all__ = ["AGENT_PORT", "GW_IP", "HPC_IP", "RELAY", "Cluster", "ClusterLink", "Lab", "Proc", "make_lab",
           "start_agent", "start_gateway", "wait_for"]

GW_IP, HPC_IP = "169.254.78.1", "169.254.78.2"
AGENT_PORT = 7790
RELAY = "127.0.0.1:7791"  # the relay on the gateway namespace's own loopback (unused by these tests)


@contextlib.contextmanager
def make_lab() -> Iterator[Lab]:
    need_root("enrolment e2e")
    with veth_lab("tce", GW_IP, HPC_IP) as lab:
        yield lab


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
