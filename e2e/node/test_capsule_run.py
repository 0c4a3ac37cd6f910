"""The agent's capsule run path on the real Docker Engine: the PSI image, real envelopes, a real wipe.

prepare -> run -> result through the agent's channel handlers (CapsuleRunner as the Agent wires it), the
image built by `trustcap capsule build capsules/psi`, inputs sealed by B and C, the result opened by B's
and C's keys. The key release (trustcap.release) is another engineer's, landing in parallel: the inputs
here are sealed to the task's executor key directly, and opened with the same owner, capsule id and
binding digest checks; the rest of the path is the production one.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from trustcap.agent.executor import Executor
from trustcap.agent.run import CapsuleRunner, binding_digest
from trustcap.capsule.envelope import open_bytes, seal_bytes
from trustcap.capsule.keys import KeyPair
from trustcap.capsule.manifest import parse_manifest

pytestmark = pytest.mark.usefixtures("no_leftovers")
ROOT = Path(__file__).resolve().parents[2]
PSI = ROOT / "capsules" / "psi"
CAPSULE_ID = bytes(range(32))
TASK_ID = bytes(range(32, 64))
B_NAMES = "alice\nbob\ncarol\ndave\nerin\nfrank\n"
C_NAMES = "bob\nerin\ngrace\nheidi\ndave\n"


def _open_sealed_to_executor(envelope: bytes, wrapped_key: bytes, key: KeyPair, *, name: str, owner: bytes,
                             capsule_id: bytes, task_id: bytes, binding_digest: bytes) -> bytes:
    return open_bytes(envelope, key=key, owner=owner, capsule_id=capsule_id, manifest_digest=binding_digest)


@pytest.fixture(scope="module")
def psi_image(docker_engine: Any) -> str:
    """Built by the CLI, twice, from scratch the second time: the same id both times (reproducible)."""
    def build() -> str:
        proc = subprocess.run([sys.executable, "-P", "-m", "trustcap.cli", "capsule", "build", str(PSI)],
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()[-1]

    first = build()
    docker_engine.images.remove(first, force=True)
    second = build()
    assert first == second and docker_engine.images.get(second).id == second
    return second


def _party(seed: str) -> KeyPair:
    import hashlib

    return KeyPair(hashlib.sha256(seed.encode()).digest())


def _manifest(image: str, **over: Any) -> dict[str, Any]:
    b, c = _party("e2e party B"), _party("e2e party C")
    spec: dict[str, Any] = {
        "function": {"image": "trustcap/psi", "digest": image, "entrypoint": ["python3", "/capsule/psi.py"]},
        "inputs": [{"name": "names-b", "cid": "bafkreicgnswajfvowfhadauc2mw5qilofj5cdgz65hrua6kosr2pa63eli",
                    "owner": "0x" + b.public_key().hex()},
                   {"name": "names-c", "cid": "bafkreifefylghqaf4iz5cxeyt5qmrjnd7bv22snmzrbokiam33ofuuz4vi",
                    "owner": "0x" + c.public_key().hex()}],
        "recipients": [{"name": "node-b", "publicKey": "0x" + b.public_key().hex()},
                       {"name": "node-c", "publicKey": "0x" + c.public_key().hex()}],
        "resources": {"cpuMillis": 500, "memoryMiB": 128, "pids": 32, "scratchMiB": 4},
        "timeoutSeconds": 30, "committee": {"size": 3},
        "payment": {"payer": "0x4C9183C39E36BD8bfb8e86f073b3F5693E57d128", "amountWei": "1"},
    }
    spec.update(over)
    return spec


def _run(runner: CapsuleRunner, spec: dict[str, Any], inputs: dict[str, bytes] | None = None,
         tamper: str = "") -> dict[str, Any]:
    m = parse_manifest(spec)
    binding = binding_digest(m)
    key = runner.handlers()["prepare"]({"taskId": "0x" + TASK_ID.hex(), "manifestDigest": "0x" + binding.hex(),
                                        "imageDigest": m.function.digest})["executorKey"]
    executor_key = bytes.fromhex(key[2:])
    texts = inputs or {"names-b": B_NAMES.encode(), "names-c": C_NAMES.encode()}
    owners = {"names-b": _party("e2e party B"), "names-c": _party("e2e party C")}
    items = []
    for name, data in texts.items():
        owner = _party("e2e intruder") if name == tamper else owners[name]
        sealed = seal_bytes(data, recipients=[executor_key], owner=owner, capsule_id=CAPSULE_ID,
                            manifest_digest=binding)
        items.append({"name": name, "envelope": base64.b64encode(sealed).decode(),
                      "wrappedKey": base64.b64encode(b"stand-in: sealed to the executor key").decode()})
    started = runner.handlers()["run"]({"taskId": "0x" + TASK_ID.hex(), "capsuleId": "0x" + CAPSULE_ID.hex(),
                                        "manifest": spec, "inputs": items})
    assert started == {"started": True, "taskId": "0x" + TASK_ID.hex()}, started
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        res = runner.handlers()["result"]({"taskId": "0x" + TASK_ID.hex()})
        if res["state"] == "done":
            res["executorKey"] = executor_key
            return res
        time.sleep(0.2)
    raise AssertionError("the run did not end")


@pytest.fixture
def runner(docker_engine: Any, scratch_root: Path) -> CapsuleRunner:
    return CapsuleRunner(lambda: Executor(docker_engine, scratch_root=scratch_root),
                         open_input=_open_sealed_to_executor)


def test_psi_result_opens_for_b_and_c_as_the_intersection(runner: CapsuleRunner, psi_image: str,
                                                          scratch_root: Path) -> None:
    res = _run(runner, _manifest(psi_image))
    assert res["reason"] == "Completed" and res["exitCode"] == 0, res
    assert res["wipe"]["verified"] is True and res["wipe"]["state_restored"], res["wipe"]
    scratch = next(i for i in res["wipe"]["items"] if i["what"] == "scratch")
    assert scratch["covers"] == ["/scratch", "/inputs", "/output"] and scratch["verified"] is True
    logs = next(i for i in res["wipe"]["items"] if i["what"] == "capsule stdout/stderr log")
    assert logs["driver"] == "none" and logs["verified"] is True
    by_name = {r["recipient"]: r for r in res["results"]}
    assert set(by_name) == {"node-b", "node-c"}
    binding = binding_digest(parse_manifest(_manifest(psi_image)))
    for name, party in (("node-b", "e2e party B"), ("node-c", "e2e party C")):
        blob = base64.b64decode(by_name[name]["envelope"])
        text = open_bytes(blob, key=_party(party), owner=res["executorKey"], capsule_id=CAPSULE_ID,
                          manifest_digest=binding)
        assert text == b"bob\ndave\nerin\n"
    with pytest.raises(Exception, match="not a recipient"):  # B's envelope is B's only
        open_bytes(base64.b64decode(by_name["node-b"]["envelope"]), key=_party("e2e party C"),
                   owner=res["executorKey"], capsule_id=CAPSULE_ID, manifest_digest=binding)
    assert not any(scratch_root.iterdir())


def test_a_capsule_that_sleeps_ends_as_timeout_after_the_wipe(runner: CapsuleRunner, psi_image: str) -> None:
    spec = _manifest(psi_image, timeoutSeconds=2)
    spec["function"]["entrypoint"] = ["python3", "-c", "import time; time.sleep(60)"]
    t0 = time.monotonic()
    res = _run(runner, spec)
    assert res["reason"] == "Timeout" and res["results"] == [], res
    assert res["wipe"]["verified"] is True and res["wipe"]["state_restored"]
    assert time.monotonic() - t0 < 40


def test_an_input_that_cannot_be_opened_is_rejected_by_name_and_nothing_runs(
        runner: CapsuleRunner, psi_image: str, docker_engine: Any) -> None:
    before = {c.id for c in docker_engine.containers.list(all=True)}
    res = _run(runner, _manifest(psi_image), tamper="names-c")  # signed by someone not the declared owner
    assert res["reason"] == "InputRejected" and "names-c" in res["error"], res
    assert res["results"] == [] and res["exitCode"] is None and res["wipe"]["ran"] is False
    assert {c.id for c in docker_engine.containers.list(all=True)} == before


def test_the_image_runs_by_id_never_by_its_tag(runner: CapsuleRunner, psi_image: str, docker_engine: Any,
                                               tmp_path: Path) -> None:
    """Issue 12 item 20, attack: the tag the manifest names is moved to an image that leaks its inputs.
    The run uses the id: the result is the honest intersection (control: the evil image is there, tagged)."""
    (tmp_path / "Dockerfile").write_text(
        "FROM trustcap/base:bookworm\nRUN mkdir /capsule && printf 'import shutil\\n"
        "shutil.copy(\"/inputs/names-b\", \"/output/result\")\\n' > /capsule/psi.py\n")
    evil, _ = docker_engine.images.build(path=str(tmp_path), tag="trustcap/psi-evil:e2e", rm=True, forcerm=True)
    try:
        spec = _manifest(psi_image)
        spec["function"]["image"] = "trustcap/psi-evil"
        res = _run(runner, spec)
        assert evil.id != psi_image
        assert res["reason"] == "Completed", res
        blob = base64.b64decode(res["results"][0]["envelope"])
        assert open_bytes(blob, key=_party("e2e party B"), owner=res["executorKey"], capsule_id=CAPSULE_ID,
                          manifest_digest=binding_digest(parse_manifest(spec))) == b"bob\ndave\nerin\n"
    finally:
        docker_engine.images.remove(evil.id, force=True)


def test_stop_ends_a_run_in_progress_and_says_so(runner: CapsuleRunner, psi_image: str) -> None:
    import threading

    spec = _manifest(psi_image, timeoutSeconds=60)
    spec["function"]["entrypoint"] = ["python3", "-c", "import time; time.sleep(60)"]
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(_run(runner, spec)))
    t.start()
    deadline = time.monotonic() + 30
    while not runner.status()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # the capsule is up
    answer = runner.stop("gateway: post-round policy")
    t.join(timeout=60)
    assert answer == {"stopped": True, "running": False, "taskId": "0x" + TASK_ID.hex()}
    assert out["reason"] == "Stopped" and "post-round policy" in out["error"], out
    assert out["wipe"]["verified"] is True
    assert runner.stop("again") == {"stopped": False, "running": False}  # control: nothing left to stop
    assert os.geteuid() == 0


def test_a_result_that_links_to_a_host_file_is_not_read(runner: CapsuleRunner, psi_image: str,
                                                        tmp_path: Path) -> None:
    """Attack: the capsule owns /output; `result` made a symlink to a path that exists on the host (the
    agent reads the scratch as root, on the host). The agent opens it without following links and refuses
    anything but a regular file; the PSI test above is the control."""
    secret = tmp_path / "host-secret"
    secret.write_text("HOST-ONLY-SECRET\n")
    spec = _manifest(psi_image)
    spec["function"]["entrypoint"] = ["python3", "-c", f"import os; os.symlink({str(secret)!r}, '/output/result')"]
    res = _run(runner, spec)
    assert res["reason"] == "Failed" and "not a regular file" in res["error"], res
    assert res["results"] == [] and res["wipe"]["verified"] is True


def test_over_the_real_channel_quotes_are_answered_during_a_run(docker_engine: Any, psi_image: str,
                                                                scratch_root: Path, tmp_path: Path) -> None:
    """The gateway's own session (AttestationServer, loopback TCP, the real handshake) drives the agent:
    prepare, run, a during-round quote while the capsule sleeps, then result until done."""
    import threading

    from trustcap.agent.errors import ChannelError
    from trustcap.agent.identity import BootConfig, BootKey
    from trustcap.agent.service import Agent
    from trustcap.gateway.enrol import TokenBook
    from trustcap.gateway.server import AttestationServer
    from trustcap.trustroot import SoftwareTrustRoot

    boot = "0x" + "ab" * 32
    (tmp_path / "tr").mkdir()
    root = SoftwareTrustRoot.create(tmp_path / "tr", os.urandom(32))
    tokens = TokenBook([boot])
    server = AttestationServer(root, "hpc-1", tokens, rekey_after=4)
    try:
        host, port = server.address
        config = BootConfig(str(host), int(port), tokens.issue("hpc-1"), boot, root.address, "hpc-1")
        runner = CapsuleRunner(lambda: Executor(docker_engine, scratch_root=scratch_root),
                               open_input=_open_sealed_to_executor)
        agent = Agent(config, key=BootKey(), runner=runner, measurements=lambda: {"m": "0x" + "11" * 32})
        channel = agent.connect()
        ended: list[BaseException] = []

        def serve() -> None:
            try:
                channel.serve()
            except ChannelError as exc:  # the gateway closing at teardown ends the channel
                ended.append(exc)

        threading.Thread(target=serve, daemon=True).start()
        session = server.wait_for_agent(10)

        spec = _manifest(psi_image)
        spec["function"]["entrypoint"] = ["sh", "-c", "sleep 3; exec python3 /capsule/psi.py"]
        m = parse_manifest(spec)
        binding = binding_digest(m)
        task = "0x" + TASK_ID.hex()
        key = session.call("prepare", taskId=task, manifestDigest="0x" + binding.hex(),
                           imageDigest=m.function.digest)["executorKey"]
        items = []
        for name, text, owner in (("names-b", B_NAMES, "e2e party B"), ("names-c", C_NAMES, "e2e party C")):
            sealed = seal_bytes(text.encode(), recipients=[bytes.fromhex(key[2:])], owner=_party(owner),
                                capsule_id=CAPSULE_ID, manifest_digest=binding)
            items.append({"name": name, "envelope": base64.b64encode(sealed).decode(), "wrappedKey": "AA=="})
        assert session.call("run", taskId=task, capsuleId="0x" + CAPSULE_ID.hex(), manifest=spec,
                            inputs=items)["started"] is True
        time.sleep(1.0)
        t0 = time.monotonic()
        q = session.call("quote", nonce="0x" + "66" * 32,
                         capsule={"taskId": task, "round": "0x" + "33" * 32, "phase": "during"})
        assert time.monotonic() - t0 < 2.0, "the quote waited for the run"
        assert q["quote"]["capsule_state"]["phase"] == "during" and q["quote"]["capsule_state"]["executorKey"] == key
        assert session.call("result", taskId=task)["state"] == "running"
        deadline = time.monotonic() + 60
        while (res := session.call("result", taskId=task))["state"] != "done":
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert res["reason"] == "Completed", res
        blob = base64.b64decode(res["results"][1]["envelope"])
        assert open_bytes(blob, key=_party("e2e party C"), owner=bytes.fromhex(key[2:]), capsule_id=CAPSULE_ID,
                          manifest_digest=binding) == b"bob\ndave\nerin\n"
        assert session.call("finish", taskId=task)["finished"] is True
    finally:
        server.close()
        root.close()
