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

from trustcap.agent import engine, metrics
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
    """Runs capsules one at a time (an HPC executes one capsule; seccomp records are attributed by window).

    What lasts across runs lives here: the engine client, the audit reader, the wipe worker, the network
    attacher and who owns the containers. What one run knows (its uid, scratch, audit stream, cgroup,
    containers, violations and stop reason) lives in its own `_Run`, made by `run` and dropped after."""

    def __init__(self, client: Any | None = None, *, scratch_root: Path | None = DEFAULT_SCRATCH_ROOT,
                 attacher: NetworkAttacher | None = None, sandbox_image: str = SANDBOX_IMAGE,
                 audit: AuditReader | None = None, clock: Callable[[], float] = time.monotonic,
                 owner: str = "") -> None:
        self.client = client or engine.connect()
        self.scratch_root = scratch_root
        # Who this executor is on a shared engine (the agent's node name): its containers carry it, and
        # the before/after snapshot of a run looks at its own resources, not at another agent's run that
        # happens to overlap (several agents share one engine in the test world; an HPC has one)
        self.owner = owner
        self.attacher = attacher
        self.sandbox_image = sandbox_image
        self.audit = audit or AuditReader()
        self.clock = clock
        self._wiper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scratch-wipe")
        self._current: _Run | None = None
        self._driver: str | None = None

    @property
    def running(self) -> bool:
        return self._current is not None

    def request_stop(self, reason: str) -> None:
        """Stop the current run from outside (the gateway's stop action, or the gateway being lost)."""
        current = self._current
        if current is not None:
            current.stop_reason = reason

    # -- state snapshots: the post-run state must equal the pre-run state ---------------------------
    def labels(self, run_id: str) -> dict[str, str]:
        labels = {"io.trustcap.run": run_id}
        if self.owner:
            labels["io.trustcap.owner"] = self.owner
        return labels

    def snapshot(self) -> dict[str, Any]:
        """What a run could leave behind: our labelled containers and volumes, scratch dirs, loop devices."""
        with engine.translate("listing run leftovers"):
            mine = {"label": [f"io.trustcap.owner={self.owner}"]} if self.owner else {"label": "io.trustcap.run"}
            containers = sorted(c.id for c in self.client.containers.list(all=True, filters=mine))
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
        current = self._current = _Run(self, spec, should_stop=should_stop)
        try:
            return current.execute(inputs, output_limit)
        finally:
            self._current = None

    def resolve_image(self, ref: str) -> str:
        """The image id to create the container from. A `sha256:<hex>` reference must be exactly that id
        (Docker also accepts a short prefix or another form: refused); a tag is pinned to its id now."""
        with engine.translate(f"looking up image {ref}"):
            image_id = str(self.client.images.get(ref).id)
        if ref.startswith("sha256:") and (not IMAGE_ID.match(ref) or image_id != ref):
            raise AgentError(f"image {ref} resolves to {image_id}: a capsule image is named by its full id")
        return image_id

    def purge_stale_rules(self) -> None:
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

    def cgroup_driver(self) -> str:
        if self._driver is None:
            with engine.translate("reading the engine's cgroup driver"):
                self._driver = str(self.client.info().get("CgroupDriver", ""))
        return self._driver

    def wipe_in_background(self, wipe: Callable[[], dict[str, Any]]) -> Future[dict[str, Any]]:
        return self._wiper.submit(wipe)

    def start_sandbox(self, run_id: str, capsule_settings: dict[str, Any]) -> Any:
        s = dict(capsule_settings)
        s.pop("cgroup_parent", None)
        s["pids_limit"] = 4
        s.update(image=self.sandbox_image, command=["sleep", "infinity"], network_mode="none",
                 labels=self.labels(run_id), working_dir="/")
        s.pop("mounts", None)
        s.pop("tmpfs", None)
        with engine.translate("starting the network sandbox"):
            box = self.client.containers.run(name=f"trustcap-net-{run_id}", detach=True, **s)
            box.reload()
        return box

    @staticmethod
    def wipe_log(container: Any, spec: IsolationSpec) -> dict[str, Any]:
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

    def remove_container(self, c: Any, what: str) -> dict[str, Any]:
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


Violations = dict[tuple[str, str, str], int]  # (kind, attempted, source) -> count


class _Run:
    """One run, from the pre-run snapshot to the wipe proof. Everything it sets up it takes down in
    `execute`'s `finally`, in the order of the module diagram, whatever failed before."""

    def __init__(self, ex: Executor, spec: IsolationSpec, *, should_stop: Callable[[], str | None] | None) -> None:
        self.ex = ex
        self.spec = spec
        self.run_id = uuid.uuid4().hex[:12]
        self.should_stop = should_stop
        self.stop_reason: str | None = None  # set by Executor.request_stop, or learnt from should_stop
        self.uid: int | None = None
        self.stream: AuditStream | None = None
        self.cgroup: RunCgroup | None = None
        self.violations: Violations = {}
        self.reasons: list[str] = []  # why reporting was degraded
        self.wall0 = 0.0

    def stop_requested(self) -> str | None:
        if self.stop_reason is None and self.should_stop is not None:
            self.stop_reason = self.should_stop()
        return self.stop_reason

    def execute(self, inputs: Mapping[str, bytes] | None, output_limit: int) -> RunResult:
        ex, spec, run_id = self.ex, self.spec, self.run_id
        t0 = ex.clock()
        pre = ex.snapshot()
        image_id = ex.resolve_image(spec.image)
        if spec.egress and ex.attacher is None:
            raise AgentError("egress endpoints were declared but no gateway network attacher is configured")
        uid = self.uid = run_uid(spec, run_id)
        scratch = make_scratch(spec.scratch_bytes, ex.scratch_root, SCRATCH_PATH)
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
        reason, exit_code, error = "error", None, ""
        stdout = stderr = b""
        egress_report: dict[str, Any] = {}
        wipe_items: list[dict[str, Any]] = []
        ex.audit.open()
        self.wall0 = time.time()
        rules: AuditRules | None = None
        wiping: Future[dict[str, Any]] | None = None
        wipe_t0: float | None = None  # the teardown's start, for trustcap_agent_wipe_duration_seconds
        try:
            settings = spec.container_settings()
            settings["image"] = image_id
            if uid is not None and spec.user == CAPSULE_USER:
                settings["user"] = f"{uid}:{uid}"
            rules = self.start_reporting(f"{KEY_PREFIX}{run_id}")
            self.cgroup = RunCgroup.create(run_id, spec.pids_limit, ex.cgroup_driver())
            if self.cgroup is not None:  # the parent holds the limit (and keeps the count after exit)
                settings["cgroup_parent"] = self.cgroup.parent
                settings["pids_limit"] = spec.pids_limit + 1
            settings["labels"] = ex.labels(run_id)
            settings["security_opt"] = [*settings["security_opt"],
                                        f"seccomp={seccomp_profile(allow_inet=bool(spec.egress))}"]
            settings.update(scratch.docker_settings())
            if spec.egress:
                assert ex.attacher is not None
                sandbox = ex.start_sandbox(run_id, settings)
                ex.attacher.attach(run_id, int(sandbox.attrs["State"]["Pid"]), spec.egress)
                settings["network_mode"] = f"container:{sandbox.id}"
            else:
                settings["network_mode"] = "none"
            with engine.translate("creating the capsule container"):
                container = ex.client.containers.create(name=f"trustcap-run-{run_id}", **settings)
            reason, exit_code = self.supervise(container)
            if reason == "killed-by-policy" and self.stop_reason:
                error = f"stopped: {self.stop_reason}"
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
            wipe_t0 = ex.clock()
            wiping = ex.wipe_in_background(scratch.wipe)
        except AgentError as exc:
            reason, error = "error", str(exc)
            log.warning("run %s failed: %s", run_id, exc)
        finally:
            if wipe_t0 is None:
                wipe_t0 = ex.clock()
            if self.stream is not None:
                self.stream.stop()
            self.collect_audit()
            ex.audit.close()
            self.reasons.extend(self.stop_reporting(rules))
            if ex.attacher is not None and spec.egress:
                for v in ex.attacher.violations():
                    self.violations[(v.kind, v.attempted, v.source)] = max(self.violations.get(
                        (v.kind, v.attempted, v.source), 0), v.count)
                with contextlib.suppress(AgentError):
                    egress_report = ex.attacher.detach()
            if container is not None:
                wipe_items.append(ex.wipe_log(container, spec))
            for c, what in ((container, "capsule container"), (sandbox, "network sandbox container")):
                if c is not None:
                    wipe_items.append(ex.remove_container(c, what))
            if self.cgroup is not None:
                self.count_forks()
                self.cgroup.remove()
            try:
                wipe_items.append(wiping.result() if wiping is not None else scratch.wipe())
            except WipeError as exc:
                reason, error = "error", f"wipe failed: {exc}"
                wipe_items.append({"what": "scratch", "verified": False, "error": str(exc)})
        post = ex.snapshot()
        wipe = {"run_id": run_id, "level": scratch.level, "items": wipe_items,
                "images_pulled_for_run": [], "volumes_created_for_run": [],
                "pre_state_digest": pre["digest"], "post_state_digest": post["digest"],
                "state_restored": pre["digest"] == post["digest"],
                "verified": bool(wipe_items) and all(i.get("verified") is True for i in wipe_items)
                and pre["digest"] == post["digest"]}
        metrics.observe_wipe(ex.clock() - wipe_t0, verified=wipe["verified"])
        vlist = [Violation(k, a, s, n) for (k, a, s), n in sorted(self.violations.items())]
        return RunResult(reason=reason, exit_code=exit_code, violations=vlist,
                         stdout=_tail(stdout, spec.output_tail_bytes), stderr=_tail(stderr, spec.output_tail_bytes),
                         wipe=wipe, run_id=run_id, image=spec.image, seconds=round(ex.clock() - t0, 3),
                         egress=egress_report, error=error,
                         reporting={"status": "degraded" if self.reasons else "full", "reasons": self.reasons},
                         image_id=image_id, output=output, output_error=output_error)

    def start_reporting(self, key: str) -> AuditRules | None:
        """Join the audit stream, then install the run's rules; any gap becomes a stated reason."""
        audit = self.ex.audit
        audit.seccomp = True
        if self.uid is None:
            self.reasons.append("capsule user is not a numeric uid: kernel audit rules cannot name it")
            return None
        stream = AuditStream(self.uid, key)
        if not stream.start():
            self.reasons.append(stream.error)
            return None
        self.stream = stream
        audit.seccomp = False
        self.ex.purge_stale_rules()
        rules = AuditRules(self.uid, key)
        why = rules.install()
        if why:
            self.reasons.append(why)
            return None
        return rules

    def stop_reporting(self, rules: AuditRules | None) -> list[str]:
        reasons: list[str] = []
        stream, self.stream = self.stream, None
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

    def count_forks(self) -> None:
        assert self.cgroup is not None
        denied = self.cgroup.forks_denied()
        if denied:
            key = ("pids", f"process creation beyond pids limit {self.spec.pids_limit}", "cgroup")
            self.violations[key] = max(denied, self.violations.get(key, 0))

    def supervise(self, container: Any) -> tuple[str, int | None]:
        spec, clock = self.spec, self.ex.clock
        if self.stop_requested() is not None:  # asked to stop before the first instruction ran
            return "killed-by-policy", None
        with engine.translate("starting the capsule container"):
            container.start()
        start = clock()
        killed: str | None = None
        # Short runs end within the first few checks: start at 10 ms and back off to _POLL_S, so that a
        # quick capsule is not kept waiting for a full poll interval after it exited.
        pause = 0.01
        while True:
            with engine.translate("watching the capsule container"):
                container.reload()
            state = container.attrs["State"]
            if self.cgroup is not None:
                self.count_forks()
            if state["Status"] in ("exited", "dead"):
                break
            if killed is None:
                if clock() - start > spec.timeout_s:
                    killed = "timeout"
                elif self.stop_requested() is not None or (spec.on_violation == "stop" and self.has_violation()):
                    killed = "killed-by-policy"
                if killed:
                    log.warning("killing capsule %s: %s", container.name, killed)
            if killed is not None:
                # Sent again on every poll until the container has exited. A refused kill (409: it exited
                # between the reload above and the kill) is not an error of the run: the next reload sees
                # the exit. The suppress sits outside translate, which turns the engine's error into ours.
                with contextlib.suppress(EngineError), engine.translate("killing the capsule container"):
                    container.kill()
            time.sleep(pause)
            pause = min(_POLL_S, pause * 2)
        code = state.get("ExitCode")
        if killed:
            return killed, code
        if state.get("OOMKilled"):
            self.violations[("memory", f"memory beyond limit {spec.memory_bytes} bytes", "cgroup")] = 1
            return "oom", code
        return "completed", code

    def has_violation(self) -> bool:
        self.collect_audit()
        if self.ex.attacher is not None:
            for v in self.ex.attacher.violations():
                self.violations[(v.kind, v.attempted, v.source)] = v.count
        return bool(self.violations)

    def collect_audit(self) -> None:
        events: list[Any] = list(self.ex.audit.read(since=self.wall0 - 1.0))
        if self.stream is not None:
            events.extend(self.stream.drain())
        pids_key = ("pids", f"process creation beyond pids limit {self.spec.pids_limit}", "cgroup")
        cgroup_name = self.cgroup.name if self.cgroup is not None else ""
        for ev in events:
            if isinstance(ev, FileEvent):
                found = file_violation(ev)
                if found is not None:
                    fkey = (found[0], found[1], "audit")
                    self.violations[fkey] = self.violations.get(fkey, 0) + 1
                continue
            if isinstance(ev, PidsEvent):
                if cgroup_name and cgroup_name in ev.cgroup:
                    self.violations[pids_key] = max(1, self.violations.get(pids_key, 0))
                continue
            if self.uid is not None and ev.uid not in (-1, self.uid):
                continue  # another process's denial, not this run's
            key = (ev.kind, f"{ev.name} by {ev.comm} ({ev.exe})", "seccomp")
            self.violations[key] = self.violations.get(key, 0) + 1
