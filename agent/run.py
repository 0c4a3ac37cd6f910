"""A capsule's run on the agent: its executor key, the state its quotes bind, the run, the result, the end.

The contract is docs/lifecycle-interfaces.md section 5; why it is shaped so, decision 0093.

    executor's gateway                       agent (CapsuleRunner)                          engine / kernel
      | prepare {taskId, manifestDigest, imageDigest} -> fresh secp256k1 executor key, memory only
      | <------------------------------ {executorKey}  (the same key when repeated)
      | quote {nonce, capsule: {taskId, round, phase}} -> capsule_state binds the task, both digests,
      |                                                   the round, the phase and the executor key
      | run {taskId, capsuleId, manifest, inputs} -----> checks the request against the prepared task
      | <------------------------------ {started}        thread: unwrap each CEK, open each input (every
      |                                                   input before anything runs: one bad input and
      | quote (rounds during the run) -> answered         nothing runs, InputRejected naming it)
      | stop {reason} -> kill, wait for the wipe          Executor.run(image id, resources, /inputs) -------->
      | result {taskId} -> {state: running}               /output/result read back; scratch wiped, proven
      | result {taskId} -> {state: done, reason, ...}     result sealed to each recipient, signed by the key
      | finish {taskId} -> the key and the result dropped

Why `run` only starts the run: the channel serves one request at a time and a run lasts up to its
`timeoutSeconds`; committee rounds quote the executor during the run, and `stop` must reach it. So the run
lives in a thread and `result` is polled. One run at a time (an HPC executes one capsule; the executor
attributes kernel records by run window).

What the agent's memory holds is not wiped: the executor key and opened inputs are Python objects that
are dropped (the key at `finish`), not overwritten; the reboot wipe level (decision 0049) covers memory.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from trustcap.agent import metrics
from trustcap.agent.errors import AgentError, RunRequestError
from trustcap.agent.isolation import IsolationSpec, parse_endpoint
from trustcap.capsule.keys import KeyPair
from trustcap.capsule.manifest import Manifest, parse_manifest
from trustcap.errors import TrustcapError
from trustcap.forms import hex_bytes

__all__ = ["PHASES", "REASONS", "CapsuleRunner", "InputOpener", "open_released"]

log = logging.getLogger("trustcap.agent")
PHASES = ("pre", "during", "post")
REASONS = ("Completed", "Timeout", "Failed", "InputRejected", "Stopped")
_IMAGE_ID = re.compile(r"^sha256:[0-9a-f]{64}$")
_MiB = 1024 * 1024
_MAX_TASKS = 64  # prepared tasks held at once; a prepare beyond it is refused, not an eviction


class InputOpener(Protocol):
    """Opens one released input with the task's executor key; raises a TrustcapError naming the cause."""

    def __call__(self, envelope: bytes, wrapped_key: bytes, key: KeyPair, *, name: str, owner: bytes,
                 capsule_id: bytes, task_id: bytes, binding_digest: bytes) -> bytes: ...


def open_released(envelope: bytes, wrapped_key: bytes, key: KeyPair, *, name: str, owner: bytes, capsule_id: bytes,
                  task_id: bytes, binding_digest: bytes) -> bytes:
    """The broker wrapped the input's CEK to the executor key (trustcap.release); unwrap it, then open the
    envelope with it, checking owner, capsule id and binding digest."""
    from trustcap.release import open_with_key, unwrap_key  # type: ignore[import-not-found,unused-ignore]

    cek: bytes = unwrap_key(wrapped_key, key, capsule_id=capsule_id, task_id=task_id, input_name=name)
    data: bytes = open_with_key(envelope, cek, owner=owner, capsule_id=capsule_id, manifest_digest=binding_digest)
    return data


def binding_digest(manifest: Manifest) -> bytes:
    """`Manifest.binding_digest()` (lifecycle interfaces section 1): what an input envelope binds."""
    digest: bytes = manifest.binding_digest()
    return digest


def _hex(req: Mapping[str, Any], name: str, n: int, where: str = "") -> bytes:
    b = hex_bytes(req.get(name), n)
    if b is None:
        raise RunRequestError(f"field {where + name!r} must be {n} bytes of 0x-hex")
    return b


def _b64(v: Any, label: str) -> bytes:
    if not isinstance(v, str) or not v:
        raise RunRequestError(f"field {label!r} must be a base64 string")
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RunRequestError(f"field {label!r} is not base64") from exc


def _0x(b: bytes) -> str:
    return "0x" + b.hex()


@dataclass
class _Task:
    task_id: bytes
    manifest_digest: bytes
    image_digest: str
    key: KeyPair
    thread: threading.Thread | None = None
    result: dict[str, Any] | None = None
    stop_reason: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def running(self) -> bool:
        return self.thread is not None and not self.done.is_set()


@dataclass(frozen=True)
class _Order:
    manifest: Manifest
    capsule_id: bytes
    binding: bytes
    inputs: dict[str, tuple[bytes, bytes]]  # name -> (envelope, wrapped key)


class CapsuleRunner:
    """The agent's capsule ops. `executor` makes the node's Executor (engine connection) for one run."""

    def __init__(self, executor: Callable[[], Any], *, open_input: InputOpener = open_released,
                 attacher: Any = None, stop_wait_s: float = 120.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._executor = executor
        self._open_input = open_input
        self._attacher = attacher
        self.stop_wait_s = stop_wait_s
        self.clock = clock
        self._tasks: dict[bytes, _Task] = {}
        self._lock = threading.Lock()

    # -- ops ------------------------------------------------------------------------------------------
    def prepare(self, req: Mapping[str, Any]) -> dict[str, Any]:
        task_id = _hex(req, "taskId", 32)
        manifest_digest = _hex(req, "manifestDigest", 32)
        image = req.get("imageDigest")
        if not isinstance(image, str) or not _IMAGE_ID.match(image):
            raise RunRequestError("field 'imageDigest' must be an image id sha256:<64 hex>, never a tag")
        with self._lock:
            task = self._tasks.get(task_id)
            if task is not None:
                if (task.manifest_digest, task.image_digest) != (manifest_digest, image):
                    raise RunRequestError(f"task {_0x(task_id)} is prepared for other digests; "
                                          "a prepared task cannot be rebound")
            else:
                if len(self._tasks) >= _MAX_TASKS:
                    raise RunRequestError(f"{_MAX_TASKS} tasks are prepared already; finish one first")
                task = self._tasks[task_id] = _Task(task_id, manifest_digest, image, KeyPair.generate())
                log.info("prepared task %s", _0x(task_id))
        return {"executorKey": _0x(task.key.public_key())}

    def capsule_state(self, capsule: Any) -> dict[str, Any]:
        """The `capsule_state` a quote carries for a committee round of a prepared task."""
        if not isinstance(capsule, Mapping):
            raise RunRequestError("field 'capsule' must be an object {taskId, round, phase}")
        task = self._task(_hex(capsule, "taskId", 32, "capsule."))
        round_id = _hex(capsule, "round", 32, "capsule.")
        phase = capsule.get("phase")
        if phase not in PHASES:
            raise RunRequestError(f"field 'capsule.phase' must be one of {', '.join(PHASES)}")
        return {"taskId": _0x(task.task_id), "manifestDigest": _0x(task.manifest_digest),
                "imageDigest": task.image_digest, "round": _0x(round_id), "phase": phase,
                "executorKey": _0x(task.key.public_key())}

    def run(self, req: Mapping[str, Any]) -> dict[str, Any]:
        """Check the order against the prepared task and start the run; `result` reports it."""
        task = self._task(_hex(req, "taskId", 32))
        order = self._order(task, req)
        with self._lock:
            busy = next((t for t in self._tasks.values() if t.running), None)
            if busy is not None:
                raise RunRequestError(f"a run is in progress (task {_0x(busy.task_id)}); one run at a time")
            if task.thread is not None:
                raise RunRequestError(f"task {_0x(task.task_id)} has run already; its result waits for finish")
            task.thread = threading.Thread(target=self._execute, args=(task, order), daemon=True,
                                           name=f"trustcap-run-{task.task_id.hex()[:8]}")
            task.thread.start()
        return {"started": True, "taskId": _0x(task.task_id)}

    def result(self, req: Mapping[str, Any]) -> dict[str, Any]:
        task = self._task(_hex(req, "taskId", 32))
        if task.thread is None:
            raise RunRequestError(f"task {_0x(task.task_id)} has not been run")
        if not task.done.is_set() or task.result is None:
            return {"state": "running", "taskId": _0x(task.task_id)}
        return {"state": "done", "taskId": _0x(task.task_id), **task.result}

    def stop(self, reason: str) -> dict[str, Any]:
        """Stop the run in progress and wait until it has ended (capsule dead, scratch wiped)."""
        with self._lock:
            task = next((t for t in self._tasks.values() if t.running), None)
        if task is None:
            return {"stopped": False, "running": False}
        task.stop_reason = reason or "stopped"
        ended = task.done.wait(self.stop_wait_s)
        log.warning("stop of task %s (%s): %s", _0x(task.task_id), reason, "ended" if ended else "still running")
        return {"stopped": ended, "running": not ended, "taskId": _0x(task.task_id)}

    def finish(self, req: Mapping[str, Any]) -> dict[str, Any]:
        """After the post round: stop a run still going, then drop the executor key and the result."""
        task = self._task(_hex(req, "taskId", 32))
        if task.running:
            task.stop_reason = "finish"
            if not task.done.wait(self.stop_wait_s):
                raise RunRequestError(f"task {_0x(task.task_id)} is still running; not finished")
        with self._lock:
            self._tasks.pop(task.task_id, None)
        log.info("finished task %s: executor key dropped", _0x(task.task_id))
        return {"finished": True, "taskId": _0x(task.task_id)}

    def status(self) -> dict[str, Any]:
        with self._lock:
            running = [_0x(t.task_id) for t in self._tasks.values() if t.running]
            return {"phase": "running" if running else "idle", "prepared": len(self._tasks), "running": running}

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        def guard(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[dict[str, Any]], dict[str, Any]]:
            def call(req: dict[str, Any]) -> dict[str, Any]:
                try:
                    return fn(req)
                except RunRequestError as exc:
                    return {"error": str(exc)}
            return call

        return {"prepare": guard(self.prepare), "run": guard(self.run), "result": guard(self.result),
                "finish": guard(self.finish)}

    # -- internals --------------------------------------------------------------------------------------
    def _task(self, task_id: bytes) -> _Task:
        with self._lock:
            task = self._tasks.get(task_id)
        if task is None:
            raise RunRequestError(f"task {_0x(task_id)} is not prepared on this node")
        return task

    def _order(self, task: _Task, req: Mapping[str, Any]) -> _Order:
        capsule_id = _hex(req, "capsuleId", 32)
        try:
            manifest = parse_manifest(req.get("manifest"))
        except TrustcapError as exc:
            raise RunRequestError(f"field 'manifest': {exc}") from exc
        binding = binding_digest(manifest)
        if binding != task.manifest_digest:
            raise RunRequestError(f"field 'manifest': its binding digest {_0x(binding)} is not the prepared "
                                  f"{_0x(task.manifest_digest)}")
        if manifest.function.digest != task.image_digest:
            raise RunRequestError(f"field 'manifest.function.digest': {manifest.function.digest} is not the "
                                  f"prepared image {task.image_digest}")
        if manifest.devices:
            raise RunRequestError("field 'manifest.devices': this node passes no device to a capsule")
        if manifest.egress and self._attacher is None:
            raise RunRequestError("field 'manifest.egress': this agent has no gateway network attacher")
        raw = req.get("inputs")
        if not isinstance(raw, list):
            raise RunRequestError("field 'inputs' must be a list of {name, envelope, wrappedKey}")
        inputs: dict[str, tuple[bytes, bytes]] = {}
        for i, item in enumerate(raw):
            if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
                raise RunRequestError(f"field 'inputs[{i}]' must be an object with a string 'name'")
            name = item["name"]
            if name in inputs:
                raise RunRequestError(f"field 'inputs[{i}].name': input {name!r} is given twice")
            inputs[name] = (_b64(item.get("envelope"), f"inputs[{i}].envelope"),
                            _b64(item.get("wrappedKey"), f"inputs[{i}].wrappedKey"))
        declared = [i.name for i in manifest.inputs]
        if sorted(inputs) != sorted(declared):
            raise RunRequestError(f"field 'inputs': names {sorted(inputs)} are not the manifest's {sorted(declared)}")
        return _Order(manifest, capsule_id, binding, inputs)

    def _execute(self, task: _Task, order: _Order) -> None:
        t0 = self.clock()
        try:
            task.result = self._outcome(task, order, t0)
        except Exception as exc:  # the run thread must always leave a result; nothing secret in the message
            log.exception("run of task %s failed", _0x(task.task_id))
            task.result = self._done("Failed", None, t0, error=f"{type(exc).__name__}: {exc}",
                                     wipe={"verified": False, "error": "the run ended in an agent error"})
        finally:
            self._observe(task.result, t0)
            task.done.set()
            log.info("run of task %s ended: %s", _0x(task.task_id), task.result and task.result["reason"])

    def _observe(self, result: dict[str, Any] | None, t0: float) -> None:
        """The ended run in the agent's metrics (its gateway re-exports them); never fails the run."""
        try:
            metrics.observe_run(str((result or {}).get("reason") or "Failed"), self.clock() - t0)
            for v in (result or {}).get("violations") or []:
                metrics.observe_violation(str(v.get("kind", "")), int(v.get("count") or 1))
        except (TypeError, ValueError, AttributeError):
            log.exception("run metrics not observed")

    def _done(self, reason: str, exit_code: int | None, t0: float, *, wipe: dict[str, Any], error: str = "",
              results: list[dict[str, str]] | None = None, violations: list[dict[str, Any]] | None = None
              ) -> dict[str, Any]:
        return {"reason": reason, "exitCode": exit_code, "seconds": round(self.clock() - t0, 3),
                "results": results or [], "wipe": wipe, "error": error, "violations": violations or []}

    def _outcome(self, task: _Task, order: _Order, t0: float) -> dict[str, Any]:
        nothing_ran = {"verified": True, "items": [], "ran": False,
                       "how": "no container and no scratch were made; opened inputs lived only in agent memory"}
        manifest = order.manifest
        plain: dict[str, bytes] = {}
        # Every input is opened before anything runs: one that cannot be opened and nothing runs.
        for inp in manifest.inputs:
            if task.stop_reason is not None:
                return self._done("Stopped", None, t0, wipe=nothing_ran, error=f"stopped: {task.stop_reason}")
            envelope, wrapped = order.inputs[inp.name]
            try:
                plain[inp.name] = self._open_input(envelope, wrapped, task.key, name=inp.name,
                                                   owner=bytes.fromhex(inp.owner[2:]), capsule_id=order.capsule_id,
                                                   task_id=task.task_id, binding_digest=order.binding)
            except ImportError as exc:
                return self._done("Failed", None, t0, wipe=nothing_ran,
                                  error=f"key release is not available on this agent: {exc}")
            except (TrustcapError, ValueError) as exc:
                plain.clear()
                return self._done("InputRejected", None, t0, wipe=nothing_ran, error=f"input {inp.name!r}: {exc}")
        try:
            spec = self._spec(manifest, sum(len(v) for v in plain.values()))
            executor = self._executor()
            result = executor.run(spec, inputs=plain, output_limit=spec.scratch_bytes,
                                  should_stop=lambda: task.stop_reason)
        except AgentError as exc:
            return self._done("Failed", None, t0, wipe={"verified": False, "error": str(exc)}, error=str(exc))
        finally:
            plain.clear()
        violations = [{"kind": v.kind, "attempted": v.attempted, "source": v.source, "count": v.count}
                      for v in result.violations]
        reason, error = self._reason(result, task)
        output, result.output = result.output, None
        if reason != "Completed" or output is None:
            return self._done(reason, result.exit_code, t0, wipe=result.wipe, error=error, violations=violations)
        from trustcap.capsule.envelope import seal_bytes

        results = []
        for r in manifest.recipients:
            sealed = seal_bytes(output, recipients=[bytes.fromhex(r.public_key[2:])], owner=task.key,
                                capsule_id=order.capsule_id, manifest_digest=order.binding)
            results.append({"recipient": r.name, "publicKey": r.public_key,
                            "envelope": base64.b64encode(sealed).decode()})
        return self._done("Completed", result.exit_code, t0, wipe=result.wipe, results=results,
                          violations=violations)

    @staticmethod
    def _reason(result: Any, task: _Task) -> tuple[str, str]:
        """The executor's ending, in the lifecycle's words."""
        if result.reason == "timeout":
            return "Timeout", "the capsule ran past timeoutSeconds and was killed"
        if result.reason == "killed-by-policy":
            if task.stop_reason is not None:
                return "Stopped", f"stopped: {task.stop_reason}"
            kinds = sorted({v.kind for v in result.violations})
            return "Failed", f"stopped on isolation violations: {', '.join(kinds)}"
        if result.reason == "oom":
            return "Failed", "the capsule ran out of its memory limit"
        if result.reason != "completed":
            return "Failed", result.error or f"the run ended as {result.reason}"
        if result.exit_code != 0:
            return "Failed", f"the capsule exited with code {result.exit_code}"
        if result.output is None:
            return "Failed", result.output_error or "the capsule wrote no /output/result"
        if result.wipe.get("verified") is not True:
            bad = [f"{i.get('what', '?')}: {i.get('error') or i.get('why') or 'not verified'}"
                   for i in result.wipe.get("items") or [] if i.get("verified") is not True]
            return "Failed", f"the wipe did not verify ({'; '.join(bad) or 'no wipe items'}): the result is withheld"
        return "Completed", ""

    def _spec(self, manifest: Manifest, input_bytes: int) -> IsolationSpec:
        res = manifest.resources
        work = res.scratch_mi_b * _MiB + input_bytes
        # ext4 needs room of its own (metadata, one block per small file): 4 MiB and 3 %
        scratch = max(8 * _MiB, work + 4 * _MiB + work * 3 // 100)
        scratch = -(-scratch // _MiB) * _MiB
        return IsolationSpec(image=manifest.function.digest, command=tuple(manifest.function.entrypoint),
                             egress=tuple(parse_endpoint(e) for e in manifest.egress),
                             timeout_s=float(manifest.timeout_seconds), memory_bytes=res.memory_mi_b * _MiB,
                             nano_cpus=res.cpu_millis * 1_000_000, pids_limit=res.pids, scratch_bytes=scratch,
                             output_tail_bytes=0, keep_logs=False, on_violation="stop")
