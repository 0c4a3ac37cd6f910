"""The relay's verifier directory on the stack's real API server: a Gateway object's `spec.address` (any
case) may challenge the relay, an address with no Gateway object may not, and a deleted Gateway stops
being a verifier once the cache expires. With the real operator process, a Gateway is seen
(`status.lastSeen`, through the CRD's status subresource) only while its own key answers the operator's
liveness nonce at its endpoint, and a directory that requires it admits only that one (decision 0114).

No agent is connected here: a member's challenge passes authentication and meets "agent unreachable"
(503), an outsider's is refused before that (403 naming `verifier`). That difference is the proof.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from enrolkit import Cluster, wait_for

from trustcap.chain.keys import KeySigner
from trustcap.gateway.attest_errors import RelayError
from trustcap.gateway.enrol import TokenBook
from trustcap.gateway.relay import RelayService
from trustcap.gateway.relay_client import request_quote
from trustcap.gateway.server import AttestationServer
from trustcap.gateway.verifiers import KubeGatewayDirectory, StaticDirectory
from trustcap.trustroot import SoftwareTrustRoot

pytestmark = pytest.mark.slow
NODE = "hpc-directory-e2e"


def _gateway(cluster: Cluster, name: str, signer: Any, endpoint: str = "127.0.0.1:7444") -> None:
    cluster.create("gateways", {
        "apiVersion": "trustcap.io/v1alpha1", "kind": "Gateway", "metadata": {"name": name},
        "spec": {"address": signer.address.lower(), "signingKey": "0x" + signer.public_key().hex(),
                 "vrfKey": "0x02" + "00" * 32, "trustRoot": "software", "endpoint": endpoint}})


def _outcome(url: str, signer: KeySigner) -> str:
    try:
        request_quote(url, os.urandom(32), signer=signer, node=NODE, timeout=10)
    except RelayError as exc:
        return str(exc)
    return "served"


def test_gateway_objects_are_the_relays_verifiers(cluster: Cluster, kubeconfig: Path, tmp_path: Path) -> None:
    suffix = os.urandom(4).hex()
    member, outsider = KeySigner(os.urandom(32)), KeySigner(os.urandom(32))
    _gateway(cluster, f"gw-verifier-{suffix}", member)
    (tmp_path / "tr").mkdir()
    root = SoftwareTrustRoot.create(tmp_path / "tr", os.urandom(32))
    server = AttestationServer(root, NODE, TokenBook(["0x" + "ab" * 32]))
    directory = KubeGatewayDirectory(str(kubeconfig), ttl_s=1.0)
    relay = RelayService(server, verifiers=directory)
    try:
        assert "503 agent unreachable" in _outcome(relay.url, member)  # authenticated; no agent behind it
        refused = _outcome(relay.url, outsider)
        assert "403 field 'verifier'" in refused and "not in this gateway's verifier directory" in refused
        assert directory.loaded and member.address in directory.addresses and directory.failures == 0
        assert relay.stats["agent_failures"] == 1 and relay.stats["refused_unknown_verifier"] == 1

        cluster.custom.delete_cluster_custom_object("trustcap.io", "v1alpha1", "gateways", f"gw-verifier-{suffix}")
        wait_for("the deleted Gateway to leave the directory",
                 lambda: "403 field 'verifier'" in _outcome(relay.url, member), timeout=30)
    finally:
        relay.close()
        server.close()
        root.close()


def test_an_unreachable_api_server_keeps_nobody_out_it_had_let_in(cluster: Cluster, kubeconfig: Path,
                                                                  tmp_path: Path) -> None:
    """The last good set survives a failed list: the API server is made unreachable by pointing the
    directory's lister at a closed loopback port after one good list."""
    member = KeySigner(os.urandom(32))
    _gateway(cluster, f"gw-verifier-{os.urandom(4).hex()}", member)
    now = [time.monotonic()]
    directory = KubeGatewayDirectory(str(kubeconfig), ttl_s=30, clock=lambda: now[0])
    assert directory.allowed(member.address)
    broken = _closed_port_kubeconfig(kubeconfig, tmp_path)
    directory._list = KubeGatewayDirectory(str(broken), timeout_s=2)._list  # same lister, dead endpoint
    now[0] += 31
    assert directory.allowed(member.address)
    assert directory.failures == 1


def _closed_port_kubeconfig(kubeconfig: Path, tmp_path: Path) -> Path:
    import socket

    import yaml

    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    doc: dict[str, Any] = yaml.safe_load(kubeconfig.read_text())
    for c in doc["clusters"]:
        c["cluster"]["server"] = f"https://127.0.0.1:{port}"
    out = tmp_path / "dead-kubeconfig"
    out.write_text(yaml.safe_dump(doc))
    return out



def test_the_operator_sees_only_a_gateway_whose_key_answers(cluster: Cluster, tmp_path: Path,
                                                            operator_proc: Any) -> None:
    """Which Gateway the directory then admits is tests/gateway/test_directory_liveness.py's: on the shared
    stack another operator may judge these Gateways' phase from its chain, which the directory checks first."""
    suffix = os.urandom(4).hex()
    (tmp_path / "tr").mkdir()
    root = SoftwareTrustRoot.create(tmp_path / "tr", os.urandom(32))
    server = AttestationServer(root, NODE, TokenBook(["0x" + "ab" * 32]))
    relay = RelayService(server, verifiers=StaticDirectory([]), liveness=root)
    host, port = relay.address
    impostor = KeySigner(os.urandom(32))  # a Gateway object naming the same endpoint, with a key nobody runs
    try:
        _gateway(cluster, f"gw-seen-{suffix}", root, f"{host}:{port}")
        _gateway(cluster, f"gw-impostor-{suffix}", impostor, f"{host}:{port}")
        seen = wait_for("the operator to write lastSeen", lambda: (cluster.get("gateways", f"gw-seen-{suffix}")
                                                                    .get("status") or {}).get("lastSeen"), timeout=90)
        assert seen.endswith("Z")  # the positive control: its key answered
        # The impostor's endpoint answers, but not with its key: probed, refused by name, never seen. The
        # warning names the cause; it is logged when the cause changes, so the refusal by key is looked for
        # among this Gateway's lines (a busy relay is retried by the probe, but an API lag may log another).
        def refusal() -> str | None:
            lines = [line for line in operator_proc.text().splitlines()
                     if f"Gateway gw-impostor-{suffix} not seen" in line]
            return next((line for line in lines if "answered as" in line), None)

        refused = wait_for("the operator to refuse the impostor by its key", refusal, timeout=60)
        assert f"answered as {root.address}, not the Gateway's {impostor.address}" in refused, refused
        assert not (cluster.get("gateways", f"gw-impostor-{suffix}").get("status") or {}).get("lastSeen")
    finally:
        relay.close()
        server.close()
        root.close()
