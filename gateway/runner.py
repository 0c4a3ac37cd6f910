"""The executor gateway's part of a capsule run: prepare the agent, fetch the keys, run, store, finish.

Decision 0090; docs/lifecycle-interfaces.md sections 5 (agent ops), 6 (key release), 7 (store) and 8
(CapsuleRun). The gateway relays: it never opens an input (each broker wraps the content key to the
executor key the quorum attested, which only the agent holds) and never reads a result (each is sealed
to its recipient and signed by that key).

    relay (committee challenge)   Runner                               agent (channel)     brokers, store
      | ensure_prepared(capsule) ->| the round names me? prepare once -->| executor key
      |                            | CapsuleRun (executor == me, no phase yet), in its own thread:
      |                            |   store.get(input cid) ----------------------------------------> store
      |                            |   POST /v1/release {capsule, manifest, input, header, round,
      |                            |     verdicts, reveals} for every input ------------------------> broker
      |                            |   (one refusal: Failed InputRejected/ReleaseRefused, nothing sent)
      |                            |   the Pi's HPC link guard opens the manifest's egress (allow; 0118)
      |                            |   run {taskId, capsuleId, manifest, inputs} ---->| started
      |                            |   status Running {inputsReleased, startedAt}
      |                            |   result {taskId} every poll_s; spec.stop set -> stop {reason}
      |                            |   done: each result envelope -> store.put ---------------------> store
      |                            |   status Succeeded|Failed {reason, exitCode, results, resultSigner, wipe}
      |                            |   the link guard closes again (clear), whatever the run's end
      |                            | post round decided (or the CapsuleRun gone) -> finish {taskId}

Each run has its own thread, so a minute-long run holds neither the relay (which must keep answering the
committee's quotes during the run) nor another step. Every wait is bounded. A restarted gateway resumes a
Running CapsuleRun by polling its result again: the agent keeps the run, its key and its result until
`finish`, and `prepare` of a prepared task answers the same key.
"""

from __future__ import annotations

import base64
import builtins
import io
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, NamedTuple, Protocol

from trustcap.api import ATTESTATIONS, CAPSULERUNS, CAPSULES
from trustcap.capsule.envelope import read_header
from trustcap.capsule.ids import capsule_id, task_id
from trustcap.capsule.manifest import Manifest, parse_manifest
from trustcap.errors import TrustcapError
from trustcap.forms import hex_bytes, rfc3339
from trustcap.gateway._loop import PollingLoop
from trustcap.gateway.agent_metrics import AgentMetricsPoller
from trustcap.gateway.errors import GatewayError
from trustcap.gateway.participant import REVEAL_LABEL, LifecycleError

__all__ = ["EgressLink", "NotMyRound", "RunFailed", "Runner", "RunnerKube", "declared_endpoints", "open_store"]

log = logging.getLogger("trustcap.gateway")

AGENT_LOST_S: Final = 60.0       # the agent may be unreachable this long during a run before the run fails
RESULT_MARGIN_S: Final = 300.0   # beyond timeoutSeconds, how long to wait for the agent's result
BUSY_WAIT_S: Final = 300.0       # how long a run waits for its node to be free (a broker's pre-verdict age limit)
RELEASE_TIMEOUT_S: Final = 30.0  # per broker request
MAX_ERROR: Final = 4096          # crds/capsulerun.yaml status.error maxLength
NOTHING_RAN: Final = {"verified": True, "ran": False, "items": [],
                      "how": "nothing was sent to the agent: no input was released to it and no container was made"}


class NotMyRound(GatewayError):
    """A capsule challenge names a round that does not exist, or whose executor is another gateway."""


class RunFailed(GatewayError):
    """A run cannot start; `reason` is the CapsuleRun status reason (InputRejected, ReleaseRefused, Failed)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class LinkHeld(RunFailed):
    """Another task's run holds the node and its HPC link: this node runs one capsule at a time."""

    def __init__(self, holder: str) -> None:
        super().__init__("Failed", f"the node and its HPC link are held by the run of task {holder}: this node "
                                   "runs one capsule at a time")


class RunnerKube(Protocol):
    """What the runner reads and writes in the cluster (`participant.KubeCapsules`; a fake in unit tests)."""

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None: ...

    def list(self, plural: str, namespace: str, label_selector: str = "") -> list[dict[str, Any]]: ...

    def patch_status(self, plural: str, namespace: str, name: str, status: Mapping[str, Any]) -> None: ...

    def secrets(self, namespace: str, label_selector: str) -> builtins.list[dict[str, str]]: ...


class EgressLink(Protocol):
    """The Pi's guard of its HPC link (gateway/egress.py `EgressGuard` with LinkServices, decision 0118)."""

    @property
    def services(self) -> Any: ...  # LinkServices: its gateway_addr and deny networks are never declared
    def allow(self, endpoints: Sequence[Any], ttl_s: int | None = None) -> None: ...
    def clear(self) -> None: ...


class _Endpoint(NamedTuple):
    host: str
    port: int


def declared_endpoints(manifest: Manifest, gateway_addr: str | None = None, *,
                       deny: Sequence[str] = ()) -> list[_Endpoint]:
    """The manifest's egress as (host, port), each one the Pi's link guard can open; RunFailed for a name
    (the guard matches addresses, and a DNS lookup would itself be egress; the agent refuses names for the
    same reason) and for what the guard refuses (gateway/egress.py `check_endpoints`: IPv6, loopback,
    link-local, multicast, broadcast, the Pi's own address on the link, the cluster's `deny` networks)."""
    from trustcap.gateway.egress import check_endpoints, deny_networks

    out = []
    for text in manifest.egress:
        host, _, port = text.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise RunFailed("Failed", f"manifest egress {text!r}: the HPC link guard opens IP addresses only, "
                                      "not names (resolving one would itself be egress)") from None
        out.append(_Endpoint(host, int(port)))
    try:
        check_endpoints(out, gateway_addr, deny=deny_networks(deny))
    except TrustcapError as exc:
        raise RunFailed("Failed", f"manifest egress: {exc}") from exc
    return out


class _Server(Protocol):
    def command(self, op: str, **params: Any) -> dict[str, Any]: ...


class _Root(Protocol):
    @property
    def address(self) -> str: ...


class _Store(Protocol):
    def put(self, data: bytes) -> str: ...

    def get(self, cid: str) -> bytes: ...


def open_store(url: str) -> _Store:
    """`trustcap.store.open_store` (lifecycle interfaces section 7), imported when a run needs it."""
    from trustcap.store import open_store as real  # type: ignore[import-not-found,unused-ignore]

    store: _Store = real(url)
    return store


def post_round_name(task: bytes) -> str:
    """The post round's Attestation name, as the operator names it (operator/rounds.py `round_name`)."""
    return f"r-{task.hex()[:16]}-post"


def _task_hex(value: Any, what: str) -> str:
    if hex_bytes(value, 32) is None:
        raise NotMyRound(f"{what} must be a task id (0x + 64 hex), got {value!r}")
    return str(value).lower()


_REFUSED_RESULT: Final = "agent refused 'result': "


def _refused_result(exc: Exception) -> dict[str, Any] | None:
    """A `result` the session turned into an error: the agent's done answer carried a non-empty `error`
    (AgentSession.call raises on any `error` field, and a Stopped, Timeout or InputRejected result has
    one), or the agent no longer knows the task. Either way the run is over, and only the message
    survived: the run is reported Failed with that message and a wipe that is not proven."""
    text = str(exc)
    if not text.startswith(_REFUSED_RESULT):
        return None
    error = text[len(_REFUSED_RESULT):]
    reason = ("Stopped" if error.startswith("stopped:") else "Timeout" if "past timeoutSeconds" in error
              else "InputRejected" if error.startswith("input ") else "Failed")
    return {"state": "done", "reason": reason, "error": error, "results": [],
            "wipe": {"verified": False, "error": "the agent's wipe report did not reach the gateway: the channel "
                                                 "session refuses an answer that carries an error"}}


class Runner(PollingLoop):
    """Runs on this gateway's agent the capsules whose CapsuleRun names this gateway as executor."""

    loop_name = "trustcap-gateway-runner"
    step_label = "runner pass"

    def __init__(self, server: _Server, root: _Root, kube: RunnerKube, *, namespace: str,
                 store_of: Callable[[str], _Store] = open_store, poll_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 agent_metrics_s: float = 5.0, link: EgressLink | None = None,
                 busy_wait_s: float = BUSY_WAIT_S) -> None:
        self.server, self.kube = server, kube
        self.link = link  # the Pi's HPC link guard (--hpc-link); None: the link is not guarded here
        self._holder: str | None = None    # the task whose run holds this node (the agent runs one at a time)
        self._declared: str | None = None  # the task whose endpoints the link guard holds open
        self.busy_wait_s = busy_wait_s
        self._link_dirty = False  # a clear() failed: the link may still hold a finished run's endpoints
        self._link_io = threading.Lock()  # held around each allow and clear of the link guard
        self.namespace = namespace
        self.store_of = store_of
        self.clock, self.wall = clock, wall
        self.address = str(root.address).lower()
        self._lock = threading.Lock()
        self._keys: dict[str, str] = {}             # task id -> executor key (the agent's prepare answer)
        self._threads: dict[str, threading.Thread] = {}
        self._runs_seen: set[str] = set()           # tasks whose CapsuleRun this gateway has seen
        self._finished: set[str] = set()
        self._init_loop(poll_s)
        # The agent's own metrics (its runs, wipes, violations) reach Prometheus only through its gateway
        # (trustcap.gateway.agent_metrics): the runner starts their poller because it is the part that
        # drives the agent's runs, and a gateway without the capsule lifecycle runs none to report.
        self.agent_metrics = AgentMetricsPoller(server, str(getattr(server, "node_id", "") or "unknown"),
                                                interval_s=agent_metrics_s)

    def start(self) -> None:
        super().start()
        self.agent_metrics.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop looking for work and end the run threads' polling (the agent's runs go on; see resume)."""
        self.agent_metrics.stop(timeout_s)
        super().stop(timeout_s)
        with self._lock:
            threads = list(self._threads.values())
        for t in threads:
            t.join(timeout_s)

    def step(self) -> int:
        """One pass: start a thread for each new (or orphaned Running) run of mine, finish ended tasks.
        Returns how many run threads this pass started."""
        started = 0
        runs = {}
        self._retry_clear()
        for run in self.kube.list(CAPSULERUNS, self.namespace):
            spec = run.get("spec") or {}
            if str(spec.get("executor", "")).lower() != self.address:
                continue
            try:
                tid = _task_hex(spec.get("taskId"), "CapsuleRun spec.taskId")
            except NotMyRound as exc:
                log.warning("CapsuleRun %s: %s", (run.get("metadata") or {}).get("name"), exc)
                continue
            runs[tid] = run
            self._runs_seen.add(tid)
            phase = (run.get("status") or {}).get("phase")
            if phase in (None, "", "Running") and self._spawn(tid, run, resume=phase == "Running"):
                started += 1
        self._finish(runs)
        return started

    def _spawn(self, tid: str, run: Mapping[str, Any], *, resume: bool) -> bool:
        with self._lock:
            t = self._threads.get(tid)
            if t is not None and t.is_alive():
                return False
            if tid in self._finished:
                return False
            name = str(run["metadata"]["name"])
            t = threading.Thread(target=self._run_thread, args=(name, resume), daemon=True,
                                 name=f"trustcap-gateway-run-{tid[2:10]}")
            self._threads[tid] = t
        t.start()
        return True

    # -- a. prepare, before the relay forwards a capsule challenge ------------------------------------
    def ensure_prepared(self, capsule: Mapping[str, Any]) -> str:
        """Make sure the agent holds this task's executor key before it quotes a round of it; returns the
        key. `capsule` is a challenge's {taskId, round, phase}; NotMyRound when no such round names me."""
        if not isinstance(capsule, Mapping):
            raise NotMyRound("a capsule challenge must carry {taskId, round, phase}")
        tid = _task_hex(capsule.get("taskId"), "capsule.taskId")
        round_id, phase = str(capsule.get("round", "")).lower(), capsule.get("phase")
        att = self._round_by_nonce(tid, round_id)
        if att is None:
            raise NotMyRound(f"no Attestation of task {tid} in {self.namespace} has round (nonce) {round_id}")
        spec = att.get("spec") or {}
        if spec.get("phase") != phase:
            raise NotMyRound(f"round {att['metadata']['name']} is a {spec.get('phase')} round, not {phase}")
        if str(spec.get("executor", "")).lower() != self.address:
            raise NotMyRound(f"round {att['metadata']['name']} names executor {spec.get('executor')}, not this "
                             f"gateway {self.address}")
        with self._lock:
            known = self._keys.get(tid)
        if known is not None:
            return known
        manifest, _ = self._capsule(spec, tid)
        return self._prepare(tid, manifest)

    def _round_by_nonce(self, tid: str, round_id: str) -> dict[str, Any] | None:
        for att in self.kube.list(ATTESTATIONS, self.namespace, f"trustcap.io/task={tid[2:18]}"):
            spec = att.get("spec") or {}
            if str(spec.get("nonce", "")).lower() == round_id and str(spec.get("taskId", "")).lower() == tid:
                return att
        return None

    def _capsule(self, spec: Mapping[str, Any], tid: str) -> tuple[Manifest, dict[str, Any]]:
        """The Capsule a round or run order names, checked to be that task's, and its parsed manifest."""
        ref = spec.get("capsuleRef") or {}
        ns, name, uid = ref.get("namespace"), ref.get("name"), ref.get("uid")
        if not (isinstance(ns, str) and isinstance(name, str) and isinstance(uid, str)):
            raise LifecycleError(f"task {tid}: capsuleRef must name {{namespace, name, uid}}, got {dict(ref)}")
        if "0x" + task_id(capsule_id(ns, name), uid).hex() != tid:
            raise LifecycleError(f"task {tid} is not the task of capsule {ns}/{name} (uid {uid})")
        capsule = self.kube.get(CAPSULES, ns, name)
        if capsule is None or (capsule.get("metadata") or {}).get("uid") != uid:
            raise LifecycleError(f"capsule {ns}/{name} (uid {uid}) of task {tid} is gone")
        try:
            return parse_manifest(capsule.get("spec")), capsule
        except TrustcapError as exc:
            raise LifecycleError(f"capsule {ns}/{name}: spec is not a valid manifest: {exc}") from exc

    def _prepare(self, tid: str, manifest: Manifest) -> str:
        answer = self.server.command("prepare", taskId=tid, manifestDigest="0x" + manifest.binding_digest().hex(),
                                     imageDigest=manifest.function.digest)
        key = answer.get("executorKey")
        if not isinstance(key, str) or not key.startswith("0x") or len(key) != 68:
            raise LifecycleError(f"agent answered prepare of task {tid} without an executorKey: {answer}")
        with self._lock:
            self._keys[tid] = key
        log.info("prepared task %s on the agent", tid)
        return key

    # -- b. the run -----------------------------------------------------------------------------------
    def _run_thread(self, name: str, resume: bool) -> None:
        try:
            self._run(name, resume)
        except (TrustcapError, OSError) as exc:
            log.warning("run %s: %s (will look again)", name, exc)
        except Exception:
            log.exception("run %s failed in the gateway (will look again)", name)

    def _run(self, name: str, resume: bool) -> None:
        run = self.kube.get(CAPSULERUNS, self.namespace, name)
        if run is None:
            return
        spec = run["spec"]
        tid = _task_hex(spec.get("taskId"), "CapsuleRun spec.taskId")
        manifest, capsule = self._capsule(spec, tid)
        key = self._prepare(tid, manifest)
        try:
            if not resume:
                try:
                    self._claim(tid)  # the agent runs one capsule at a time: wait for the node, bounded
                    released = self._start(run, capsule, manifest, key, tid)
                except RunFailed as exc:
                    log.warning("run %s not started: %s", name, exc)
                    self._status(name, {"phase": "Failed", "reason": exc.reason, "error": str(exc)[:MAX_ERROR],
                                        "wipe": dict(NOTHING_RAN), "finishedAt": rfc3339(self.wall())})
                    return
                self._status(name, {"phase": "Running", "inputsReleased": released,
                                    "startedAt": rfc3339(self.wall())})
            must_stop = ""
            if resume and self._try_claim(tid) and self._agent_state(tid) != "done":
                # Re-open a run the agent may still run (a restarted gateway's new table holds nothing
                # declared; a run that is done needs no link to report). While another task holds the
                # node, this one is not running (the agent runs one capsule at a time): it is followed to
                # its result, and nothing is stopped, since a stop would reach the other task's run.
                try:
                    self._declare(tid, manifest)
                except LinkHeld as exc:  # taken just now by another task: not running, and not to be stopped
                    log.warning("run %s resumed while %s", name, exc)
                except RunFailed as exc:
                    # The agent's run goes on, but its link stays shut: stop it, and follow it to its end so
                    # that its wipe report is recorded (the stop is re-sent until the agent takes it).
                    log.warning("run %s resumed without its endpoints, stopping it: %s", name, exc)
                    must_stop = f"on resuming the run, {exc}"
            self._follow(name, tid, manifest, key, spec.get("store") or "", must_stop=must_stop)
        finally:
            self._release_node(tid)

    def _agent_state(self, tid: str) -> str:
        """The agent's `result` state of this task ("running", "done"), "" when it cannot say."""
        try:
            return str(self.server.command("result", taskId=tid).get("state") or "")
        except (TrustcapError, OSError):
            return ""

    def _try_claim(self, tid: str) -> bool:
        """Take the node for this task if no other task holds it."""
        with self._lock:
            if self._holder not in (None, tid):
                return False
            self._holder = tid
            return True

    def _claim(self, tid: str) -> None:
        """Wait until no other task's run holds the node, then take it; LinkHeld after `busy_wait_s` (by
        then the pre round's verdicts are too old for a broker to release on). A capsule that lands on a
        busy node waits its turn instead of failing; nothing is asked of a broker while it waits."""
        deadline = self.clock() + self.busy_wait_s
        while not self._try_claim(tid):
            if self.clock() > deadline or self._halt.is_set():
                with self._lock:
                    holder = self._holder
                raise LinkHeld(str(holder))
            self._halt.wait(self.poll_s)

    def _release_node(self, tid: str) -> None:
        """The run is over (the agent reported it done, or this thread ends): close its link, free the node."""
        self._undeclare(tid)
        with self._lock:
            if self._holder == tid:
                self._holder = None

    def _endpoints(self, manifest: Manifest) -> list[_Endpoint]:
        """The manifest's endpoints as the link guard will take them (its gateway address and deny list)."""
        services = self.link.services if self.link is not None else None
        if services is None:
            return declared_endpoints(manifest)
        return declared_endpoints(manifest, str(services.gateway_addr), deny=tuple(getattr(services, "deny", ())))

    def _declare(self, tid: str, manifest: Manifest) -> None:
        """Open the Pi's HPC link to exactly the endpoints of the manifest the pre round attested, before
        the agent is told to run (RunFailed if the guard will not take them: nothing is started). One HPC
        runs one capsule at a time, so one run holds the link: a second is refused, never merged."""
        if self.link is None:
            return
        endpoints = self._endpoints(manifest)
        ttl_s = int(manifest.timeout_seconds + RESULT_MARGIN_S)
        with self._link_io:  # every allow and clear in turn: a late retried clear cannot undo this allow
            with self._lock:
                if self._declared not in (None, tid):
                    raise LinkHeld(self._declared)
                self._declared = tid
            try:
                self.link.allow(endpoints, ttl_s=ttl_s)
            except (TrustcapError, OSError, ValueError) as exc:
                with self._lock:
                    self._declared, self._link_dirty = None, True  # a half-applied allow is cleared like a run
                raise RunFailed("Failed", f"the HPC link guard did not take the run's endpoints: {exc}") from exc
            with self._lock:
                self._link_dirty = False  # allow() replaced whatever an earlier run left in one transaction
        if endpoints:
            log.info("task %s: HPC link open to %s", tid, ", ".join(f"{e.host}:{e.port}" for e in endpoints))

    def _undeclare(self, tid: str) -> None:
        """After the run, only the Pi's own services are reachable from the link again."""
        with self._lock:
            if self.link is None or self._declared != tid:
                return
            self._declared, self._link_dirty = None, True
        self._retry_clear()

    def _retry_clear(self) -> None:
        """Close the link to a finished run's endpoints; a failed clear is retried on every pass until it
        holds (or the next run's allow replaces them)."""
        with self._link_io:
            with self._lock:
                if self.link is None or not self._link_dirty or self._declared is not None:
                    return
            try:
                self.link.clear()
            except (TrustcapError, OSError) as exc:
                log.error("the HPC link guard still holds a finished run's endpoints (%s); retrying (the kernel "
                          "drops them at their timeout in any case)", exc)
                return
            with self._lock:
                self._link_dirty = False

    def _start(self, run: Mapping[str, Any], capsule: Mapping[str, Any], manifest: Manifest, key: str,
               tid: str) -> list[str]:
        """Fetch every input and its released key, then start the run; RunFailed before anything is sent."""
        spec = run["spec"]
        if self.link is not None:  # refused before any key is asked for
            self._endpoints(manifest)
        pre = self.kube.get(ATTESTATIONS, self.namespace, str(spec.get("preRound", "")))
        if pre is None:
            raise RunFailed("Failed", f"the pre-run round {spec.get('preRound')!r} is missing")
        pspec = pre.get("spec") or {}
        if (pspec.get("phase"), str(pspec.get("taskId", "")).lower(), str(pspec.get("executor", "")).lower()) != (
                "pre", tid, self.address):
            raise RunFailed("Failed", f"{spec.get('preRound')} is not this task's pre round naming this gateway")
        verdicts = [{"verdict": v["verdict"], "quote": v["quote"]}
                    for v in (pre.get("status") or {}).get("verdicts") or [] if v.get("verdict") and v.get("quote")]
        reveals = [{"node": r["node"], "pi": r["pi"], "salt": r["salt"]}
                   for r in self.kube.secrets(self.namespace, f"{REVEAL_LABEL}={tid[2:18]}")
                   if {"node", "pi", "salt"} <= set(r)]
        meta = capsule["metadata"]
        ref = {"namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]}
        try:
            store = self.store_of(str(spec.get("store") or ""))
        except (TrustcapError, OSError, ImportError) as exc:
            raise RunFailed("Failed", f"cannot open the store {spec.get('store')!r}: {exc}") from exc
        inputs = []
        for inp in manifest.inputs:
            envelope, wrapped = self._release(inp, store, ref, capsule["spec"], pspec, verdicts, reveals, key)
            inputs.append({"name": inp.name, "envelope": base64.b64encode(envelope).decode(),
                           "wrappedKey": base64.b64encode(wrapped).decode()})
        cid = "0x" + capsule_id(ref["namespace"], ref["name"]).hex()
        self._declare(tid, manifest)
        try:
            self.server.command("run", taskId=tid, capsuleId=cid, manifest=dict(capsule["spec"]), inputs=inputs)
        except (TrustcapError, OSError) as exc:
            if not self._already_run(tid):
                raise RunFailed("Failed", f"the agent did not start the run: {exc}") from exc
        return [i["name"] for i in inputs]

    def _release(self, inp: Any, store: _Store, ref: Mapping[str, str], manifest_spec: Mapping[str, Any],
                 round_spec: Mapping[str, Any], verdicts: list[dict[str, Any]], reveals: list[dict[str, str]],
                 key: str) -> tuple[bytes, bytes]:
        from trustcap.release import ReleaseRefused, request_release

        if not inp.broker:
            raise RunFailed("InputRejected", f"input {inp.name!r} names no broker (spec.inputs[].broker): nobody "
                                             "can release its key")
        try:
            envelope = store.get(inp.cid)
            _, header = read_header(io.BytesIO(envelope))
        except (TrustcapError, OSError) as exc:
            raise RunFailed("InputRejected", f"input {inp.name!r} ({inp.cid}): {exc}") from exc
        body = {"capsule": dict(ref), "manifest": dict(manifest_spec), "input": inp.name,
                "header": base64.b64encode(header).decode(), "round": dict(round_spec), "verdicts": verdicts,
                "reveals": reveals}
        try:
            wrapped, executor_key = request_release(inp.broker, body, RELEASE_TIMEOUT_S)
        except ReleaseRefused as exc:
            raise RunFailed("ReleaseRefused", f"input {inp.name!r}: {exc}") from exc
        if "0x" + executor_key.hex() != key:
            raise RunFailed("ReleaseRefused", f"input {inp.name!r}: broker {inp.broker} wrapped the key to executor "
                                              f"key 0x{executor_key.hex()}, not this task's {key}")
        return envelope, wrapped

    def _already_run(self, tid: str) -> bool:
        """After a refused `run`: is the run there anyway (a restart after `run` was sent)?"""
        try:
            return self.server.command("result", taskId=tid).get("state") in ("running", "done")
        except (TrustcapError, OSError):
            return False

    def _follow(self, name: str, tid: str, manifest: Manifest, key: str, store_url: str, *,
                must_stop: str = "") -> None:
        """Poll the agent's result; relay a stop order (the run's spec.stop, or `must_stop` from the gateway
        itself); when done, store the results and report."""
        deadline = self.clock() + manifest.timeout_seconds + RESULT_MARGIN_S
        lost_since: float | None = None
        lost_why = ""
        stop_sent = False
        while not self._halt.is_set():
            run = self.kube.get(CAPSULERUNS, self.namespace, name)
            if run is None:  # the run order is gone: stop what may still run; finish follows in step()
                self._send_stop(tid, "Deleted")
                return
            reason = str((run.get("spec") or {}).get("stop") or must_stop)
            if reason and not stop_sent:
                stop_sent = self._send_stop(tid, reason)
            try:
                answer = self.server.command("result", taskId=tid)
                lost_since = None
            except GatewayError as exc:
                refused = _refused_result(exc)
                if refused is not None:
                    self._release_node(tid)  # the run is over: close its link before storing anything
                    self._done(name, refused, key, store_url)
                    return
                lost_since, answer, lost_why = self._lost(lost_since), {"state": "running"}, str(exc)
            except (TrustcapError, OSError) as exc:  # no agent session (a reboot, a reconnect): wait a while
                lost_since, answer, lost_why = self._lost(lost_since), {"state": "running"}, str(exc)
            if lost_since is not None and self.clock() - lost_since > AGENT_LOST_S:
                self._status(name, {"phase": "Failed", "reason": "Failed", "finishedAt": rfc3339(self.wall()),
                                    "error": f"the agent did not report the run for {AGENT_LOST_S:g} s: "
                                             f"{lost_why}"[:MAX_ERROR]})
                return
            if answer.get("state") == "done":
                self._release_node(tid)
                self._done(name, answer, key, store_url)
                return
            if self.clock() > deadline:
                self._send_stop(tid, "Timeout")
                self._status(name, {"phase": "Failed", "reason": "Timeout", "finishedAt": rfc3339(self.wall()),
                                    "error": "the agent reported no result by timeoutSeconds plus "
                                             f"{RESULT_MARGIN_S:g} s"})
                return
            self._halt.wait(self.poll_s)

    def _lost(self, since: float | None) -> float:
        return since if since is not None else self.clock()

    def _send_stop(self, tid: str, reason: str) -> bool:
        try:
            answer = self.server.command("stop", reason=reason)
        except (TrustcapError, OSError) as exc:
            log.warning("stop of task %s (%s) was not taken: %s", tid, reason, exc)
            return False
        log.info("stop of task %s (%s): %s", tid, reason, answer)
        return True

    def _done(self, name: str, answer: Mapping[str, Any], key: str, store_url: str) -> None:
        reason = str(answer.get("reason") or "Failed")
        status: dict[str, Any] = {"phase": "Succeeded" if reason == "Completed" else "Failed", "reason": reason,
                                  "resultSigner": key, "wipe": dict(answer.get("wipe") or {}),
                                  "finishedAt": rfc3339(self.wall()), "error": str(answer.get("error") or "")}
        if isinstance(answer.get("exitCode"), int) and not isinstance(answer.get("exitCode"), bool):
            status["exitCode"] = answer["exitCode"]
        if isinstance(answer.get("seconds"), int | float):
            status["seconds"] = answer["seconds"]
        results = []
        if answer.get("results"):
            try:
                store = self.store_of(store_url)
                for r in answer["results"]:
                    cid = store.put(base64.b64decode(r["envelope"], validate=True))
                    results.append({"recipient": r["recipient"], "publicKey": r["publicKey"], "cid": cid})
            except (TrustcapError, OSError, ImportError, ValueError, KeyError) as exc:
                status.update(phase="Failed", reason="Failed", error=f"the results could not be stored: {exc}")
                results = []
        status["results"] = results
        status["error"] = status["error"][:MAX_ERROR]
        self._status(name, status)
        log.info("run %s ended: %s", name, reason)

    def _status(self, name: str, status: Mapping[str, Any]) -> None:
        self.kube.patch_status(CAPSULERUNS, self.namespace, name, status)

    # -- c. finish ------------------------------------------------------------------------------------
    def _finish(self, runs: Mapping[str, Mapping[str, Any]]) -> None:
        """Drop the executor key of each task whose post round is decided or whose run order is gone."""
        with self._lock:
            candidates = (set(self._keys) | set(runs)) - self._finished
            busy = {t for t, th in self._threads.items() if th.is_alive()}
        for tid in sorted(candidates - busy):
            run = runs.get(tid)
            if run is not None and (run.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                continue  # not ended (or not started by us yet)
            if run is None and tid not in self._runs_seen and not self._pre_round_failed(tid):
                continue  # no run order yet: the pre round is still being attested
            if run is not None:
                post = self.kube.get(ATTESTATIONS, self.namespace, post_round_name(bytes.fromhex(tid[2:])))
                if post is None or not (post.get("status") or {}).get("result"):
                    continue
            try:
                self.server.command("finish", taskId=tid)
            except (TrustcapError, OSError) as exc:
                if "not prepared" not in str(exc):
                    log.warning("finish of task %s was not taken, will retry: %s", tid, exc)
                    continue
            with self._lock:
                self._finished.add(tid)
                self._keys.pop(tid, None)
            log.info("finished task %s: the agent dropped its executor key", tid)

    def _pre_round_failed(self, tid: str) -> bool:
        """A prepared task whose pre round failed or expired gets no run order: its key can go."""
        rounds = self.kube.list(ATTESTATIONS, self.namespace, f"trustcap.io/task={tid[2:18]}")
        pre = [a for a in rounds if (a.get("spec") or {}).get("phase") == "pre"]
        return not pre or any((a.get("status") or {}).get("result") in ("Failed", "Expired") for a in pre)
