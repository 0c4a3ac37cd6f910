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
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trustcap.gateway.errors import GatewayError, QuoteRejected
from trustcap.gateway.policy import GatewayPolicy
from trustcap.gateway.server import AttestationServer

from trustcap.evidence import NonceRegistry, Report, Severity, appraise_quote, check_policy

__all__ = ["CheckRecord", "Monitor"]

log = logging.getLogger("trustcap.gateway")


@dataclass
class CheckRecord:
    at: float
    ok: bool
    failed: list[dict[str, str]]
    action: str
    policy_digest: str
    quote_digest: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Monitor:
    def __init__(self, server: AttestationServer, policy: GatewayPolicy, *,
                 on_action: dict[str, Callable[[CheckRecord], None]] | None = None,
                 rng: random.Random | None = None, wall: Callable[[], float] = time.time) -> None:
        self.server = server
        self.policy = policy
        self.rng = rng or random.SystemRandom()
        self.wall = wall
        self.nonces = NonceRegistry(policy.max_quote_age_s * 2, clock=wall)
        self.records: deque[CheckRecord] = deque(maxlen=1000)
        self.on_action = on_action or {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def next_interval(self) -> float:
        return float(max(self.policy.min_interval_s, float(self.rng.expovariate(1.0 / self.policy.mean_interval_s))))

    def check_once(self) -> CheckRecord:
        from trustcap.evidence import quote_digest

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
            severity = None if report.ok else _name(report.max_severity)
        except QuoteRejected as exc:  # the gateway itself refused the agent's answer (bad signature, nonce)
            report.add("quote", "quote.rejected_by_gateway", Severity.CRITICAL, str(exc))
            severity = "critical"
        except GatewayError as exc:
            report.add("agent", "agent.unreachable", Severity.CRITICAL, f"agent did not answer: {exc}")
            severity = "unreachable"
        action = "none" if severity is None else self.policy.actions[severity]
        rec = CheckRecord(at=self.wall(), ok=report.ok, action=action, policy_digest=self.policy.digest,
                          quote_digest=qd, failed=[{"id": f.event_id, "message": f.message} for f in report.failures])
        self.records.append(rec)
        if not rec.ok:
            log.warning("check failed on %s (%s): %s", self.server.node_id, action, report.summary())
            self._act(rec)
        return rec

    def _act(self, rec: CheckRecord) -> None:
        if rec.action in ("stop", "quarantine", "reboot"):
            try:
                self.server.command("stop", reason=f"{rec.action}: {rec.failed[0]['id']}")
            except GatewayError as exc:
                rec.extra["stop_error"] = str(exc)
        hook = self.on_action.get(rec.action)
        if hook is not None:
            hook(rec)

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


def _name(sev: Severity | None) -> str:
    return sev.name.lower() if sev is not None else "low"
