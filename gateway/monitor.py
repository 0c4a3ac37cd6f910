"""Continuous monitoring of the HPC at unpredictable times (seed Task 5), with actions on failure.

    Monitor (gateway)                     AttestationServer            agent
      | sleep ~ Exp(mean), >= floor           |                          |
      | nonce = registry.issue() ------------>| quote{nonce} ----------> | measure, sign
      |<------------- SignedQuote ------------|<-------------------------|
      | appraise (sig, nonce once, identity, age) + policy check: Report naming every failed claim
      | failed? action by severity: report | stop (agent kills the run) | reboot | quarantine
      | no answer? "agent.unreachable" -> its action: a silent HPC is never still trusted (CVE-2022-3500)

Intervals are exponential (memoryless): knowing when the last check ran tells nothing about the next.
`check_once()` is the unit the loop repeats, and what tests drive with a frozen clock.

What is kept where (issue 4: records must never be lost to the in-memory bound):
- every record goes to each sink *before* it enters memory: `JournalSink` appends it as one JSON line
  (fsynced) to a journal file that rotates by size (`path`, `path.1` ... `path.N`; the oldest beyond N
  is deleted, the only place records are ever dropped, and only after N+1 files of them);
- the Prometheus counter `trustcap_gateway_monitor_checks_total{outcome, action}` counts every check
  (outcome: passed | failed | unreachable | booting), and `..._sink_failures_total` counts exports that failed;
- `Monitor.records` keeps only the latest `keep` records (default 1000) for the relay's trust status.
A sink that fails is logged and counted and never stops monitoring.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from trustcap.evidence import NonceRegistry, Report, Severity, appraise_quote, check_policy
from trustcap.gateway.errors import GatewayError, QuoteRejected
from trustcap.gateway.policy import GatewayPolicy
from trustcap.gateway.server import AttestationServer

__all__ = ["CHECKS", "CheckRecord", "JournalSink", "Monitor"]

log = logging.getLogger("trustcap.gateway")

CHECKS = Counter("trustcap_gateway_monitor_checks_total",
                 "Monitor checks of the HPC, by outcome (passed, failed, unreachable, booting) and action taken.",
                 ["outcome", "action"])
SINK_FAILURES = Counter("trustcap_gateway_monitor_sink_failures_total",
                        "Check records a sink (journal, publisher) failed to export.")
STOP_FAILURES = Counter("trustcap_gateway_monitor_stop_failures_total",
                        "Stops of the HPC's run that the agent did not confirm (escalated to quarantine).")


@dataclass
class CheckRecord:
    at: float
    ok: bool
    failed: list[dict[str, str]]
    action: str
    policy_digest: str
    quote_digest: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class JournalSink:
    """Appends each record as one JSON line to `path`, rotating by size; callable as a Monitor sink.

    Rotation keeps `backups` older files (`path.1` newest ... `path.N` oldest). Each line is flushed and
    fsynced before the record enters the monitor's memory, so a crash loses no exported record.
    """

    def __init__(self, path: str | Path, *, node_id: str, max_bytes: int = 10 * 1024 * 1024,
                 backups: int = 5) -> None:
        if max_bytes < 1024:
            raise GatewayError(f"journal max_bytes={max_bytes}: must be at least 1024")
        if backups < 1:
            raise GatewayError(f"journal backups={backups}: must be at least 1")
        self.path = Path(path)
        self.node_id = node_id
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch(mode=0o600, exist_ok=True)
        except OSError as exc:
            raise GatewayError(f"cannot open the monitor journal {self.path}: {exc.strerror}") from exc

    def __call__(self, rec: CheckRecord) -> None:
        self.write(asdict(rec))

    def write(self, entry: dict[str, Any]) -> None:
        """Append one JSON line (a check record, a signed reboot proof) durably."""
        line = (json.dumps({"node": self.node_id, **entry}, sort_keys=True, separators=(",", ":"))
                + "\n").encode()
        with self._lock:
            size = self.path.stat().st_size if self.path.exists() else 0
            if size and size + len(line) > self.max_bytes:
                self._rotate()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def _rotate(self) -> None:
        oldest = self.path.with_name(f"{self.path.name}.{self.backups}")
        oldest.unlink(missing_ok=True)
        for i in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                src.rename(self.path.with_name(f"{self.path.name}.{i + 1}"))
        self.path.rename(self.path.with_name(f"{self.path.name}.1"))

    def files(self) -> list[Path]:
        """The journal's files, oldest first (read them in this order to replay every kept record)."""
        rotated = [self.path.with_name(f"{self.path.name}.{i}") for i in range(self.backups, 0, -1)]
        return [p for p in [*rotated, self.path] if p.exists()]


class Monitor:
    def __init__(self, server: AttestationServer, policy: GatewayPolicy, *,
                 on_action: dict[str, Callable[[CheckRecord], None]] | None = None,
                 sinks: Sequence[Callable[[CheckRecord], None]] = (), keep: int = 1000,
                 rng: random.Random | None = None, wall: Callable[[], float] = time.time,
                 booting: Callable[[], bool] | None = None) -> None:
        self.server = server
        # While a boot is armed and not yet enrolled (BootArming.awaiting_boot), a missing agent is the
        # HPC booting, not an unreachable one: recorded (untrusted) but never acted on.
        self.booting = booting
        self.policy = policy
        self.rng = rng or random.SystemRandom()
        self.wall = wall
        self.nonces = NonceRegistry(policy.max_quote_age_s * 2, clock=wall)
        self.sinks = list(sinks)
        self.records: deque[CheckRecord] = deque(maxlen=keep)
        self.on_action = on_action or {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def next_interval(self) -> float:
        return float(max(self.policy.min_interval_s, float(self.rng.expovariate(1.0 / self.policy.mean_interval_s))))

    def check_once(self) -> CheckRecord:
        from trustcap.evidence import quote_digest

        if self.server.session is None and self._booting():
            return self._booting_record()
        nonce = self.nonces.issue()
        report = Report()
        qd = ""
        try:
            signed = self.server.challenge(nonce)
            qd = "0x" + quote_digest(signed.quote).hex()
            session = self.server.wait_for_agent(0)
            report = appraise_quote(signed, nonces=self.nonces, expected_nonce=nonce, node_id=self.server.node_id,
                                    agent_key=bytes.fromhex(session.enrolment.agent_key[2:]),
                                    gateway_address=self.server.root.address, now=self.wall(),
                                    max_age_seconds=self.policy.max_quote_age_s)
            report.merge(check_policy(signed.quote, self.policy.attestation))
            worst = report.max_severity
            severity = None if report.ok or worst is None else worst.name.lower()
        except QuoteRejected as exc:  # the gateway itself refused the agent's answer (bad signature, nonce)
            report.add("quote", "quote.rejected_by_gateway", Severity.CRITICAL, str(exc))
            severity = "critical"
        except GatewayError as exc:
            if self._booting():  # a reboot began while this check was in flight: its session was dropped
                return self._booting_record()
            report.add("agent", "agent.unreachable", Severity.CRITICAL, f"agent did not answer: {exc}")
            severity = "unreachable"
        action = "none" if severity is None else self.policy.actions[severity]
        rec = CheckRecord(at=self.wall(), ok=report.ok, action=action, policy_digest=self.policy.digest,
                          quote_digest=qd, failed=[{"id": f.event_id, "message": f.message} for f in report.failures])
        outcome = "passed" if rec.ok else ("unreachable" if severity == "unreachable" else "failed")
        CHECKS.labels(outcome=outcome, action=action).inc()
        self._export(rec)
        self.records.append(rec)
        if not rec.ok:
            log.warning("check failed on %s (%s): %s", self.server.node_id, action, report.summary())
            self._act(rec)
        return rec

    def _booting(self) -> bool:
        return self.booting is not None and self.booting()

    def _booting_record(self) -> CheckRecord:
        """The HPC is booting an armed boot: recorded (untrusted), never acted on."""
        rec = CheckRecord(at=self.wall(), ok=False, action="none", policy_digest=self.policy.digest,
                          failed=[{"id": "agent.booting",
                                   "message": "the HPC is booting: no agent has enrolled for the armed boot yet"}])
        CHECKS.labels(outcome="booting", action="none").inc()
        self._export(rec)
        self.records.append(rec)
        return rec

    def _export(self, rec: CheckRecord) -> None:
        """Hand the record to every sink before memory holds it (and may later drop it)."""
        for sink in self.sinks:
            try:
                sink(rec)
            except Exception as exc:  # a full disk must not stop the monitoring itself; it is counted
                SINK_FAILURES.inc()
                log.error("monitor record not exported by %s: %s", getattr(sink, "__name__", type(sink).__name__),
                          exc)

    def _act(self, rec: CheckRecord) -> None:
        unstopped = False
        if rec.action in ("stop", "quarantine", "reboot"):
            try:
                answer = self.server.command("stop", reason=f"{rec.action}: {rec.failed[0]['id']}")
            except GatewayError as exc:
                rec.extra["stop_error"] = str(exc)
                unstopped = True
            else:
                # Only the agent's word that no run is going on ends the matter: `running` false (stopped
                # now, or nothing was running). A run still going, or an answer without the field, is a stop
                # that failed (issue 12 item 20: the old agent answered `stopped: false` and nobody looked).
                if answer.get("running") is not False:
                    rec.extra["stop_error"] = f"the agent did not stop the run: it answered {answer}"
                    unstopped = True
        hook = self.on_action.get(rec.action)
        if hook is not None:
            hook(rec)
        if unstopped and rec.action == "stop":
            # A stop that cannot be confirmed escalates: the Pi quarantines the node (cuts its link and
            # reports it) rather than trusting a capsule it could not end.
            rec.extra["escalated_to"] = "quarantine"
            STOP_FAILURES.inc()
            log.error("stop on %s not confirmed (%s): escalating to quarantine", self.server.node_id,
                      rec.extra["stop_error"])
            escalate = self.on_action.get("quarantine")
            if escalate is not None:
                escalate(rec)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="trustcap-monitor", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.next_interval()):
            self.check_once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

