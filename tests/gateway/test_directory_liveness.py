"""The gateway's verifier directory, as `python3 -m trustcap.gateway` wires it, drops a Gateway the operator
has not seen lately or the chain does not call active (issue 12 item 13, decision 0114). `lastSeen` is
written here by the operator's own writer (operator/gateway.py `record_seen`) from a real relay's liveness
answer over loopback; the Kubernetes list is our own callable over one Gateway object, and the clocks are
frozen. Each refusal has its passing control."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from trustcap.chain.escrow import Escrow, NodeInfo
from trustcap.chain.keys import KeySigner
from trustcap.gateway.__main__ import _verifier_directory, parser
from trustcap.gateway.relay import RelayService
from trustcap.gateway.verifiers import KubeGatewayDirectory, StaticDirectory
from trustcap.operator.gateway import record_seen

GATEWAY = KeySigner("0x" + "5a" * 32)
T0 = 1_800_000_000.0


class _NoAgent:
    node_id = "hpc-2"

    def relay(self, nonce: bytes) -> Any:
        raise AssertionError("Must not be called")

    def challenge(self, nonce: bytes, capsule_state: dict[str, Any] | None = None) -> Any:
        raise AssertionError("Must not be called")


class Patch:
    def __init__(self) -> None:
        self.status: dict[str, Any] = {}


def _args(tmp_path: Path, *extra: str, chain: bool = False) -> argparse.Namespace:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}], "users": [{"name": "u", "user": {}}]}))
    argv = ["--trustroot", str(tmp_path), "--node", "hpc-1", "--boot-digest", "sha256:" + "ab" * 32, "--policy",
            str(tmp_path / "policy.yaml"), "--listen", "127.0.0.1:0", "--relay", "127.0.0.1:0", "--token-file",
            str(tmp_path / "token"), "--kubeconfig", str(kubeconfig), *extra]
    if chain:
        deployment = tmp_path / "deployment.json"
        deployment.write_text(json.dumps({"chain_id": 31337, **{k: "0x" + "11" * 20 for k in
                                                                 ("registry", "log", "reputation", "escrow")}}))
        argv += ["--chain-rpc", "http://127.0.0.1:1", "--deployment", str(deployment)]
    args: argparse.Namespace = parser().parse_args(argv)
    return args


class Cluster:
    """One Gateway object whose status the operator's writer patches; the directory lists it."""

    def __init__(self, endpoint: str) -> None:
        self.item: dict[str, Any] = {"metadata": {"name": "gw-2"},
                                     "spec": {"address": GATEWAY.address.lower(), "endpoint": endpoint},
                                     "status": {"phase": "Active"}}
        self.wall = T0
        self.mono = 0.0

    def operator_tick(self) -> str | None:
        patch = Patch()
        why: str | None = record_seen(self.item["spec"], self.item["status"], patch, now=self.wall)
        self.item["status"].update(patch.status)
        return why

    def wire(self, directory: Any) -> KubeGatewayDirectory:
        assert isinstance(directory, KubeGatewayDirectory)
        directory._list = lambda: [json.loads(json.dumps(self.item))]
        directory.clock = lambda: self.mono
        directory.wall = lambda: self.wall
        return directory


def test_the_gateways_directory_needs_lastseen_by_default(tmp_path: Path) -> None:
    d = _verifier_directory(_args(tmp_path))
    assert isinstance(d, KubeGatewayDirectory)
    assert d.require_seen and d.max_age_s == 180 and d.miss_s == 5.0
    assert not d.require_active and d.chain_active is None  # no chain: nobody judges Gateways Active
    off = _verifier_directory(_args(tmp_path, "--no-directory-require-seen", "--directory-max-age", "60"))
    assert isinstance(off, KubeGatewayDirectory) and not off.require_seen and off.max_age_s == 60


def test_a_gateway_the_operator_never_saw_is_no_verifier_until_it_is_seen(tmp_path: Path) -> None:
    relay = RelayService(_NoAgent(), verifiers=StaticDirectory([]), liveness=GATEWAY, liveness_interval_s=0.0)
    try:
        host, port = relay.address
        cluster = Cluster(f"{host}:{port}")
        d = cluster.wire(_verifier_directory(_args(tmp_path)))
        assert not d.allowed(GATEWAY.address) and "no lastSeen" in d.dropped["gw-2"]  # the attack: never seen
        assert cluster.operator_tick() is None  # the operator's probe passes: lastSeen written
        cluster.mono += 5  # within miss_s, not a whole TTL: the new verifier is admitted quickly
        assert d.allowed(GATEWAY.address)  # the positive control
    finally:
        relay.close()


def test_an_offline_gateway_leaves_the_directory(tmp_path: Path) -> None:
    relay = RelayService(_NoAgent(), verifiers=StaticDirectory([]), liveness=GATEWAY, liveness_interval_s=0.0)
    host, port = relay.address
    cluster = Cluster(f"{host}:{port}")
    d = cluster.wire(_verifier_directory(_args(tmp_path)))
    try:
        assert cluster.operator_tick() is None
        assert d.allowed(GATEWAY.address)  # seen: a verifier
    finally:
        relay.close()  # the Pi goes offline
    for _ in range(4):  # the operator keeps probing (every 60 s of lastSeen age); nothing answers
        cluster.wall += 60
        cluster.mono += 60
        why = cluster.operator_tick()
        assert why is not None and "unreachable" in why
    assert not d.allowed(GATEWAY.address)
    assert d.dropped["gw-2"].startswith("offline: its status was last refreshed 240 s ago")


def test_with_a_chain_the_directory_asks_it_and_drops_an_inactive_gateway(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    chain: dict[str, NodeInfo] = {GATEWAY.address.lower(): NodeInfo(address=GATEWAY.address.lower(),
                                                                    vrf_public_key=b"", stake=10**18,
                                                                    reputation_bp=5000, active=True)}
    monkeypatch.setattr(Escrow, "node", lambda self, address: chain.get(address.lower()))
    cluster = Cluster("127.0.0.1:1")
    cluster.item["status"]["lastSeen"] = "2027-01-15T08:00:00Z"
    cluster.wall = 1_800_000_010.0  # 2027-01-15T08:00:10Z: seen 10 s ago
    d = cluster.wire(_verifier_directory(_args(tmp_path, chain=True)))
    assert d.require_active and d.chain_active is not None
    assert d.allowed(GATEWAY.address)  # the positive control: active and staked on chain
    chain[GATEWAY.address.lower()] = NodeInfo(address=GATEWAY.address.lower(), vrf_public_key=b"", stake=0,
                                              reputation_bp=5000, active=True)
    cluster.mono += 31
    assert not d.allowed(GATEWAY.address) and "NodeRegistry" in d.dropped["gw-2"]  # slashed to zero stake
    del chain[GATEWAY.address.lower()]
    cluster.mono += 31
    assert not d.allowed(GATEWAY.address)  # exited: not registered at all
    unjudged = Cluster("127.0.0.1:1")
    unjudged.item["status"] = {"lastSeen": "2027-01-15T08:00:00Z"}  # the operator has not judged it Active
    unjudged.wall = cluster.wall
    d2 = unjudged.wire(_verifier_directory(_args(tmp_path, chain=True)))
    assert not d2.allowed(GATEWAY.address) and "not judged Active" in d2.dropped["gw-2"]


def test_a_flood_of_unknown_signers_lists_once_per_miss_interval(tmp_path: Path) -> None:
    cluster = Cluster("127.0.0.1:1")
    cluster.item["status"]["lastSeen"] = "2027-01-15T08:00:00Z"
    cluster.wall = 1_800_000_010.0
    d = cluster.wire(_verifier_directory(_args(tmp_path)))
    calls = [0]
    listed = d._list

    def counting() -> list[dict[str, Any]]:
        calls[0] += 1
        items: list[dict[str, Any]] = listed()
        return items

    d._list = counting
    assert d.allowed(GATEWAY.address) and calls == [1]
    for i in range(200):  # unknown signers, 200 over 4.9 s: none triggers a list before miss_s
        cluster.mono = i * 0.0245
        assert not d.allowed(KeySigner(bytes([1, i + 1]) + bytes(30)).address)
    assert calls == [1]
    cluster.mono = 5.0
    assert not d.allowed(KeySigner(b"\x7f" * 32).address) and calls == [2]  # one list, then quiet again
