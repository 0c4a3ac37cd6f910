"""The agent's capsule ops (trustcap.agent.run) over the Agent's handlers, with a fake executor.

The executor (our own wrapper of the Docker Engine) is faked; everything else is real: keys, envelopes,
the manifest, the quote. Inputs are sealed to the task's executor key directly, a stand-in for the key
release (trustcap.release) that lands in parallel; the stand-in checks the same owner, capsule id and
binding digest.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from trustcap.agent.executor import RunResult
from trustcap.agent.identity import BootConfig, BootKey
from trustcap.agent.run import CapsuleRunner, binding_digest
from trustcap.agent.service import Agent
from trustcap.capsule.envelope import open_bytes, seal_bytes
from trustcap.capsule.errors import NotARecipient
from trustcap.capsule.keys import KeyPair
from trustcap.capsule.manifest import parse_manifest

TASK = "0x" + "11" * 32
CAPSULE = bytes.fromhex("22" * 32)
ROUND = "0x" + "33" * 32
IMAGE = "sha256:" + "ab" * 32
B, C = (KeyPair(hashlib.sha256(s.encode()).digest()) for s in ("unit party B", "unit party C"))
SPEC: dict[str, Any] = {
    "function": {"image": "trustcap/psi", "digest": IMAGE, "entrypoint": ["python3", "/capsule/psi.py"]},
    "inputs": [{"name": "names-b", "cid": "bafkreicgnswajfvowfhadauc2mw5qilofj5cdgz65hrua6kosr2pa63eli",
                "owner": "0x" + B.public_key().hex()},
               {"name": "names-c", "cid": "bafkreifefylghqaf4iz5cxeyt5qmrjnd7bv22snmzrbokiam33ofuuz4vi",
                "owner": "0x" + C.public_key().hex()}],
    "recipients": [{"name": "node-b", "publicKey": "0x" + B.public_key().hex()},
                   {"name": "node-c", "publicKey": "0x" + C.public_key().hex()}],
    "resources": {"cpuMillis": 500, "memoryMiB": 128, "pids": 32, "scratchMiB": 16},
    "timeoutSeconds": 60, "committee": {"size": 3},
    "payment": {"payer": "0x4C9183C39E36BD8bfb8e86f073b3F5693E57d128", "amountWei": "1"},
}
BINDING = "0x" + binding_digest(parse_manifest(SPEC)).hex()
WIPED = {"verified": True, "items": [{"what": "scratch", "verified": True}], "state_restored": True}


def _stand_in(envelope: bytes, wrapped_key: bytes, key: KeyPair, *, name: str, owner: bytes, capsule_id: bytes,
              task_id: bytes, binding_digest: bytes) -> bytes:
    return open_bytes(envelope, key=key, owner=owner, capsule_id=capsule_id, manifest_digest=binding_digest)


class FakeExecutor:
    """Records the spec and inputs; ends as told; `hold` keeps the run alive until set or stopped."""

    def __init__(self, reason: str = "completed", exit_code: int | None = 0, output: bytes | None = b"bob\n",
                 wipe: dict[str, Any] | None = None, hold: threading.Event | None = None) -> None:
        self.reason, self.exit_code, self.output, self.wipe, self.hold = reason, exit_code, output, wipe, hold
        self.calls: list[tuple[Any, dict[str, bytes]]] = []
        self.started = threading.Event()

    def run(self, spec: Any, *, inputs: Any = None, output_limit: int = 0, should_stop: Any = None) -> RunResult:
        self.calls.append((spec, dict(inputs)))
        self.started.set()
        reason = self.reason
        while self.hold is not None and not self.hold.is_set():
            if should_stop is not None and should_stop():
                reason = "killed-by-policy"
                break
            time.sleep(0.01)
        return RunResult(reason=reason, exit_code=self.exit_code, violations=[], stdout="", stderr="",
                         wipe=dict(self.wipe or WIPED), run_id="r", image=spec.image, seconds=0.1,
                         output=self.output if reason == "completed" else None)


def _tripwire() -> Any:
    raise AssertionError("must not be called: nothing may run")


def _agent(executor: Any) -> Agent:
    config = BootConfig(gateway_host="127.0.0.1", gateway_port=1, token="", boot_digest="0x" + "44" * 32,
                        gateway_address="0x" + "55" * 20, node_id="hpc-1")
    runner = CapsuleRunner(executor, open_input=_stand_in)
    return Agent(config, key=BootKey(), measurements=lambda: {"m": "1"}, runner=runner,
                 scratch_root=Path("/nonexistent"))


def _call(agent: Agent, op: str, **req: Any) -> dict[str, Any]:
    return agent.handlers()[op]({"op": op, **req})


def _prepare(agent: Agent) -> bytes:
    r = _call(agent, "prepare", taskId=TASK, manifestDigest=BINDING, imageDigest=IMAGE)
    return bytes.fromhex(r["executorKey"][2:])


def _inputs(executor_key: bytes, *, owners: dict[str, KeyPair] | None = None,
            texts: dict[str, bytes] | None = None) -> list[dict[str, str]]:
    owners = owners or {"names-b": B, "names-c": C}
    texts = texts or {"names-b": b"alice\nbob\n", "names-c": b"bob\ncarol\n"}
    out = []
    for name in ("names-b", "names-c"):
        blob = seal_bytes(texts[name], recipients=[executor_key], owner=owners[name], capsule_id=CAPSULE,
                          manifest_digest=bytes.fromhex(BINDING[2:]))
        out.append({"name": name, "envelope": base64.b64encode(blob).decode(),
                    "wrappedKey": base64.b64encode(b"stand-in").decode()})
    return out


def _wait(agent: Agent) -> dict[str, Any]:
    for _ in range(500):
        r = _call(agent, "result", taskId=TASK)
        if r["state"] == "done":
            return r
        time.sleep(0.01)
    raise AssertionError("run did not end")


def _run(agent: Agent, key: bytes, **over: Any) -> dict[str, Any]:
    return _call(agent, "run", **{"taskId": TASK, "capsuleId": "0x" + CAPSULE.hex(), "manifest": SPEC,
                                  "inputs": _inputs(key), **over})


def test_prepare_makes_one_key_per_task_and_keeps_it() -> None:
    agent = _agent(_tripwire)
    k1, k2 = _prepare(agent), _prepare(agent)
    assert k1 == k2 and len(k1) == 33
    other = _call(agent, "prepare", taskId="0x" + "99" * 32, manifestDigest=BINDING, imageDigest=IMAGE)
    assert bytes.fromhex(other["executorKey"][2:]) != k1
    refused = _call(agent, "prepare", taskId=TASK, manifestDigest="0x" + "00" * 32, imageDigest=IMAGE)
    assert "cannot be rebound" in refused["error"]


@pytest.mark.parametrize(("field", "value", "why"), [
    pytest.param("taskId", "0x12", "'taskId' must be 32 bytes", id="short-task"),
    pytest.param("manifestDigest", "zz", "'manifestDigest' must be 32 bytes", id="bad-digest"),
    pytest.param("imageDigest", "trustcap/psi:latest", "never a tag", id="tag-not-id"),
    pytest.param("imageDigest", "sha256:abcd", "never a tag", id="short-id"),
])
def test_prepare_names_the_bad_field(field: str, value: str, why: str) -> None:
    req = {"taskId": TASK, "manifestDigest": BINDING, "imageDigest": IMAGE, field: value}
    assert why in _call(_agent(_tripwire), "prepare", **req)["error"]


def test_quote_binds_the_prepared_task_round_phase_and_key() -> None:
    agent = _agent(_tripwire)
    key = _prepare(agent)
    r = _call(agent, "quote", nonce="0x" + "66" * 32, capsule={"taskId": TASK, "round": ROUND, "phase": "pre"})
    assert r["quote"]["capsule_state"] == {"taskId": TASK, "manifestDigest": BINDING, "imageDigest": IMAGE,
                                           "round": ROUND, "phase": "pre", "executorKey": "0x" + key.hex()}
    idle = _call(agent, "quote", nonce="0x" + "66" * 32)
    assert idle["quote"]["capsule_state"] == {"phase": "idle", "containers": 0}  # control: no capsule asked


@pytest.mark.parametrize(("capsule", "why"), [
    pytest.param({"taskId": "0x" + "77" * 32, "round": ROUND, "phase": "pre"}, "not prepared", id="unknown-task"),
    pytest.param({"taskId": TASK, "round": ROUND, "phase": "later"}, "'capsule.phase'", id="bad-phase"),
    pytest.param({"taskId": TASK, "round": "0x1", "phase": "pre"}, "'capsule.round'", id="bad-round"),
])
def test_quote_for_a_task_not_prepared_or_malformed_is_refused(capsule: dict[str, Any], why: str) -> None:
    agent = _agent(_tripwire)
    _prepare(agent)
    assert why in _call(agent, "quote", nonce="0x" + "66" * 32, capsule=capsule)["error"]


def test_a_completed_run_seals_the_result_to_each_recipient_signed_by_the_executor_key() -> None:
    fake = FakeExecutor(output=b"bob\n")
    agent = _agent(lambda: fake)
    key = _prepare(agent)
    assert _run(agent, key) == {"started": True, "taskId": TASK}
    r = _wait(agent)
    assert r["reason"] == "Completed" and r["exitCode"] == 0 and r["error"] == ""
    spec, inputs = fake.calls[0]
    assert inputs == {"names-b": b"alice\nbob\n", "names-c": b"bob\ncarol\n"}
    assert spec.image == IMAGE and spec.command == ("python3", "/capsule/psi.py") and not spec.keep_logs
    assert (spec.timeout_s, spec.memory_bytes, spec.nano_cpus, spec.pids_limit) == (60, 128 << 20, 500_000_000, 32)
    assert spec.scratch_bytes >= 16 << 20 and spec.egress == ()
    for rec, party, other in ((r["results"][0], B, C), (r["results"][1], C, B)):
        blob = base64.b64decode(rec["envelope"])
        assert open_bytes(blob, key=party, owner=key, capsule_id=CAPSULE,
                          manifest_digest=bytes.fromhex(BINDING[2:])) == b"bob\n"
        with pytest.raises(NotARecipient):
            open_bytes(blob, key=other, owner=key, capsule_id=CAPSULE, manifest_digest=bytes.fromhex(BINDING[2:]))


def test_an_input_not_from_its_owner_is_rejected_by_name_and_nothing_runs() -> None:
    agent = _agent(_tripwire)
    key = _prepare(agent)
    intruder = KeyPair.generate()
    _call(agent, "run", taskId=TASK, capsuleId="0x" + CAPSULE.hex(), manifest=SPEC,
          inputs=_inputs(key, owners={"names-b": B, "names-c": intruder}))
    r = _wait(agent)
    assert r["reason"] == "InputRejected" and "'names-c'" in r["error"] and r["results"] == []
    assert r["wipe"]["ran"] is False


@pytest.mark.parametrize(("over", "why"), [
    pytest.param({"capsuleId": "0x00"}, "'capsuleId'", id="bad-capsule-id"),
    pytest.param({"manifest": {**SPEC, "timeoutSeconds": 61}}, "binding digest", id="other-manifest"),
    pytest.param({"manifest": {**SPEC, "function": {**SPEC["function"], "digest": "sha256:" + "cd" * 32}}},
                 "binding digest", id="other-image"),
    pytest.param({"manifest": {"function": {}}}, "field 'manifest'", id="invalid-manifest"),
    pytest.param({"inputs": []}, "are not the manifest's", id="inputs-missing"),
    pytest.param({"inputs": [{"name": "names-b", "envelope": "!!", "wrappedKey": "AA=="}]},
                 "'inputs[0].envelope' is not base64", id="bad-base64"),
    pytest.param({"taskId": "0x" + "77" * 32}, "not prepared", id="unprepared-task"),
])
def test_a_malformed_run_names_the_field_and_starts_nothing(over: dict[str, Any], why: str) -> None:
    agent = _agent(_tripwire)
    key = _prepare(agent)
    assert why in _run(agent, key, **over)["error"]
    assert "has not been run" in _call(agent, "result", taskId=TASK)["error"]


def test_quotes_are_answered_during_a_run_and_stop_really_stops_it() -> None:
    hold = threading.Event()
    fake = FakeExecutor(hold=hold)
    agent = _agent(lambda: fake)
    key = _prepare(agent)
    _run(agent, key)
    assert fake.started.wait(5)
    q = _call(agent, "quote", nonce="0x" + "66" * 32, capsule={"taskId": TASK, "round": ROUND, "phase": "during"})
    assert q["quote"]["capsule_state"]["phase"] == "during"
    assert _call(agent, "result", taskId=TASK) == {"state": "running", "taskId": TASK}
    assert "one run at a time" in _run(agent, key)["error"]
    assert _call(agent, "stop", reason="policy") == {"stopped": True, "running": False, "taskId": TASK}
    r = _wait(agent)
    assert r["reason"] == "Stopped" and "policy" in r["error"] and r["results"] == []
    assert _call(agent, "stop", reason="again") == {"stopped": False, "running": False}


def test_finish_drops_the_executor_key() -> None:
    agent = _agent(lambda: FakeExecutor())
    key = _prepare(agent)
    _run(agent, key)
    _wait(agent)
    assert _call(agent, "finish", taskId=TASK) == {"finished": True, "taskId": TASK}
    q = _call(agent, "quote", nonce="0x" + "66" * 32, capsule={"taskId": TASK, "round": ROUND, "phase": "post"})
    assert "not prepared" in q["error"]
    assert _prepare(agent) != key  # a new prepare is a new key


@pytest.mark.parametrize(("fake", "reason", "why"), [
    pytest.param(FakeExecutor(reason="timeout", exit_code=137), "Timeout", "timeoutSeconds", id="timeout"),
    pytest.param(FakeExecutor(exit_code=1), "Failed", "code 1", id="non-zero-exit"),
    pytest.param(FakeExecutor(output=None), "Failed", "no /output/result", id="no-result"),
    pytest.param(FakeExecutor(wipe={"verified": False, "items": []}), "Failed", "wipe did not verify",
                 id="wipe-unverified"),
    pytest.param(FakeExecutor(reason="oom", exit_code=137), "Failed", "memory", id="oom"),
])
def test_runs_that_did_not_complete_seal_nothing(fake: FakeExecutor, reason: str, why: str) -> None:
    agent = _agent(lambda: fake)
    _run(agent, _prepare(agent))
    r = _wait(agent)
    assert (r["reason"], r["results"]) == (reason, []) and why in r["error"], r


def test_psi_function_intersects_sorted_and_refuses_non_utf8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("psi", Path(__file__).parents[2] / "capsules" / "psi" / "psi.py")
    assert spec is not None and spec.loader is not None
    psi = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(psi)
    (tmp_path / "b").write_text("  erin\nalice\n\nbob\nZoë\n")
    (tmp_path / "c").write_text("bob\r\nZoë\nerin \ncarol\n")
    monkeypatch.setattr(psi, "INPUTS", (str(tmp_path / "b"), str(tmp_path / "c")))
    monkeypatch.setattr(psi, "RESULT", str(tmp_path / "result"))
    assert psi.main() == 0
    assert (tmp_path / "result").read_text(encoding="utf-8") == "Zoë\nbob\nerin\n"
    (tmp_path / "c").write_bytes(b"\xff\xfe")
    assert psi.main() == 2
