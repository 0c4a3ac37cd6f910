"""The executor gateway's run loop (trustcap.gateway.runner) against a real agent on a real channel.

Real: the gateway's trust root and AttestationServer, the encrypted channel, the agent's capsule ops
(trustcap.agent.run with the real key release open), envelopes, key wrapping, the file store and the
brokers' HTTP (a local server on 127.0.0.1). Faked: the Docker executor (our wrapper), the cluster (our
adapter; every CapsuleRun status write is checked against crds/capsulerun.yaml) and the broker's
decision (it grants or refuses as told; its real checks are trustcap.release's own tests).
"""

from __future__ import annotations

import base64
import builtins
import copy
import hashlib
import importlib.util
import io
import json
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from trustcap.agent.executor import RunResult
from trustcap.agent.identity import BootConfig, BootKey
from trustcap.agent.run import CapsuleRunner
from trustcap.agent.service import Agent
from trustcap.capsule.envelope import open_bytes, read_header, seal_bytes, unwrap_cek
from trustcap.capsule.ids import capsule_id, task_id
from trustcap.capsule.keys import KeyPair
from trustcap.capsule.manifest import parse_manifest
from trustcap.gateway.egress import LinkServices, check_endpoints
from trustcap.gateway.enrol import TokenBook
from trustcap.gateway.errors import EgressError
from trustcap.gateway.runner import NotMyRound, Runner, post_round_name
from trustcap.gateway.server import AttestationServer
from trustcap.release import wrap_key
from trustcap.store import open_store
from trustcap.trustroot import SoftwareTrustRoot

NS = "trustcap-system"
BOOT = "0x" + "ab" * 32
IMAGE = "sha256:" + "ab" * 32
B, C = (KeyPair(hashlib.sha256(s.encode()).digest()) for s in ("runner party B", "runner party C"))
TEXTS = {"names-b": b"alice\nbob\n", "names-c": b"bob\ncarol\n"}
WIPED = {"verified": True, "items": [{"what": "scratch", "verified": True}], "state_restored": True}
CAP_NS, CAP_NAME, UID = "team-a", "psi", "uid-1"
CID = capsule_id(CAP_NS, CAP_NAME)
TID = task_id(CID, UID)
TASK = "0x" + TID.hex()
NONCE = "0x" + "33" * 32

_spec = importlib.util.spec_from_file_location("crdcheck", Path(__file__).parents[1] / "platform" / "crdcheck.py")
assert _spec is not None and _spec.loader is not None
crdcheck = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(crdcheck)
RUN_SCHEMA = crdcheck.version_schema(crdcheck.load_crds()["CapsuleRun"])


# --- fakes of our own wrappers ---------------------------------------------------------------------------
class FakeExecutor:
    """The Docker executor: records what it ran; `hold` keeps the run alive until stopped."""

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.calls: list[dict[str, bytes]] = []

    def run(self, spec: Any, *, inputs: Any = None, output_limit: int = 0, should_stop: Any = None) -> RunResult:
        self.calls.append(dict(inputs))
        reason = "completed"
        while self.hold:
            if should_stop is not None and should_stop():
                reason = "killed-by-policy"
                break
            time.sleep(0.01)
        both = sorted(set(inputs["names-b"].split()) & set(inputs["names-c"].split()))
        return RunResult(reason=reason, exit_code=0, violations=[], stdout="", stderr="", wipe=dict(WIPED),
                         run_id="r", image=spec.image, seconds=0.1,
                         output=b"\n".join(both) + b"\n" if reason == "completed" else None)


def _merge(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """RFC 7386 JSON merge patch, as the API server applies a merge-patch+json body."""
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, Mapping) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        else:
            target[k] = copy.deepcopy(v)


class FakeKube:
    """Custom objects and Secrets in memory; CapsuleRun status writes must be valid against the CRD."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.secret_data: list[tuple[dict[str, str], dict[str, str]]] = []
        self.status_writes: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def put(self, plural: str, namespace: str, obj: dict[str, Any]) -> None:
        obj["metadata"].setdefault("namespace", namespace)
        self.objects[(plural, namespace, obj["metadata"]["name"])] = obj

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            obj = self.objects.get((plural, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def list(self, plural: str, namespace: str, label_selector: str = "") -> list[dict[str, Any]]:
        key, _, value = label_selector.partition("=")
        with self.lock:
            return [copy.deepcopy(o) for (p, ns, _), o in self.objects.items() if p == plural and ns == namespace
                    and (not key or (o["metadata"].get("labels") or {}).get(key) == value)]

    def patch_status(self, plural: str, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        with self.lock:
            obj = self.objects[(plural, namespace, name)]
            trial = copy.deepcopy(obj)
            _merge(trial, {"status": status})
            if plural == "capsuleruns":
                errors = crdcheck.validate(trial, RUN_SCHEMA)
                assert not errors, f"the API server would refuse this status write: {errors}"
            self.objects[(plural, namespace, name)] = trial
            self.status_writes.append(copy.deepcopy(dict(status)))

    def secrets(self, namespace: str, label_selector: str) -> builtins.list[dict[str, str]]:
        key, _, value = label_selector.partition("=")
        return [dict(d) for labels, d in self.secret_data if labels.get(key) == value]

    def run_status(self) -> dict[str, Any]:
        run = self.get("capsuleruns", NS, f"run-{TID.hex()[:16]}")
        assert run is not None
        return dict(run.get("status") or {})


class Broker:
    """An owner's broker over real HTTP on 127.0.0.1: wraps the input's real content key, or refuses."""

    def __init__(self, owner: KeyPair, *, refuse: str = "") -> None:
        self.owner, self.refuse = owner, refuse
        self.executor_key: bytes | None = None
        self.bodies: list[dict[str, Any]] = []
        broker = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                broker.bodies.append(body)
                code, answer = broker.answer(self.path, body)
                data = json.dumps(answer).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if path != "/v1/release":
            return 404, {"error": f"no such path {path}", "field": ""}
        if self.refuse:
            return 403, {"error": self.refuse, "field": "verdicts"}
        assert self.executor_key is not None
        _, cek = unwrap_cek(base64.b64decode(body["header"]), self.owner)
        cap = body["capsule"]
        cid = capsule_id(cap["namespace"], cap["name"])
        wrapped = wrap_key(cek, self.executor_key, capsule_id=cid, task_id=task_id(cid, cap["uid"]),
                           input_name=body["input"])
        return 200, {"wrappedKey": base64.b64encode(wrapped).decode(), "executorKey": "0x" + self.executor_key.hex()}

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


class Recording:
    """The AttestationServer, with the ops the runner sent recorded."""

    def __init__(self, server: AttestationServer) -> None:
        self.server = server
        self.ops: list[str] = []

    def command(self, op: str, **params: Any) -> dict[str, Any]:
        self.ops.append(op)
        answer: dict[str, Any] = self.server.command(op, **params)
        return answer


# --- the world ---------------------------------------------------------------------------------------------
@dataclass
class World:
    root: SoftwareTrustRoot
    server: Recording
    executor: FakeExecutor
    kube: FakeKube
    brokers: dict[str, Broker]
    store_url: str
    runner: Runner
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def me(self) -> str:
        return self.root.address.lower()

    def prepare(self) -> bytes:
        key = self.runner.ensure_prepared({"taskId": TASK, "round": NONCE, "phase": "pre"})
        for b in self.brokers.values():
            b.executor_key = bytes.fromhex(key[2:])
        return bytes.fromhex(key[2:])

    def order_run(self, **spec: Any) -> None:
        self.kube.put("capsuleruns", NS, {
            "metadata": {"name": f"run-{TID.hex()[:16]}", "labels": {"trustcap.io/task": TID.hex()[:16]}},
            "spec": {"capsuleRef": {"namespace": CAP_NS, "name": CAP_NAME, "uid": UID}, "taskId": TASK,
                     "executor": self.me, "node": "hpc-1", "preRound": f"r-{TID.hex()[:16]}-pre",
                     "store": self.store_url, "stop": "", **spec}})

    def wait(self, phases: tuple[str, ...], timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.runner.step()
            st = self.kube.run_status()
            if st.get("phase") in phases:
                return st
            time.sleep(0.02)
        raise AssertionError(f"the run did not reach {phases}: {self.kube.run_status()}")


def _attestation(phase: str, executor: str, nonce: str = NONCE) -> dict[str, Any]:
    return {"metadata": {"name": f"r-{TID.hex()[:16]}-{phase}", "creationTimestamp": "2026-01-01T00:00:00Z",
                         "labels": {"trustcap.io/task": TID.hex()[:16], "trustcap.io/round": phase}},
            "spec": {"capsuleRef": {"namespace": CAP_NS, "name": CAP_NAME, "uid": UID}, "taskId": TASK,
                     "node": "hpc-1", "executor": executor, "phase": phase, "nonce": nonce, "epoch": 101,
                     "policyDigest": "0x" + "00" * 32, "timeoutSeconds": 60,
                     "committee": {"members": [{"address": "0x" + f"{i:02x}" * 20} for i in (1, 2, 3)],
                                   "quorum": 2}},
            "status": {"verdicts": [{"verifier": "0x" + f"{i:02x}" * 20, "passed": True,
                                     "verdict": {"signature": f"sig-{i}"}, "quote": base64.b64encode(b"q").decode()}
                                    for i in (1, 2, 3)]}}


def _world(tmp_path: Path, root: SoftwareTrustRoot, server: AttestationServer, executor: FakeExecutor,
           refuse: dict[str, str], egress: list[str] | None = None, link: Any = None) -> World:
    store_url = f"file://{tmp_path / 'store'}"
    store = open_store(store_url)
    brokers = {"names-b": Broker(B, refuse=refuse.get("names-b", "")),
               "names-c": Broker(C, refuse=refuse.get("names-c", ""))}
    spec: dict[str, Any] = {
        "function": {"image": "trustcap/psi", "digest": IMAGE, "entrypoint": ["python3", "/capsule/psi.py"]},
        "inputs": [{"name": n, "cid": "bafkreicgnswajfvowfhadauc2mw5qilofj5cdgz65hrua6kosr2pa63eli",
                    "owner": "0x" + k.public_key().hex(), "broker": brokers[n].url}
                   for n, k in (("names-b", B), ("names-c", C))],
        "recipients": [{"name": "node-b", "publicKey": "0x" + B.public_key().hex()},
                       {"name": "node-c", "publicKey": "0x" + C.public_key().hex()}],
        "resources": {"cpuMillis": 500, "memoryMiB": 128, "pids": 32, "scratchMiB": 16},
        "timeoutSeconds": 60, "committee": {"size": 3},
        "payment": {"payer": "0x4C9183C39E36BD8bfb8e86f073b3F5693E57d128", "amountWei": "1"},
    }
    if egress is not None:
        spec["egress"] = list(egress)
    binding = parse_manifest(spec).binding_digest()
    for inp, owner in zip(spec["inputs"], (B, C), strict=True):
        blob = seal_bytes(TEXTS[inp["name"]], recipients=[owner.public_key()], owner=owner, capsule_id=CID,
                          manifest_digest=binding)
        inp["cid"] = store.put(blob)
    kube = FakeKube()
    kube.put("capsules", CAP_NS, {"metadata": {"name": CAP_NAME, "uid": UID}, "spec": spec})
    me = root.address.lower()
    kube.put("attestations", NS, _attestation("pre", me))
    for i in (1, 2, 3, 4):
        kube.secret_data.append(({"trustcap.io/reveal": TID.hex()[:16]},
                                 {"node": "0x" + f"{i:02x}" * 20, "pi": "0x" + "aa" * 81, "salt": "0x" + "bb" * 32}))
    rec = Recording(server)
    runner = Runner(rec, root, kube, namespace=NS, poll_s=0.02, link=link)
    if link is not None:
        link.ops = rec.ops  # one log: the guard's allow/clear among the agent ops, in order
    return World(root, rec, executor, kube, brokers, store_url, runner, spec)


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Any]:
    made: list[tuple[AttestationServer, Agent, World]] = []
    served: list[BaseException] = []

    def build(*, hold: bool = False, refuse: dict[str, str] | None = None, egress: list[str] | None = None,
              link: Any = None) -> World:
        (tmp_path / "tr").mkdir()
        root = SoftwareTrustRoot.create(tmp_path / "tr", hashlib.sha256(b"gateway kek").digest())
        tokens = TokenBook([BOOT])
        server = AttestationServer(root, "hpc-1", tokens)  # rotates every 16 requests: within the agent's limit
        host, port = server.address
        config = BootConfig(str(host), int(port), tokens.issue("hpc-1"), BOOT, root.address, "hpc-1")
        executor = FakeExecutor(hold=hold)
        agent = Agent(config, key=BootKey(), measurements=lambda: {"m": "1"},
                      runner=CapsuleRunner(lambda: executor, stop_wait_s=10,
                                           attacher=object() if egress else None),  # the HPC's half: faked
                      scratch_root=Path("/nonexistent"))
        channel = agent.connect()

        def serve() -> None:
            try:
                channel.serve()
            except Exception as exc:  # the gateway closed the channel at teardown
                served.append(exc)

        threading.Thread(target=serve, daemon=True).start()
        server.wait_for_agent(10)
        w = _world(tmp_path, root, server, executor, refuse or {}, egress, link)
        made.append((server, agent, w))
        return w

    yield build
    for server, _agent, w in made:
        w.runner.stop(timeout_s=5)
        for b in w.brokers.values():
            b.close()
        server.close()
        w.root.close()


# --- tests ---------------------------------------------------------------------------------------------
def test_granted_inputs_run_and_the_results_land_in_the_store_and_status(make: Any) -> None:
    w = make()
    key = w.prepare()
    w.order_run()
    st = w.wait(("Succeeded", "Failed"))
    assert st["phase"] == "Succeeded", st
    assert st["reason"] == "Completed" and st["exitCode"] == 0 and st["error"] == ""
    assert st["resultSigner"] == "0x" + key.hex() and st["wipe"] == WIPED
    assert w.kube.status_writes[0]["phase"] == "Running"
    assert w.kube.status_writes[0]["inputsReleased"] == ["names-b", "names-c"]
    assert w.server.ops.count("run") == 1 and w.executor.calls == [TEXTS]
    # each broker got the section 6 body: the pre round, its verdicts with quotes, the task's reveals
    body = w.brokers["names-c"].bodies[0]
    assert body["capsule"] == {"namespace": CAP_NS, "name": CAP_NAME, "uid": UID}
    assert body["input"] == "names-c" and body["manifest"] == w.spec
    assert body["round"]["nonce"] == NONCE and body["round"]["executor"] == w.me
    assert len(body["verdicts"]) == 3 and set(body["verdicts"][0]) == {"verdict", "quote"}
    assert len(body["reveals"]) == 4 and set(body["reveals"][0]) == {"node", "pi", "salt"}
    store = open_store(w.store_url)
    _, header = read_header(io.BytesIO(store.get(w.spec["inputs"][1]["cid"])))
    assert base64.b64decode(body["header"]) == header
    # the results: one per recipient, in the store, opening for that recipient, signed by the executor key
    assert [r["recipient"] for r in st["results"]] == ["node-b", "node-c"]
    for r, k in zip(st["results"], (B, C), strict=True):
        plain = open_bytes(store.get(r["cid"]), key=k, owner=key, capsule_id=CID,
                           manifest_digest=parse_manifest(w.spec).binding_digest())
        assert plain == b"bob\n"


@pytest.mark.parametrize(("refuse", "reason", "names"), [
    pytest.param({"names-c": "2 valid passed pre verdicts of the committee, the quorum is 3"}, "ReleaseRefused",
                 "names-c", id="broker-refuses"),
    pytest.param({"names-b": "this broker's key is not a recipient of the envelope"}, "ReleaseRefused", "names-b",
                 id="first-broker-refuses"),
])
def test_a_refused_release_fails_the_run_with_nothing_started(make: Any, refuse: dict[str, str], reason: str,
                                                              names: str) -> None:
    w = make(refuse=refuse)
    w.prepare()
    w.order_run()
    st = w.wait(("Succeeded", "Failed"))
    assert st["phase"] == "Failed" and st["reason"] == reason
    assert names in st["error"] and next(iter(refuse.values())) in st["error"]
    assert "run" not in w.server.ops and w.executor.calls == []
    assert "inputsReleased" not in st and st["wipe"]["ran"] is False


def test_an_input_missing_from_the_store_is_rejected_with_nothing_started(make: Any) -> None:
    w = make()
    w.prepare()
    caps = w.kube.objects[("capsules", CAP_NS, CAP_NAME)]
    caps["spec"]["inputs"][0]["cid"] = "bafkreifefylghqaf4iz5cxeyt5qmrjnd7bv22snmzrbokiam33ofuuz4vi"
    w.order_run()
    st = w.wait(("Succeeded", "Failed"))
    assert st["phase"] == "Failed" and st["reason"] == "InputRejected" and "names-b" in st["error"]
    assert "run" not in w.server.ops and w.brokers["names-b"].bodies == []


def test_a_stop_order_is_relayed_to_the_agent(make: Any) -> None:
    w = make(hold=True)
    w.prepare()
    w.order_run()
    w.wait(("Running",))
    assert "stop" not in w.server.ops
    w.kube.objects[("capsuleruns", NS, f"run-{TID.hex()[:16]}")]["spec"]["stop"] = "Timeout"
    st = w.wait(("Succeeded", "Failed"))
    assert w.server.ops.count("stop") == 1
    assert st["phase"] == "Failed" and st["reason"] == "Stopped" and st["results"] == []
    assert "stopped: Timeout" in st["error"]


def test_a_stopped_run_reports_the_agents_wipe(make: Any) -> None:
    w = make(hold=True)
    w.prepare()
    w.order_run(stop="Deleted")
    st = w.wait(("Succeeded", "Failed"))
    # the agent's own wipe report reaches the status (not the runner's "verified: false" stand-in)
    assert st["reason"] == "Stopped" and st["wipe"]["verified"] is True and "why" not in st["wipe"], st["wipe"]


def test_ensure_prepared_prepares_once_and_only_for_my_rounds(make: Any) -> None:
    w = make()
    key = w.runner.ensure_prepared({"taskId": TASK, "round": NONCE, "phase": "pre"})
    assert w.runner.ensure_prepared({"taskId": TASK, "round": NONCE, "phase": "pre"}) == key
    assert w.server.ops == ["prepare"]
    with pytest.raises(NotMyRound, match="no Attestation"):
        w.runner.ensure_prepared({"taskId": TASK, "round": "0x" + "44" * 32, "phase": "pre"})
    with pytest.raises(NotMyRound, match="not during"):
        w.runner.ensure_prepared({"taskId": TASK, "round": NONCE, "phase": "during"})
    other = "0x" + "99" * 20
    w.kube.put("attestations", NS, _attestation("during", other, nonce="0x" + "55" * 32) |
               {"metadata": {"name": f"r-{TID.hex()[:16]}-during-1", "labels": {"trustcap.io/task": TID.hex()[:16]}}})
    with pytest.raises(NotMyRound, match="names executor 0x9999"):
        w.runner.ensure_prepared({"taskId": TASK, "round": "0x" + "55" * 32, "phase": "during"})
    assert w.server.ops == ["prepare"]


def test_finish_once_the_post_round_is_decided(make: Any) -> None:
    w = make()
    w.prepare()
    w.order_run()
    w.wait(("Succeeded",))
    w.runner.step()
    assert "finish" not in w.server.ops  # no post round yet: the committee still needs the key's quotes
    post = _attestation("post", w.me, nonce="0x" + "66" * 32)
    w.kube.put("attestations", NS, post)
    w.runner.step()
    assert "finish" not in w.server.ops  # open, undecided
    w.kube.objects[("attestations", NS, post_round_name(TID))]["status"]["result"] = "Passed"
    w.runner.step()
    w.runner.step()
    assert w.server.ops.count("finish") == 1
    with pytest.raises(Exception, match="not prepared"):
        w.server.command("result", taskId=TASK)  # the agent dropped the task


def test_the_loop_runs_in_its_own_thread(make: Any) -> None:
    w = make()
    w.prepare()
    w.order_run()
    w.runner.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and w.kube.run_status().get("phase") != "Succeeded":
        time.sleep(0.02)
    w.runner.stop(timeout_s=5)
    assert w.kube.run_status()["phase"] == "Succeeded"
    assert not w.runner.running and w.runner._thread is None


# --- the Pi's HPC link guard opens for exactly a run's declared endpoints (issue 12 item 18, 0118) --------
class Link:
    """Stands in for gateway/egress.py's EgressGuard (its nftables half is e2e/node/test_link_guard.py):
    validates endpoints as the guard does (`check_endpoints`), and records each allow and clear into the
    runner's op log. `fail_clears` clears fail before one holds."""

    def __init__(self, refuse: str = "", gateway_addr: str = "10.0.0.1", fail_clears: int = 0,
                 deny: tuple[str, ...] = ()) -> None:
        self.ops: list[str] = []
        self.allowed: list[list[tuple[str, int]]] = []
        self.refuse = refuse
        self.services = LinkServices(gateway_addr=gateway_addr, agent_port=7000, deny=deny)
        self.fail_clears = fail_clears
        self.ttls: list[int | None] = []

    def allow(self, endpoints: Any, ttl_s: int | None = None) -> None:
        if self.refuse:
            raise EgressError(self.refuse)
        self.allowed.append(check_endpoints(endpoints, self.services.gateway_addr))
        self.ttls.append(ttl_s)
        self.ops.append("link.allow")

    def clear(self) -> None:
        if self.fail_clears:
            self.fail_clears -= 1
            self.ops.append("link.clear-failed")
            raise EgressError("nft: netlink: Device or resource busy")
        self.ops.append("link.clear")


def _until(cond: Any, w: World | None = None, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        if w is not None:
            w.runner.step()
        time.sleep(0.02)


def test_the_link_opens_to_the_declared_endpoints_only_while_the_run_lives(make: Any) -> None:
    link = Link()
    w = make(egress=["10.9.0.7:443", "198.18.3.4:8443"], link=link)
    w.prepare()
    w.order_run()
    assert w.wait(("Succeeded", "Failed"))["phase"] == "Succeeded"
    _until(lambda: "link.clear" in w.server.ops)
    assert link.allowed == [[("10.9.0.7", 443), ("198.18.3.4", 8443)]]
    assert link.ttls == [60 + 300]  # the kernel closes them at timeoutSeconds + the result margin regardless
    ops = [o for o in w.server.ops if o in ("link.allow", "run", "result", "link.clear")]
    assert ops[0] == "link.allow" and ops[1] == "run" and ops[-1] == "link.clear", ops  # open before, shut after
    assert ops.count("link.allow") == 1 and ops.count("link.clear") == 1


def test_a_declared_name_fails_the_run_before_anything_is_opened_or_sent(make: Any) -> None:
    link = Link()
    w = make(egress=["api.example.org:443"], link=link)
    w.prepare()
    w.order_run()
    st = w.wait(("Succeeded", "Failed"))
    assert st["phase"] == "Failed" and "IP addresses only" in st["error"] and "api.example.org" in st["error"]
    assert link.allowed == [] and "run" not in w.server.ops and st["wipe"]["ran"] is False


def test_a_guard_that_refuses_the_endpoints_fails_the_run_with_nothing_started(make: Any) -> None:
    w = make(egress=["10.9.0.7:443"], link=Link(refuse="nft: table trustcap_link_eth1 is gone"))
    w.prepare()
    w.order_run()
    st = w.wait(("Succeeded", "Failed"))
    assert st["phase"] == "Failed" and "link guard did not take" in st["error"] and "is gone" in st["error"]
    assert "run" not in w.server.ops


def test_without_a_guarded_link_the_run_goes_on_unchanged(make: Any) -> None:  # the runner with no --hpc-link
    w = make(egress=["10.9.0.7:443"])
    w.prepare()
    w.order_run()
    assert w.wait(("Succeeded", "Failed"))["phase"] == "Succeeded"
    assert not [o for o in w.server.ops if o.startswith("link.")]


@pytest.mark.parametrize(("egress", "why"), [
    pytest.param("[fd00::7]:8443", "only IPv4", id="ipv6-the-link-drops"),
    pytest.param("127.0.0.1:6443", "loopback", id="loopback"),
    pytest.param("169.254.169.254:80", "link-local", id="link-local"),
    pytest.param("224.0.0.251:5353", "multicast", id="multicast"),
    pytest.param("255.255.255.255:67", "broadcast", id="broadcast"),
    pytest.param("10.0.0.1:7000", "gateway's own address", id="the-pi-itself"),
])
def test_an_endpoint_the_guard_cannot_open_fails_the_run_before_any_key_is_asked(make: Any, egress: str,
                                                                                  why: str) -> None:
    link = Link(gateway_addr="10.0.0.1")
    w = make(egress=["10.9.0.7:443", egress], link=link)
    w.prepare()
    w.order_run()
    st = w.wait(("Succeeded", "Failed"))
    host = egress.rsplit(":", 1)[0].strip("[]")
    assert st["phase"] == "Failed" and why in st["error"] and host in st["error"], st["error"]
    assert link.allowed == [] and "run" not in w.server.ops and st["wipe"]["ran"] is False
    assert all(b.bodies == [] for b in w.brokers.values()), "a broker was asked for a key"


def test_an_endpoint_in_the_clusters_networks_fails_the_run_before_any_key_is_asked(make: Any) -> None:
    """Attack: the manifest names a cluster machine (a pod here), which no address check can tell from the
    internet; the gateway's deny list refuses it before a broker is asked (the positive control is the
    next test, the same run with a routable endpoint)."""
    link = Link(gateway_addr="10.0.0.1", deny=("10.42.0.0/16",))
    w = make(egress=["10.9.0.7:443", "10.42.3.4:10250"], link=link)
    w.prepare()
    w.order_run()
    st = w.wait(("Succeeded", "Failed"))
    assert st["phase"] == "Failed" and "10.42.3.4:10250 is in 10.42.0.0/16" in st["error"], st["error"]
    assert link.allowed == [] and "run" not in w.server.ops
    assert all(b.bodies == [] for b in w.brokers.values()), "a broker was asked for a key"


def test_positive_control_the_same_run_with_a_routable_endpoint_asks_and_runs(make: Any) -> None:
    w = make(egress=["10.9.0.7:443", "198.18.0.9:7000"], link=Link(gateway_addr="10.0.0.1"))
    w.prepare()
    w.order_run()
    assert w.wait(("Succeeded", "Failed"))["phase"] == "Succeeded"
    assert all(len(b.bodies) == 1 for b in w.brokers.values()) and "run" in w.server.ops


def test_a_second_run_while_one_holds_the_link_is_refused_not_merged(make: Any) -> None:
    link = Link()
    w = make(egress=["10.9.0.7:443"], link=link)
    w.runner._declare("0x" + "77" * 32, parse_manifest(w.spec))  # another task's run holds the link
    w.prepare()
    w.order_run()
    st = w.wait(("Succeeded", "Failed"))
    assert st["phase"] == "Failed" and "held by the run of task 0x7777" in st["error"], st["error"]
    assert link.allowed == [[("10.9.0.7", 443)]] and "run" not in w.server.ops  # only the holder's allow


def test_a_failed_clear_is_retried_until_the_link_is_shut(make: Any) -> None:
    link = Link(fail_clears=2)
    w = make(egress=["10.9.0.7:443"], link=link)
    w.prepare()
    w.order_run()
    assert w.wait(("Succeeded", "Failed"))["phase"] == "Succeeded"
    _until(lambda: "link.clear" in w.server.ops, w)
    assert w.server.ops.count("link.clear-failed") == 2 and w.server.ops.count("link.clear") == 1
    for _ in range(3):
        w.runner.step()
    assert w.server.ops.count("link.clear") == 1, "a shut link is not cleared again and again"


def test_a_resumed_run_the_guard_refuses_is_stopped_and_its_wipe_recorded(make: Any) -> None:
    w = make(hold=True, egress=["10.9.0.7:443"], link=Link())
    w.prepare()
    w.order_run()
    w.wait(("Running",))
    w.runner.stop(timeout_s=1)  # the gateway restarts; its new guard will not take the endpoints
    refusing = Link(refuse="nft: table trustcap_link_eth1 is gone")
    refusing.ops = w.server.ops
    restarted = Runner(w.server, w.root, w.kube, namespace=NS, poll_s=0.02, link=refusing)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and w.kube.run_status().get("phase") == "Running":
            restarted.step()
            time.sleep(0.02)
        st = w.kube.run_status()
        assert st["phase"] == "Failed" and "on resuming the run" in st["error"], st
        assert "is gone" in st["error"] and st["wipe"]["verified"] is True  # the agent's own wipe report
        assert w.server.ops.count("stop") >= 1
    finally:
        restarted.stop(timeout_s=5)


def test_a_resumed_run_while_another_task_holds_the_link_stops_nothing(make: Any) -> None:
    """A stop names no task: it ends whatever the agent runs. A resumed run that finds the link held by
    another task must not send one (the test's agent is, artificially, still running this task; either
    way a stop sent here would end a run the resumed one does not own). Control: its own stop order is
    still relayed."""
    link = Link()
    w = make(hold=True, egress=["10.9.0.7:443"], link=link)
    w.prepare()
    w.order_run()
    w.wait(("Running",))
    w.runner.stop(timeout_s=1)
    restarted = Runner(w.server, w.root, w.kube, namespace=NS, poll_s=0.02, link=link)
    try:
        assert restarted._try_claim("0x" + "77" * 32)  # another task's run holds the node
        stops = w.server.ops.count("stop")
        for _ in range(25):
            restarted.step()
            time.sleep(0.02)
        assert w.kube.run_status()["phase"] == "Running" and w.server.ops.count("stop") == stops
        w.kube.objects[("capsuleruns", NS, f"run-{TID.hex()[:16]}")]["spec"]["stop"] = "Deleted"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and w.kube.run_status().get("phase") == "Running":
            restarted.step()
            time.sleep(0.02)
        assert w.kube.run_status()["reason"] == "Stopped" and w.server.ops.count("stop") == stops + 1
    finally:
        restarted.stop(timeout_s=5)
