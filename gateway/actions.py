"""What the gateway's monitor does beyond stopping the run: quarantine the node, reboot the HPC.

The monitor decides an action per failed check from the policy (`report | stop | reboot | quarantine`);
`stop` reaches the agent over the channel, and `reboot` and `quarantine` stop the run first as well. The
two hooks here take the rest of the way:

    Monitor check fails ──► action "quarantine" ──► QuarantineReporter ──► HPCNode status
                                                     quarantineRequest{reason, message = every failed
                                                     claim, time}; the operator then sets phase
                                                     Quarantined (sticky: only a person clears it)
                         ──► action "reboot" ─────► boot.Rebooter (the reboot wipe, decision 0049), which
                                                     runs RebootCommand: the deployment's power-cycle
                                                     command (GPIO relay, IPMI, Wake-on-LAN; in the lab a
                                                     qemu reset), with TRUSTCAP_NODE and TRUSTCAP_REASON

A hook that fails is recorded in the check record (`extra`) and logged; it never stops the monitoring.
The gateway never writes `status.phase` (decision 0113): it reports, in its own sub-field, and the
operator, the one writer of trust, turns each new report into Quarantined.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from typing import Any, Protocol

from trustcap.errors import ConfigError
from trustcap.forms import rfc3339
from trustcap.gateway.errors import GatewayError
from trustcap.gateway.monitor import CheckRecord

__all__ = ["REASON_MONITOR_CHECK_FAILED", "QuarantineReporter", "RebootCommand", "failed_claims"]

log = logging.getLogger("trustcap.gateway")
_REASON_MAX = 1024  # crds/hpcnode.yaml: status.quarantineRequest.message (and quarantineReason) maxLength
REASON_MONITOR_CHECK_FAILED = "MonitorCheckFailed"


class StatusStore(Protocol):
    def patch_status(self, name: str, body: dict[str, Any]) -> None: ...


def failed_claims(rec: CheckRecord, limit: int = _REASON_MAX) -> str:
    """Every failed claim of a check, `id: message; ...`, cut to fit the CRD's bound."""
    text = "; ".join(f"{f.get('id', '?')}: {f.get('message', '')}" for f in rec.failed) or "check failed"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class QuarantineReporter:
    """Monitor hook for `quarantine`: ask the operator to quarantine the node, naming every failed claim.

    Each failed check is one new request (its time differs), so a node a person cleared is quarantined
    again by the next failure, as before; the operator acts on each request once (`quarantineChecked`)."""

    def __init__(self, node: str, store: StatusStore, *, wall: Callable[[], float] = time.time) -> None:
        self.node = node
        self.store = store
        self.wall = wall

    def __call__(self, rec: CheckRecord) -> None:
        reason = failed_claims(rec, _REASON_MAX - len("gateway monitor: "))
        body = {"status": {"quarantineRequest": {"reason": REASON_MONITOR_CHECK_FAILED,
                                                 "message": f"gateway monitor: {reason}",
                                                 "time": rfc3339(self.wall())}}}
        try:
            self.store.patch_status(self.node, body)
        except Exception as exc:  # the API being down must not stop monitoring; the record says it
            rec.extra["quarantine_error"] = str(exc)
            log.error("could not quarantine HPCNode %s: %s", self.node, exc)
            return
        rec.extra["quarantined"] = True  # asked for: the operator sets the phase within its next timer tick
        log.warning("HPCNode %s quarantined (reported to the operator): %s", self.node, reason)


class RebootCommand:
    """Monitor hook for `reboot`: run the deployment's power-cycle command for this HPC.

    The HPC then PXE-boots a fresh approved image from this gateway and must enrol again with a new
    one-time token: the strongest clean (docs/design.md, verified wipe). The command is the deployment's
    (a relay on the Pi's GPIO, IPMI, Wake-on-LAN); it gets TRUSTCAP_NODE and TRUSTCAP_REASON.
    """

    def __init__(self, node: str, command: str, *, timeout_s: float = 120.0) -> None:
        self.node = node
        self.argv = shlex.split(command)
        if not self.argv:
            raise ConfigError("--reboot-command is empty: give the command that power-cycles this HPC")
        self.timeout_s = timeout_s

    def run(self, reason: str) -> None:
        """Power-cycle now; GatewayError says why the command failed."""
        env = dict(os.environ, TRUSTCAP_NODE=self.node, TRUSTCAP_REASON=reason)
        try:
            proc = subprocess.run(self.argv, env=env, capture_output=True, text=True, timeout=self.timeout_s,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise GatewayError(f"reboot command {self.argv[0]!r} failed: {exc}") from exc
        if proc.returncode != 0:
            raise GatewayError(f"reboot command {self.argv[0]!r} failed: exit {proc.returncode}: "
                               f"{proc.stderr.strip()[-300:]}")
        log.warning("HPC %s power-cycled by %s", self.node, self.argv[0])

    def __call__(self, rec: CheckRecord) -> None:
        """Monitor hook without a Rebooter (no token file): power-cycle only; the record says how it went."""
        try:
            self.run(failed_claims(rec))
        except GatewayError as exc:
            rec.extra["reboot_error"] = str(exc)
            log.error("%s", exc)
            return
        rec.extra["rebooted"] = True
