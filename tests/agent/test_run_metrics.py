"""The agent's own metrics (trustcap.agent.metrics): each ended capsule run is counted by reason, its
duration and its violations by kind observed, and the `metrics` channel op answers them as text.

The executor (our Docker wrapper) is faked; the runner, the manifest, the keys and the envelopes are real.
"""

from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from trustcap.agent import metrics
from trustcap.agent.executor import RunResult
from trustcap.agent.identity import BootConfig, BootKey
from trustcap.agent.run import REASONS, CapsuleRunner, binding_digest
from trustcap.agent.service import Agent
from trustcap.capsule.envelope import open_bytes, seal_bytes
from trustcap.capsule.keys import KeyPair
from trustcap.capsule.manifest import parse_manifest
from trustcap.errors import TrustcapError
from trustcap.violations import Violation

TASK = "0x" + "11" * 32
CAPSULE = bytes.fromhex("22" * 32)
IMAGE = "sha256:" + "ab" * 32
B = KeyPair(hashlib.sha256(b"metrics party B").digest())
SPEC: dict[str, Any] = {
    "function": {"image": "trustcap/psi", "digest": IMAGE, "entrypoint": ["python3", "/capsule/psi.py"]},
    "inputs": [{"name": "names-b", "cid": "bafkreicgnswajfvowfhadauc2mw5qilofj5cdgz65hrua6kosr2pa63eli",
                "owner": "0x" + B.public_key().hex()}],
    "recipients": [{"name": "node-b", "publicKey": "0x" + B.public_key().hex()}],
    "resources": {"cpuMillis": 500, "memoryMiB": 128, "pids": 32, "scratchMiB": 16},
    "timeoutSeconds": 60, "committee": {"size": 3},
    "payment": {"payer": "0x4C9183C39E36BD8bfb8e86f073b3F5693E57d128", "amountWei": "1"},
}
BINDING = binding_digest(parse_manifest(SPEC))
WIPED = {"verified": True, "items": [{"what": "scratch", "verified": True}], "state_restored": True}


class FakeExecutor:
    def __init__(self, violations: list[Violation]) -> None:
        self.violations = violations

    def run(self, spec: Any, *, inputs: Any = None, output_limit: int = 0, should_stop: Any = None) -> RunResult:
        return RunResult(reason="completed", exit_code=0, violations=self.violations, stdout="", stderr="",
                         wipe=dict(WIPED), run_id="r", image=spec.image, seconds=0.1, output=b"bob\n")


def _open(envelope: bytes, wrapped_key: bytes, key: KeyPair, *, name: str, owner: bytes, capsule_id: bytes,
          task_id: bytes, binding_digest: bytes) -> bytes:
    return open_bytes(envelope, key=key, owner=owner, capsule_id=capsule_id, manifest_digest=binding_digest)


def _refuse(*_a: Any, **_k: Any) -> bytes:
    raise TrustcapError("the envelope is not for this key")


def _agent(executor: Any, open_input: Any = _open) -> Agent:
    config = BootConfig(gateway_host="127.0.0.1", gateway_port=1, token="", boot_digest="0x" + "44" * 32,
                        gateway_address="0x" + "55" * 20, node_id="hpc-1")
    return Agent(config, key=BootKey(), measurements=lambda: {"m": "1"},
                 runner=CapsuleRunner(executor, open_input=open_input), scratch_root=Path("/nonexistent"))


def _run_to_end(agent: Agent) -> dict[str, Any]:
    h = agent.handlers()
    key = bytes.fromhex(h["prepare"]({"taskId": TASK, "manifestDigest": "0x" + BINDING.hex(),
                                      "imageDigest": IMAGE})["executorKey"][2:])
    blob = seal_bytes(b"alice\nbob\n", recipients=[key], owner=B, capsule_id=CAPSULE, manifest_digest=BINDING)
    started = h["run"]({"taskId": TASK, "capsuleId": "0x" + CAPSULE.hex(), "manifest": SPEC,
                        "inputs": [{"name": "names-b", "envelope": base64.b64encode(blob).decode(),
                                    "wrappedKey": base64.b64encode(b"stand-in").decode()}]})
    assert started.get("started"), started
    for _ in range(500):
        r = h["result"]({"taskId": TASK})
        if r["state"] == "done":
            return r
        time.sleep(0.01)
    raise AssertionError("run did not end")


def _sample(name: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    assert value is not None, (name, labels)
    return value


def test_a_completed_run_is_counted_with_its_duration_and_its_violations_by_kind() -> None:
    before = {"runs": _sample("trustcap_agent_runs_total", reason="Completed"),
              "seconds": _sample("trustcap_agent_run_duration_seconds_count"),
              "write": _sample("trustcap_agent_audit_violations_total", kind="write"),
              "other": _sample("trustcap_agent_audit_violations_total", kind="other")}
    executor = FakeExecutor([Violation("write", "openat /etc/passwd", "audit", 3),
                             Violation("a-kind-nobody-declared", "x", "audit", 1)])
    assert _run_to_end(_agent(lambda: executor))["reason"] == "Completed"
    assert _sample("trustcap_agent_runs_total", reason="Completed") == before["runs"] + 1
    assert _sample("trustcap_agent_run_duration_seconds_count") == before["seconds"] + 1
    assert _sample("trustcap_agent_audit_violations_total", kind="write") == before["write"] + 3
    # an unknown kind is counted, but under "other": a run cannot add a label value
    assert _sample("trustcap_agent_audit_violations_total", kind="other") == before["other"] + 1
    assert metrics.REGISTRY.get_sample_value("trustcap_agent_audit_violations_total",
                                             {"kind": "a-kind-nobody-declared"}) is None


def test_a_run_whose_input_is_refused_is_counted_as_input_rejected() -> None:
    before = _sample("trustcap_agent_runs_total", reason="InputRejected")
    assert _run_to_end(_agent(lambda: FakeExecutor([]), open_input=_refuse))["reason"] == "InputRejected"
    assert _sample("trustcap_agent_runs_total", reason="InputRejected") == before + 1


def test_the_metrics_op_answers_the_registry_as_prometheus_text() -> None:
    answer = _agent(lambda: FakeExecutor([])).handlers()["metrics"]({"op": "metrics"})
    families = {f.name: f for f in text_string_to_metric_families(answer["exposition"])}
    assert {s.name for s in families["trustcap_agent_runs"].samples} == {"trustcap_agent_runs_total"}
    # every label value exists from the start: a dashboard has data before the first run
    assert {s.labels["reason"] for s in families["trustcap_agent_runs"].samples} == set(REASONS)
    assert {s.labels["verified"] for s in families["trustcap_agent_wipe_duration_seconds"].samples
            if s.name.endswith("_count")} == {"true", "false"}


def test_the_agents_reasons_are_the_runners() -> None:
    assert metrics.REASONS == REASONS


def test_a_wipe_is_observed_by_its_outcome() -> None:
    before = _sample("trustcap_agent_wipe_duration_seconds_count", verified="false")
    metrics.observe_wipe(1.5, verified=False)
    assert _sample("trustcap_agent_wipe_duration_seconds_count", verified="false") == before + 1
