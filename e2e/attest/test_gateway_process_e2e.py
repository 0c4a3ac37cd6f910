"""End to end with both sides as real processes: `python3 -m trustcap.gateway` in the gateway namespace,
`python3 -m trustcap.agent` in the hpc namespace, and a committee of three verifiers that reach the
HPC only through the gateway's relay.

Proves: the gateway's token file enrols the agent; the relay refuses an unsigned challenge and one signed
by a gateway outside its directory (`--verifier`), and serves neither (its counters say so); each
verifier's own nonce comes back in a quote that only that verifier accepts; the relay's trust status goes
from untrusted (no check yet) to trusted, then to untrusted naming `agent.unreachable` when the agent is
killed; the gateway stops cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from attestlab import BOOT, GW_IP, NODE, Lab, in_netns, start_agent, stop_agent

from trustcap.chain.keys import KeySigner
from trustcap.evidence import NonceRegistry, appraise_quote
from trustcap.gateway.attest_errors import RelayError
from trustcap.gateway.relay_client import request_quote, request_status
from trustcap.trustroot import SoftwareTrustRoot, new_kek_file

pytestmark = pytest.mark.slow
RELAY = "127.0.0.1:7781"  # the gateway namespace's own loopback: the "cluster side" in this lab
AGENT_PORT = 7780


def _status(lab: Lab, url: str) -> dict[str, Any]:
    with in_netns(lab.gw):  # the relay listens on the gateway namespace's loopback
        doc: dict[str, Any] = request_status(url)
    return doc


def _post_raw(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """A challenge body sent as is (no signature): what anyone who reaches the relay could send."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url + "/v1/challenge", data=body, method="POST",  # noqa: S310 - the lab's relay
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - the lab's relay
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _metrics(lab: Lab, url: str) -> str:
    import urllib.request

    with in_netns(lab.gw), urllib.request.urlopen(url + "/metrics", timeout=10) as resp:  # noqa: S310 - lab relay
        return str(resp.read().decode())


def _wait_status(lab: Lab, url: str, pred: Any, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        doc = _status(lab, url)
        if pred(doc):
            return doc
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last status {doc}")


def test_gateway_and_agent_processes_serve_a_committee_through_the_relay(lab: Lab, tmp_path: Path) -> None:
    home, kek_file = tmp_path / "tr", tmp_path / "kek"
    home.mkdir()
    SoftwareTrustRoot.create(home, new_kek_file(kek_file)).close()
    with SoftwareTrustRoot.open(home, bytes.fromhex(kek_file.read_text().strip())) as root:
        gw_address = root.address
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "apiVersion": "trustcap.io/v1alpha1", "kind": "GatewayPolicy",
        "monitor": {"meanIntervalSeconds": 0.2, "minIntervalSeconds": 0.05, "maxQuoteAgeSeconds": 30},
        "attestation": {"node": NODE, "bootImages": [BOOT], "allowUnlistedMeasurements": True},
    }))
    token_file = tmp_path / "token"
    members = [KeySigner(os.urandom(32)) for _ in range(3)]  # the committee's trust roots (software keys here)
    outsider = KeySigner(os.urandom(32))  # a well-formed signer that is no Gateway of this cluster
    with (tmp_path / "gateway.log").open("wb") as gw_log:
        gw = subprocess.Popen(
            ["ip", "netns", "exec", lab.gw, sys.executable, "-P", "-m", "trustcap.gateway",
             "--trustroot", str(home), "--kek-file", str(kek_file), "--node", NODE, "--boot-digest", BOOT,
             "--policy", str(policy), "--listen", f"{GW_IP}:{AGENT_PORT}", "--relay", RELAY,
             "--token-file", str(token_file), "--status-max-age", "5",
             *[x for m in members for x in ("--verifier", m.address)]],
            stdout=subprocess.PIPE, stderr=gw_log, cwd="/",
        )
    agent = None
    try:
        assert gw.stdout is not None
        ready = gw.stdout.readline().decode()
        assert ready.startswith("ready "), (tmp_path / "gateway.log").read_text()
        assert f"gateway={gw_address}" in ready
        url = f"http://{RELAY}"
        metrics_url = ready.split(" metrics=", 1)[1].split()[0]  # the Pi operator's listener (decision 0114)
        assert oct(os.stat(token_file).st_mode & 0o777) == "0o600"
        doc = _status(lab, metrics_url)
        assert doc["trusted"] is False and doc["node"] == NODE  # nothing enrolled, nothing trusted

        agent = start_agent(lab, AGENT_PORT, gw_address, token_file.read_text().strip(), tmp_path / "agent.log")
        _wait_status(lab, metrics_url, lambda d: d["trusted"], 30, "the node to become trusted")

        with in_netns(lab.gw):
            unsigned = _post_raw(url, b'{"nonce": "0x' + b"ab" * 32 + b'"}')
            with pytest.raises(RelayError, match=r"403 field 'verifier'.* not in this gateway's verifier directory"):
                request_quote(url, NonceRegistry(60).issue(), signer=outsider, node=NODE)
        assert unsigned[0] == 400 and "'node'" in unsigned[1]["error"], unsigned
        assert unsigned[1]["field"] == "node"

        committee = [NonceRegistry(60) for _ in range(3)]
        quotes = []
        with in_netns(lab.gw):
            for member, verifier in zip(members, committee, strict=True):
                nonce = verifier.issue()
                signed = request_quote(url, nonce, signer=member, node=NODE)
                key = bytes.fromhex(signed.quote.agent_key[2:])  # the key the gateway countersigned for
                report = appraise_quote(signed, nonces=verifier, expected_nonce=nonce, node_id=NODE, agent_key=key,
                                        gateway_address=gw_address, now=time.time(), max_age_seconds=30)
                assert report.ok, report.summary()
                quotes.append((signed, key))
        # a quote is good for the verifier that asked, once: another member cannot be fed it
        signed, key = quotes[0]
        report = appraise_quote(signed, nonces=committee[1], expected_nonce=committee[1].issue(), node_id=NODE,
                                agent_key=key, gateway_address=gw_address, now=time.time(), max_age_seconds=30)
        assert report.event_ids == ["nonce.mismatch", "nonce.unknown"]
        metrics = _metrics(lab, metrics_url)
        for result, count in (("served", 3), ("bad_request", 1), ("unknown_verifier", 1)):
            assert f'trustcap_gateway_relay_challenges_total{{result="{result}"}} {count}.0' in metrics, metrics

        agent.kill()
        doc = _wait_status(lab, metrics_url, lambda d: not d["trusted"], 30, "the node to become untrusted")
        assert doc["reason"] == "attestation.failed: agent.unreachable", doc
    finally:
        if agent is not None:
            stop_agent(agent)
        gw.send_signal(signal.SIGTERM)
        try:
            rc = gw.wait(timeout=20)
        finally:
            if gw.poll() is None:
                gw.kill()
                gw.wait()
            if gw.stdout is not None:
                gw.stdout.close()
    assert rc == 0, (tmp_path / "gateway.log").read_text()
