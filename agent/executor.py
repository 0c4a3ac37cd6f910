"""The container executor: one capsule run under `IsolationSpec`, ended by a verified wipe, always.

    caller              Executor                    Docker Engine           kernel / attacher
      | run(spec) ------> | snapshot pre-state         |                          |
      |                   | resolve the image to its id (a digest is checked, a tag pinned to its id)
      |                   | make scratch (loop+ext4), owned by the run's own uid; stage /inputs      |
      |                   | audit stream (netlink) + exit rules for that uid -------------------> | auditctl -a

      |                   | [egress] sandbox ---------> | create+start (net none) |
      |                   |   attach(pid) ------------------------------------> | veth -> gateway, nft
      |                   | create+start capsule -----> |                          |
      |                   | poll: status, cgroup pids, audit (seccomp, EROFS, /dev opens), egress counters
      |                   | timeout? kill ------------> |                          |
      |                   | logs tail, state, /output/result (no links followed) |            |
      |                   | remove audit rules (always), say if reporting was degraded ---------> | auditctl -D
      |                   | overwrite the log file; rm -v containers ---------> | verify gone  |
      |                   | wipe scratch (overwrite + read-back), detach network, snapshot post-state
      | <---- RunResult (reason, exit_code, violations, stdout/stderr tails, output, wipe proof)

Why a sandbox container for egress: the capsule must never run a single instruction before its network
is confined, so the network namespace is made and wired first (in a sleeping sandbox of the trusted base
image) and the capsule joins it (`network_mode=container:<sandbox>`).
Why polling: seccomp records, the pids cgroup and egress counters are only visible while the run lives.
Why resolve the image first: the container is created from the image *id* the lookup returned, so a tag
moved between lookup and create cannot swap the function; a capsule names its image by that id
(`sha256:<hex>`), and a different id under it is refused (decision 0093).
Why a uid per run: the kernel's audit rules filter on it, so every record they yield is this run's
(docs/decisions/0045-audit-file-attempts.md); a machine without kernel audit gets `reporting: degraded`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from trustcap.agent import engine
from trustcap.agent.audit import (
    KEY_PREFIX,
    AuditReader,
    AuditRules,
    AuditStream,
    FileEvent,
    PidsEvent,
    file_violation,
    rule_keys,
)
from trustcap.agent.cgroup import RunCgroup
from trustcap.agent.errors import AgentError, EngineError, OutputError, WipeError
from trustcap.agent.isolation import CAPSULE_USER, SCRATCH_PATH, Endpoint, IsolationSpec, seccomp_profile
from trustcap.agent.wipe import make_scratch, overwrite_file

from trustcap.violations import Violation

__all__ = ["DEFAULT_SCRATCH_ROOT", "Executor", "NetworkAttacher", "RunResult", "Violation"]

log = logging.getLogger("trustcap.agent")
DEFAULT_SCRATCH_ROOT = Path("/var/lib/trustcap/scratch")
SANDBOX_IMAGE = "trustcap/base:bookworm"
_POLL_S = 0.1
IMAGE_ID = re.compile(r"^sha256:[0-9a-f]{64}$")
_RUN_UID_BASE = 1_000_000_000  # run uids: [1e9, 2e9), no account on any Debian image, below 2**31


def run_uid(spec: IsolationSpec, run_id: str) -> int | None:
    """The uid a run executes as: unique per run for the default user, else the spec's numeric uid."""
    if spec.user == CAPSULE_USER:
        return _RUN_UID_BASE + int(run_id, 16) % _RUN_UID_BASE
    uid = spec.user.split(":", 1)[0]
    return int(uid) if uid.isdigit() else None


class NetworkAttacher(Protocol):
    """Wires a run's network namespace to its gateway and reports egress attempts (the gateway's guard)."""

    def attach(self, run_id: str, pid: int, egress: Sequence[Endpoint]) -> None: ...
    def violations(self) -> Sequence[Any]: ...
    def detach(self) -> dict[str, Any]: ...


@dataclass
class RunResult:
    reason: str
    exit_code: int | None
    violations: list[Violation]
    stdout: str
    stderr: str
    wipe: dict[str, Any]
    run_id: str
    image: str
    seconds: float
    egress: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    reporting: dict[str, Any] = field(default_factory=lambda: {"status": "full", "reasons": []})
    image_id: str = ""
    output: bytes | None = None  # /output/result of a staged run; never in to_json (it may be secret)
    output_error: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("output")
        d["violations"] = [asdict(v) for v in self.violations]
        return d


def _tail(data: bytes, limit: int) -> str:
    return data[-limit:].decode("utf-8", "replace") if limit else ""


class Executor:
    """Runs capsules one at a time (an HPC executes one capsule; seccomp records are attributed by window)."""

    def __init__(self, client: Any | None = None, *, scratch_root: Path | None = DEFAULT_SCRATCH_ROOT,
                 attacher: NetworkAttacher | None = None, sandbox_image: str = SANDBOX_IMAGE,
                 audit: AuditReader | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client or engine.connect()
        self.scratch_root = scratch_root
        self.attacher = attacher
        self.sandbox_image = sandbox_image
        self.audit = audit or AuditReader()
        self.clock = clock
        self._run_cgroup_name = ""
        self._wiper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scratch-wipe")
        self._uid: int | None = None
        self._stream: AuditStream | None = None
        self._stop_reason: str | None = None
        self._should_stop: Callable[[], str | None] | None = None
        self.running = False

    def request_stop(self, reason: str) -> None:
        """Stop the current run from outside (the gateway's stop action, or the gateway being lost)."""
        self._stop_reason = reason

    # -- state snapshots: the post-run state must equal the pre-run state ---------------------------
    def snapshot(self) -> dict[str, Any]:
        """What a run could leave behind: our labelled containers and volumes, scratch dirs, loop devices."""
        with engine.translate("listing run leftovers"):
            containers = sorted(c.id for c in self.client.containers.list(all=True,
                                                                          filters={"label": "io.trustcap.run"}))
            volumes = sorted(v.name for v in self.client.volumes.list(filters={"label": "io.trustcap.run"}))
        scratch = sorted(p.name for p in self.scratch_root.iterdir()) if self.scratch_root and \
            self.scratch_root.is_dir() else []
        state: dict[str, Any] = {"containers": containers, "volumes": volumes, "scratch_dirs": scratch}
        state["digest"] = "sha256:" + hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
        return state

    def run(self, spec: IsolationSpec, *, inputs: Mapping[str, bytes] | None = None, output_limit: int = 0,
            should_stop: Callable[[], str | None] | None = None) -> RunResult:
        """One run. With `inputs` (a capsule run) each is placed at /inputs/<name> on the run's block scratch
        and /output/result (at most `output_limit` bytes) is read back into `RunResult.output` before the
        wipe. `should_stop` is asked while the run lives (the agent's stop op)."""
        self._stop_reason = None
        self._should_stop = should_stop
        self.running = True
        try:
            return self._run(spec, inputs, output_limit)
        finally:
            self.running = False
            self._should_stop = None

    def _stop_requested(self) -> str | None:
        if self._stop_reason is None and self._should_stop is not None:
            self._stop_reason = self._should_stop()
        return self._stop_reason

    def resolve_image(self, ref: str) -> str:
        """The image id to create the container from. A `sha256:<hex>` reference must be exactly that id
        (Docker also accepts a short prefix or another form: refused); a tag is pinned to its id now."""
        with engine.translate(f"looking up image {ref}"):
            image_id = str(self.client.images.get(ref).id)
        if ref.startswith("sha256:") and (not IMAGE_ID.match(ref) or image_id != ref):
            raise AgentError(f"image {ref} resolves to {image_id}: a capsule image is named by its full id")
        return image_id

    def _run(self, spec: IsolationSpec, inputs: Mapping[str, bytes] | None, output_limit: int) -> RunResult:
        run_id = uuid.uuid4().hex[:12]
        t0 = self.clock()
        pre = self.snapshot()
        image_id = self.resolve_image(spec.image)
        if spec.egress and self.attacher is None:
            raise AgentError("egress endpoints were declared but no gateway network attacher is configured")
        uid = self._uid = run_uid(spec, run_id)
        scratch = make_scratch(spec.scratch_bytes, self.scratch_root, SCRATCH_PATH)
        mountpoint = getattr(scratch, "mountpoint", None)
        if mountpoint is not None and uid is not None:
            os.chown(mountpoint, uid, uid)
        if inputs is not None:
            try:
                if uid is None:
                    raise WipeError("a capsule run needs a numeric uid to own its inputs")
                scratch.stage(uid, uid, inputs)
            except (OSError, WipeError) as exc:
                with contextlib.suppress(WipeError):
                    scratch.wipe()
                raise AgentError(f"staging the inputs failed: {exc}") from exc
        output: bytes | None = None
        output_error = ""
        sandbox: Any = None
        container: Any = None
        violations: dict[tuple[str, str, str], int] = {}
        reason, exit_code, error = "error", None, ""
        stdout = stderr = b""
        egress_report: dict[str, Any] = {}
        wipe_items: list[dict[str, Any]] = []
        self.audit.open()
        wall0 = time.time()
        cgroup: RunCgroup | None = None
        reasons: list[str] = []
        rules: AuditRules | None = None
        wiping: Future[dict[str, Any]] | None = None
        try:
            settings = spec.container_settings()
            settings["image"] = image_id
            if uid is not None and spec.user == CAPSULE_USER:
                settings["user"] = f"{uid}:{uid}"
            rules = self._start_reporting(uid, f"{KEY_PREFIX}{run_id}", reasons)
            cgroup = RunCgroup.create(run_id, spec.pids_limit, self._cgroup_driver())
            self._run_cgroup_name = cgroup.name if cgroup else ""
            if cgroup is not None:  # the parent holds the limit (and keeps the count after exit)
                settings["cgroup_parent"] = cgroup.parent
                settings["pids_limit"] = spec.pids_limit + 1
            settings["labels"] = {"io.trustcap.run": run_id}
            settings["security_opt"] = [*settings["security_opt"],
                                        f"seccomp={seccomp_profile(allow_inet=bool(spec.egress))}"]
            settings.update(scratch.docker_settings())
            if spec.egress:
                assert self.attacher is not None
                sandbox = self._start_sandbox(run_id, settings)
                self.attacher.attach(run_id, int(sandbox.attrs["State"]["Pid"]), spec.egress)
                settings["network_mode"] = f"container:{sandbox.id}"
            else:
                settings["network_mode"] = "none"
            with engine.translate("creating the capsule container"):
                container = self.client.containers.create(name=f"trustcap-run-{run_id}", **settings)
            reason, exit_code = self._supervise(spec, container, violations, wall0, cgroup)
            if reason == "killed-by-policy" and self._stop_reason:
                error = f"stopped: {self._stop_reason}"
            if spec.keep_logs:
                with engine.translate("reading the capsule's output"):
                    stdout = container.logs(stdout=True, stderr=False)
                    stderr = container.logs(stdout=False, stderr=True)
            if inputs is not None:
                try:
                    output = scratch.read_output(output_limit)
                except (OutputError, WipeError, OSError) as exc:
                    output_error = str(exc)
            # The scratch wipe (disk-bound: overwrite, fsync, uncached read-back) goes on while the
            # audit rules, the log and the containers are taken down (engine- and auditctl-bound): the
            # two share nothing once the capsule has exited. The proof is the same; only the wait overlaps.
            wiping = self._wiper.submit(scratch.wipe)
        except AgentError as exc:
            reason, error = "error", str(exc)
            log.warning("run %s failed: %s", run_id, exc)
        finally:
            if self._stream is not None:
                self._stream.stop()
            self._collect_audit(violations, wall0, spec)
            self.audit.close()
            reasons.extend(self._stop_reporting(rules))
            if self.attacher is not None and spec.egress:
                for v in self.attacher.violations():
                    violations[(v.kind, v.attempted, v.source)] = max(violations.get(
                        (v.kind, v.attempted, v.source), 0), v.count)
                with contextlib.suppress(AgentError):
                    egress_report = self.attacher.detach()
            if container is not None:
                wipe_items.append(self._wipe_log(container, spec))
            for c, what in ((container, "capsule container"), (sandbox, "network sandbox container")):
                if c is not None:
                    wipe_items.append(self._remove_container(c, what))
            if cgroup is not None:
                self._count_forks(spec, cgroup, violations)
                cgroup.remove()
            try:
                wipe_items.append(wiping.result() if wiping is not None else scratch.wipe())
            except WipeError as exc:
                reason, error = "error", f"wipe failed: {exc}"
                wipe_items.append({"what": "scratch", "verified": False, "error": str(exc)})
        post = self.snapshot()
        wipe = {"run_id": run_id, "level": scratch.level, "items": wipe_items,
                "images_pulled_for_run": [], "volumes_created_for_run": [],
                "pre_state_digest": pre["digest"], "post_state_digest": post["digest"],
                "state_restored": pre["digest"] == post["digest"],
                "verified": bool(wipe_items) and all(i.get("verified") is True for i in wipe_items)
                and pre["digest"] == post["digest"]}
        vlist = [Violation(k, a, s, n) for (k, a, s), n in sorted(violations.items())]
        return RunResult(reason=reason, exit_code=exit_code, violations=vlist,
                         stdout=_tail(stdout, spec.output_tail_bytes), stderr=_tail(stderr, spec.output_tail_bytes),
                         wipe=wipe, run_id=run_id, image=spec.image, seconds=round(self.clock() - t0, 3),
                         egress=egress_report, error=error,
                         reporting={"status": "degraded" if reasons else "full", "reasons": reasons},
                         image_id=image_id, output=output, output_error=output_error)

    def _start_reporting(self, uid: int | None, key: str, reasons: list[str]) -> AuditRules | None:
        """Join the audit stream, then install the run's rules; any gap becomes a stated reason."""
        self._stream = None
        self.audit.seccomp = True
        if uid is None:
            reasons.append("capsule user is not a numeric uid: kernel audit rules cannot name it")
            return None
        stream = AuditStream(uid, key)
        if not stream.start():
            reasons.append(stream.error)
            return None
        self._stream = stream
        self.audit.seccomp = False
        self._purge_stale_rules()
        rules = AuditRules(uid, key)
        why = rules.install()
        if why:
            reasons.append(why)
            return None
        return rules

    def _stop_reporting(self, rules: AuditRules | None) -> list[str]:
        reasons: list[str] = []
        stream, self._stream = self._stream, None
        if stream is not None:
            if stream.error:
                reasons.append(stream.error)
            if stream.overruns:
                reasons.append(f"audit stream overflowed {stream.overruns} time(s): records were lost")
        if rules is not None:
            lost = rules.lost_since_install()
            if lost:
                reasons.append(f"the kernel dropped {lost} audit record(s) during the run (backlog full)")
            reasons.extend(rules.remove())
        return reasons

    def _purge_stale_rules(self) -> None:
        """Rules of a run that no longer exists (an agent killed mid-run) must not outlive it."""
        try:
            keys = rule_keys()
        except (OSError, ValueError):
            return
        for key in keys:
            rid = key[len(KEY_PREFIX):]
            with engine.translate("listing run containers"):
                live = self.client.containers.list(all=True, filters={"label": f"io.trustcap.run={rid}"})
            if not live:
                log.warning("removing stale audit rules %s of a run that is gone", key)
                AuditRules(0, key).remove_key()

    def _cgroup_driver(self) -> str:
        if not hasattr(self, "_driver"):
            with engine.translate("reading the engine's cgroup driver"):
                self._driver = str(self.client.info().get("CgroupDriver", ""))
        return self._driver

    @staticmethod
    def _count_forks(spec: IsolationSpec, cgroup: RunCgroup,
                     violations: dict[tuple[str, str, str], int]) -> None:
        denied = cgroup.forks_denied()
        if denied:
            key = ("pids", f"process creation beyond pids limit {spec.pids_limit}", "cgroup")
            violations[key] = max(denied, violations.get(key, 0))

    def _start_sandbox(self, run_id: str, capsule_settings: dict[str, Any]) -> Any:
        s = dict(capsule_settings)
        s.pop("cgroup_parent", None)
        s["pids_limit"] = 4
        s.update(image=self.sandbox_image, command=["sleep", "infinity"], network_mode="none",
                 labels={"io.trustcap.run": run_id}, working_dir="/")
        s.pop("mounts", None)
        s.pop("tmpfs", None)
        with engine.translate("starting the network sandbox"):
            box = self.client.containers.run(name=f"trustcap-net-{run_id}", detach=True, **s)
            box.reload()
        return box

    def _supervise(self, spec: IsolationSpec, container: Any, violations: dict[tuple[str, str, str], int],
                   wall0: float, cgroup: RunCgroup | None) -> tuple[str, int | None]:
        if self._stop_requested() is not None:  # asked to stop before the first instruction ran
            return "killed-by-policy", None
        with engine.translate("starting the capsule container"):
            container.start()
        start = self.clock()
        killed: str | None = None
        # Short runs end within the first few checks: start at 10 ms and back off to _POLL_S, so that a
        # quick capsule is not kept waiting for a full poll interval after it exited.
        pause = 0.01
        while True:
            with engine.translate("watching the capsule container"):
                container.reload()
            state = container.attrs["State"]
            if cgroup is not None:
                self._count_forks(spec, cgroup, violations)
            if state["Status"] in ("exited", "dead"):
                break
            if killed is None:
                if self.clock() - start > spec.timeout_s:
                    killed = "timeout"
                elif self._stop_requested() is not None or (
                        spec.on_violation == "stop" and self._has_violation(violations, wall0, spec)):
                    killed = "killed-by-policy"
                if killed:
                    log.warning("killing capsule %s: %s", container.name, killed)
                    with engine.translate("killing the capsule container"):
                        with contextlib.suppress(EngineError):
                            container.kill()
            time.sleep(pause)
            pause = min(_POLL_S, pause * 2)
        code = state.get("ExitCode")
        if killed:
            return killed, code
        if state.get("OOMKilled"):
            violations[("memory", f"memory beyond limit {spec.memory_bytes} bytes", "cgroup")] = 1
            return "oom", code
        return "completed", code

    def _has_violation(self, violations: dict[tuple[str, str, str], int], wall0: float,
                       spec: IsolationSpec) -> bool:
        self._collect_audit(violations, wall0, spec)
        if self.attacher is not None:
            for v in self.attacher.violations():
                violations[(v.kind, v.attempted, v.source)] = v.count
        return bool(violations)

    def _collect_audit(self, violations: dict[tuple[str, str, str], int], wall0: float,
                       spec: IsolationSpec) -> None:
        events: list[Any] = list(self.audit.read(since=wall0 - 1.0))
        if self._stream is not None:
            events.extend(self._stream.drain())
        for ev in events:
            if isinstance(ev, FileEvent):
                found = file_violation(ev)
                if found is not None:
                    fkey = (found[0], found[1], "audit")
                    violations[fkey] = violations.get(fkey, 0) + 1
                continue
            if isinstance(ev, PidsEvent):
                if self._run_cgroup_name and self._run_cgroup_name in ev.cgroup:
                    key = ("pids", f"process creation beyond pids limit {spec.pids_limit}", "cgroup")
                    violations[key] = max(1, violations.get(key, 0))
                continue
            if self._uid is not None and ev.uid not in (-1, self._uid):
                continue  # another process's denial, not this run's
            key = (ev.kind, f"{ev.name} by {ev.comm} ({ev.exe})", "seccomp")
            violations[key] = violations.get(key, 0) + 1

    @staticmethod
    def _wipe_log(container: Any, spec: IsolationSpec) -> dict[str, Any]:
        """The capsule's stdout/stderr on the host: never written (log driver none), or Docker's json-file
        overwritten in place before the container (and the file) is removed."""
        what = "capsule stdout/stderr log"
        try:
            with engine.translate("reading the capsule's log settings"):
                container.reload()
        except EngineError as exc:
            return {"what": what, "verified": False, "error": str(exc)}
        driver = container.attrs.get("HostConfig", {}).get("LogConfig", {}).get("Type", "")
        if driver == "none":
            return {"what": what, "how": "log driver none: the streams were never written", "driver": driver,
                    "verified": not spec.keep_logs}
        path = str(container.attrs.get("LogPath") or "")
        if driver != "json-file" or not path:
            return {"what": what, "driver": driver, "verified": False,
                    "error": "log driver is neither none nor json-file with a log path: not covered"}
        proof: dict[str, Any] = overwrite_file(Path(path), what)
        return proof

    def _remove_container(self, c: Any, what: str) -> dict[str, Any]:
        from docker.errors import NotFound

        cid = c.id
        try:
            with engine.translate(f"removing the {what}"):
                c.remove(force=True, v=True)
        except EngineError as exc:
            return {"what": what, "id": cid, "verified": False, "error": str(exc)}
        try:
            self.client.containers.get(cid)
            gone = False
        except NotFound:
            gone = True
        return {"what": what, "id": cid, "how": "force-removed with its anonymous volumes (rm -fv)",
                "verified": gone}
