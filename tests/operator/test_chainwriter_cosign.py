"""Who signs the chain-writer's batches is a stated choice: the verifier gateways, or dev keys said to be so.

Configuration only (no chain, no cluster is reached: the kubeconfig points at a closed port and nothing
is listed), plus how the gateways to ask are chosen from the Gateway objects for a batch's leaves.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import kopf
import pytest

from trustcap.chain.keys import ANVIL_KEYS, KeySigner
from trustcap.evidence.verdict import Domain, Verdict
from trustcap.operator import chainwriter

DOMAIN = Domain(chain_id=31337, verifying_contract="0x" + "22" * 20)
KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""


def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, keys: dict[str, Any], mode: str | None) -> None:
    (tmp_path / "keys.json").write_text(json.dumps(keys))
    (tmp_path / "dep.json").write_text(json.dumps({"chain_id": 31337, "registry": "0x" + "11" * 20,
                                                   "log": "0x" + "22" * 20, "reputation": "0x" + "33" * 20,
                                                   "escrow": "0x" + "44" * 20}))
    (tmp_path / "kubeconfig").write_text(KUBECONFIG)
    for k, v in {"TRUSTCAP_CHAIN_RPC": "http://127.0.0.1:1", "TRUSTCAP_CHAIN_JOURNAL": str(tmp_path / "j.sqlite"),
                 "TRUSTCAP_CHAIN_KEYS": str(tmp_path / "keys.json"), "KUBECONFIG": str(tmp_path / "kubeconfig"),
                 "TRUSTCAP_CHAIN_DEPLOYMENT": str(tmp_path / "dep.json")}.items():
        monkeypatch.setenv(k, v)
    if mode is None:
        monkeypatch.delenv("TRUSTCAP_CHAIN_COSIGN", raising=False)
    else:
        monkeypatch.setenv("TRUSTCAP_CHAIN_COSIGN", mode)


def test_gateways_cosign_and_the_operator_holds_no_batch_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    _env(monkeypatch, tmp_path, {"sender": ANVIL_KEYS[0]}, "gateways")
    with caplog.at_level(logging.INFO, "trustcap.operator.chainwriter"):
        w = chainwriter._from_env().writer
    assert w.cosigners is not None and w.batch_signers == []
    assert "co-signed by the verifier gateways" in caplog.text


@pytest.mark.parametrize("mode", [pytest.param("dev-keys", id="explicit"), pytest.param(None, id="keys-file")])
def test_dev_keys_are_a_development_option_said_so_at_startup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture,
                                                             mode: str | None) -> None:
    _env(monkeypatch, tmp_path, {"sender": ANVIL_KEYS[0], "batchSigners": list(ANVIL_KEYS[1:3])}, mode)
    with caplog.at_level(logging.WARNING, "trustcap.operator.chainwriter"):
        w = chainwriter._from_env().writer
    assert w.cosigners is None and len(w.batch_signers) == 2
    assert "DEVELOPMENT ONLY" in caplog.text


@pytest.mark.parametrize("keys, mode, why", [
    pytest.param({"sender": ANVIL_KEYS[0]}, "dev-keys", "needs \"batchSigners\"", id="dev-keys-without-keys"),
    pytest.param({"sender": ANVIL_KEYS[0]}, "operator", "not one of", id="unknown-mode"),
])
def test_a_cosign_choice_that_cannot_work_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                   keys: dict[str, Any], mode: str, why: str) -> None:
    _env(monkeypatch, tmp_path, keys, mode)
    with pytest.raises(kopf.PermanentError, match=why):
        chainwriter._from_env()


def _verdict(verifier: KeySigner) -> Verdict:
    return Verdict(attestation_id="0x" + "ab" * 32, node=KeySigner(ANVIL_KEYS[5]).address, verifier=verifier.address,
                   phase=1, passed=True, quote_digest="0x" + "01" * 32, policy_digest="0x" + "00" * 32, epoch=3,
                   issued_at=1_700_000_000)


def test_the_verifiers_the_leaves_name_are_asked_first_then_the_other_gateways() -> None:
    a, b, c, d, e = (KeySigner(k) for k in ANVIL_KEYS[1:6])
    objects = [{"spec": {"address": g.address, "endpoint": f"127.0.0.1:{9000 + i}"}}
               for i, g in enumerate((a, b, d, e))] + [{"spec": {"address": c.address}}]  # c: no endpoint
    cosigners = chainwriter.gateway_cosigners(lambda: objects, DOMAIN)
    got = cosigners([_verdict(b), _verdict(a), _verdict(b), _verdict(c)])
    others = sorted([(d.address.lower(), "http://127.0.0.1:9002/v1/cosign"),
                     (e.address.lower(), "http://127.0.0.1:9003/v1/cosign")])
    assert [(x.address, x.url) for x in got] == [(b.address.lower(), "http://127.0.0.1:9001/v1/cosign"),
                                                 (a.address.lower(), "http://127.0.0.1:9000/v1/cosign"), *others]


def test_a_gateway_endpoint_that_is_not_http_is_refused() -> None:
    with pytest.raises(chainwriter.CosignRefused, match="not an http"):
        chainwriter.GatewayCosigner("0x" + "aa" * 20, "file:///etc/passwd", DOMAIN)
