"""The monitor's quarantine and reboot hooks: what reaches the HPCNode and the power-cycle command."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from trustcap.errors import ConfigError
from trustcap.gateway.actions import QuarantineReporter, RebootCommand, failed_claims
from trustcap.gateway.monitor import CheckRecord


def _record(*failed: tuple[str, str]) -> CheckRecord:
    return CheckRecord(at=1.0, ok=False, failed=[{"id": i, "message": m} for i, m in failed], action="quarantine",
                       policy_digest="0x" + "00" * 32)


class FakeStore:
    def __init__(self, fail: Exception | None = None) -> None:
        self.patches: list[tuple[str, dict[str, Any]]] = []
        self.fail = fail

    def patch_status(self, name: str, body: dict[str, Any]) -> None:
        if self.fail:
            raise self.fail
        self.patches.append((name, body))


def test_quarantine_asks_the_operator_naming_every_failed_claim() -> None:
    """The gateway reports in its own sub-field and never writes the phase (decision 0113)."""
    store = FakeStore()
    rec = _record(("policy.measurements.sockets_listening.mismatch", "a new listener"),
                  ("policy.measurements.modules.mismatch", "module loaded"))
    QuarantineReporter("hpc-1", store, wall=lambda: 1_770_000_000.0)(rec)
    [(name, body)] = store.patches
    assert name == "hpc-1" and set(body["status"]) == {"quarantineRequest"}
    request = body["status"]["quarantineRequest"]
    assert request["reason"] == "MonitorCheckFailed" and request["time"] == "2026-02-02T02:40:00Z"
    assert request["message"].startswith("gateway monitor: ")
    assert "sockets_listening.mismatch" in request["message"] and "modules.mismatch" in request["message"]
    assert rec.extra["quarantined"] is True


def test_quarantine_message_fits_the_crd_bound() -> None:
    store = FakeStore()
    QuarantineReporter("hpc-1", store)(_record(*[(f"claim.{i}", "x" * 200) for i in range(20)]))
    assert len(store.patches[0][1]["status"]["quarantineRequest"]["message"]) <= 1024


def test_each_failed_check_is_a_new_request() -> None:
    """So a node a person cleared is quarantined again by the next failure (the operator acts once per
    request)."""
    store, t = FakeStore(), [1_770_000_000.0]
    hook = QuarantineReporter("hpc-1", store, wall=lambda: t[0])
    hook(_record(("agent.unreachable", "gone")))
    t[0] += 7
    hook(_record(("agent.unreachable", "gone")))
    first, second = (b["status"]["quarantineRequest"] for _, b in store.patches)
    assert first != second and first["message"] == second["message"]


def test_an_api_outage_is_recorded_not_raised() -> None:
    rec = _record(("agent.unreachable", "gone"))
    QuarantineReporter("hpc-1", FakeStore(fail=OSError("connection refused")))(rec)
    assert "connection refused" in rec.extra["quarantine_error"]
    assert "quarantined" not in rec.extra


def test_reboot_runs_the_power_cycle_command_with_node_and_reason(tmp_path: Path) -> None:
    out = tmp_path / "cycled"
    hook = RebootCommand("hpc-7", f"/bin/sh -c 'echo \"$TRUSTCAP_NODE|$TRUSTCAP_REASON\" > {out}'")
    rec = _record(("policy.measurements.kernel.mismatch", "kernel changed"))
    hook(rec)
    assert out.read_text().strip() == "hpc-7|policy.measurements.kernel.mismatch: kernel changed"
    assert rec.extra["rebooted"] is True


@pytest.mark.parametrize(("command", "expected"), [
    pytest.param("/bin/sh -c 'echo relay stuck >&2; exit 3'", "exit 3: relay stuck", id="command-fails"),
    pytest.param("/nonexistent/power-cycle", "No such file", id="command-missing"),
])
def test_a_failed_reboot_is_recorded(command: str, expected: str) -> None:
    rec = _record(("x.y", "z"))
    RebootCommand("hpc-1", command)(rec)
    assert expected in rec.extra["reboot_error"] and "rebooted" not in rec.extra


def test_reboot_command_must_not_be_empty() -> None:
    with pytest.raises(ConfigError, match="--reboot-command"):
        RebootCommand("hpc-1", "   ")


def test_failed_claims_without_failures_still_says_why() -> None:
    assert failed_claims(_record()) == "check failed"
    assert os.environ.get("TRUSTCAP_NODE") is None  # the hook never leaks its variables into this process
