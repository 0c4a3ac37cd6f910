"""The chain-writer as it runs in production: the operator process, a real API server, a real anvil.

A decided Attestation (status.result Passed, three signed verdicts) is created on the stack's
kube-apiserver; the operator, started as a process with the chain settings, batches the round, submits
it, waits for confirmations and patches status.chain with the transaction and block, which are then
checked on chain. Killing the operator and starting it again records nothing twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from chainkit import WRITER, Chain, decided_round
from kubernetes import client

from trustcap.chain.keys import ANVIL_KEYS

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "trustcap-e2e-chain"
GROUP, VERSION, PLURAL = "trustcap.io", "v1alpha1", "attestations"


@pytest.fixture(scope="module")
def custom(k8s_api: Any, kubectl: Any) -> client.CustomObjectsApi:
    kubectl("apply", "-f", str(ROOT / "crds"))
    kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(ROOT / "crds"))
    # namespaces never finish deleting on the local stack (no controller-manager): keep and reuse this one
    ns = kubectl("get", "namespace", NAMESPACE, check=False)
    if ns.returncode != 0:
        kubectl("create", "namespace", NAMESPACE)
    return client.CustomObjectsApi(k8s_api)


def _wait(what: str, probe: Callable[[], Any], timeout: float, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; operator log:\n"
                         + log.read_text(errors="replace")[-4000:])


class Operator:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "trustcap.operator", "--standalone", "--namespace", NAMESPACE,
                 "--verbose"], stdout=fh, stderr=subprocess.STDOUT, env=self.env)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def operator_env(chain: Chain, kube_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    dep = tmp_path / "deployment.json"
    chain.d.save(dep)
    keys = tmp_path / "keys.json"
    sender = ANVIL_KEYS[6]
    assert WRITER.address  # the writer's account is anvil's dev account 6
    keys.write_text(json.dumps({"sender": sender, "batchSigners": list(ANVIL_KEYS[1:4])}))
    env = dict(kube_env)
    env.update({
        "TRUSTCAP_CHAIN_RPC": chain.anvil.url, "TRUSTCAP_CHAIN_DEPLOYMENT": str(dep),
        "TRUSTCAP_CHAIN_JOURNAL": str(tmp_path / "journal.sqlite"), "TRUSTCAP_CHAIN_KEYS": str(keys),
        "TRUSTCAP_CHAIN_CONFIRMATIONS": "1", "TRUSTCAP_CHAIN_BATCH_SECONDS": "1",
    })
    return env


@pytest.fixture
def operator(operator_env: dict[str, str], tmp_path: Path) -> Iterator[Operator]:
    op = Operator(operator_env, tmp_path / "operator.log")
    op.start()
    yield op
    op.stop()


def _decided_round(chain: Chain, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    spec, status = decided_round(chain, epoch=7100 + int.from_bytes(os.urandom(2), "big"))
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Attestation",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}
    return body, status


def _chain_status(custom: client.CustomObjectsApi, name: str) -> dict[str, Any]:
    obj = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
    chain: dict[str, Any] = (obj.get("status") or {}).get("chain") or {}
    return chain if chain.get("txHash") else {}


def test_operator_records_a_decided_round_and_patches_tx_and_block(
    chain: Chain, custom: client.CustomObjectsApi, operator: Operator, operator_env: dict[str, str],
) -> None:
    name = f"att-{os.urandom(3).hex()}"
    body, status = _decided_round(chain, name)
    custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body)
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, NAMESPACE, PLURAL, name, {"status": status})

    recorded = _wait("status.chain.txHash", lambda: _chain_status(custom, name), 120, operator.log)
    receipt = chain.owner.receipt(bytes.fromhex(recorded["txHash"][2:]))
    assert receipt is not None and receipt["status"] == 1
    assert receipt["blockNumber"] == recorded["block"], "status names the block that holds the batch"
    assert recorded["epoch"] == body["spec"]["epoch"]
    event = chain.owner.find_batch(chain.d, bytes.fromhex(recorded["batchId"][2:]),
                                   bytes.fromhex(recorded["merkleRoot"][2:]))
    assert event is not None and int(event["args"]["count"]) == 3, "the whole round is one batch"

    # kill the operator without warning and start it again: it resumes and records nothing twice
    block_before = chain.owner.w3.eth.block_number
    operator.kill()
    operator.start()
    time.sleep(8)  # several batch periods of the restarted writer
    assert _chain_status(custom, name) == recorded
    sent_after = [
        tx for n in range(block_before + 1, chain.owner.w3.eth.block_number + 1)
        for tx in chain.owner.w3.eth.get_block(n, full_transactions=True)["transactions"]
        if tx["from"] == WRITER.address
    ]
    assert sent_after == [], f"the restarted writer sent {len(sent_after)} transaction(s) for a recorded round"
