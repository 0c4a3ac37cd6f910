"""The operator is the only writer of HPCNode `status.phase` (issue 12 item 12, decision 0113): it derives
Quarantined, Wiping and Booting from what the gateway writes into its own sub-fields.

The gateway's real hooks (`QuarantineReporter`) write into a plain status the operator's real timer
(`judge_enrolment`) then reads, with the clock frozen and the indexes as plain data; nothing here reaches
a service. Real keys sign the enrolment quotes.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
import pytest

from trustcap.agent.identity import BootKey
from trustcap.evidence import encode_signed_quote, new_quote, sign_quote
from trustcap.gateway.actions import QuarantineReporter
from trustcap.gateway.monitor import CheckRecord
from trustcap.operator import hpcnode

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
NODE = "hpc-a"
APPROVED = "sha256:" + "ab" * 32
AGENT = BootKey(b"\x01" * 32)
REBOOTED = BootKey(b"\x04" * 32)
GATEWAY = BootKey(b"\x02" * 32)
INDEXES = {"trustcap_gateways": {"gw-a": [{"address": GATEWAY.address,
                                           "signingKey": "0x" + GATEWAY.public_key().hex()}]},
           "trustcap_bootimages": {"bi": [{"phase": "Approved", "imageDigest": APPROVED}]}}
SPEC = {"gateway": "gw-a", "bootImage": "bi"}


class Node:
    """The HPCNode status as the API server holds it: the gateway's patches and the operator's timer."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, status: dict[str, Any]) -> None:
        self.status = status
        self.now = NOW
        self.events: list[tuple[str, str, str]] = []
        self.monkeypatch = monkeypatch
        monkeypatch.setattr(kopf, "warn", lambda body, reason, message: self.events.append(("Warning", reason,
                                                                                             message)))
        monkeypatch.setattr(kopf, "info", lambda body, reason, message: self.events.append(("Normal", reason,
                                                                                            message)))

    def patch_status(self, name: str, body: dict[str, Any]) -> None:  # the gateway's StatusStore
        assert name == NODE and "phase" not in body["status"]
        self.status.update(body["status"])

    def tick(self, seconds: float = 2.0) -> dict[str, Any]:
        """One run of the operator's timer, `seconds` after the last; returns what it patched."""
        self.now += timedelta(seconds=seconds)
        self.monkeypatch.setattr(hpcnode.cond, "utcnow", lambda: self.now)
        patch = kopf.Patch()
        hpcnode.judge_enrolment(body={}, name=NODE, meta={"generation": 1}, spec=SPEC, status=self.status,
                                patch=patch, logger=_Logger(), **INDEXES)
        written = dict(patch.status)
        self.status.update({k: v for k, v in written.items() if v is not None})
        for k in [k for k, v in written.items() if v is None]:
            self.status.pop(k, None)
        return written

    def enrol(self, agent: BootKey = AGENT) -> None:
        """The gateway publishes a quote on the operator's current challenge (publish.py's body)."""
        nonce = self.status["enrolmentChallenge"]["nonce"]
        quote = new_quote(nonce=bytes.fromhex(nonce[2:]), issued_at=int(self.now.timestamp()), node_id=NODE,
                          gateway=GATEWAY.address, agent_key=agent.public_key(),
                          boot_image_digest=bytes.fromhex(APPROVED[7:]), measurements={"kernel": "0x" + "22" * 32},
                          capsule_state={"phase": "idle"})
        signed = sign_quote(quote, agent, GATEWAY)
        self.patch_status(NODE, {"status": {"enrolment": {
            "agentKey": quote.agent_key, "bootImageDigest": APPROVED, "gateway": GATEWAY.address,
            "quote": encode_signed_quote(signed).decode(), "time": hpcnode.cond.format_time(self.now)}}})


class _Logger:
    def info(self, *a: Any) -> None: ...

    def warning(self, *a: Any) -> None: ...


def _registered(monkeypatch: pytest.MonkeyPatch) -> Node:
    challenge = hpcnode.new_challenge(NOW - timedelta(seconds=5))
    return Node(monkeypatch, {"phase": "Registered", "enrolmentChallenge": challenge})


def _failed_check(*claims: str) -> CheckRecord:
    return CheckRecord(at=1.0, ok=False, failed=[{"id": c, "message": "bad"} for c in claims], action="quarantine",
                       policy_digest="0x" + "00" * 32)


def _ready(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "Ready")


def test_a_gateways_quarantine_request_becomes_quarantined_by_the_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    node = _registered(monkeypatch)
    node.enrol()
    node.tick()
    assert node.status["phase"] == "Enrolled"  # positive control: a healthy node is not quarantined
    reporter = QuarantineReporter(NODE, node, wall=lambda: node.now.timestamp())
    reporter(_failed_check("agent.unreachable"))
    assert node.status["phase"] == "Enrolled"  # the gateway wrote no phase...
    node.tick()
    assert node.status["phase"] == "Quarantined"  # ...the operator derived it
    assert node.status["quarantineReason"].startswith("gateway monitor: agent.unreachable")
    assert (_ready(node.status)["status"], _ready(node.status)["reason"]) == ("False", "Quarantined")
    assert node.events[-1][:2] == ("Warning", "Quarantined") and "agent.unreachable" in node.events[-1][2]


def test_only_a_person_clears_it_and_the_same_request_does_not_come_back(monkeypatch: pytest.MonkeyPatch) -> None:
    node = _registered(monkeypatch)
    reporter = QuarantineReporter(NODE, node, wall=lambda: node.now.timestamp())
    reporter(_failed_check("policy.measurements.modules.mismatch"))
    node.tick()
    assert node.status["phase"] == "Quarantined"
    for _ in range(5):  # sticky: the operator never lifts it, genuine evidence included
        node.enrol()
        node.tick()
    assert node.status["phase"] == "Quarantined"
    node.status["phase"] = "Registered"  # a person clears it
    for _ in range(3):
        assert "phase" not in node.tick()  # the request already acted on stays acted on
    node.enrol()
    node.tick()
    assert node.status["phase"] == "Enrolled"
    reporter(_failed_check("policy.measurements.modules.mismatch"))  # the gateway's next failed check
    node.tick()
    assert node.status["phase"] == "Quarantined"


def test_a_quarantine_request_holds_against_evidence_in_the_same_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    node = _registered(monkeypatch)
    node.enrol()
    QuarantineReporter(NODE, node, wall=lambda: node.now.timestamp())(_failed_check("x.y"))
    node.tick()
    assert node.status["phase"] == "Quarantined" and "agentKey" not in node.status


def test_a_reboot_wipe_is_wiping_until_the_fresh_boot_is_verified(monkeypatch: pytest.MonkeyPatch) -> None:
    node = _registered(monkeypatch)
    node.enrol()
    node.tick()
    assert node.status["phase"] == "Enrolled"
    started = hpcnode.cond.format_time(node.now + timedelta(seconds=1))
    node.now += timedelta(seconds=1)
    node.patch_status(NODE, {"status": {"lastWipe": {"level": "Reboot", "request": "r1", "state": "InProgress",
                                                     "startedAt": started}}})  # gateway/boot.py's first patch
    node.tick()
    assert node.status["phase"] == "Wiping"
    assert _ready(node.status)["reason"] == "Wiping" and "r1" in _ready(node.status)["message"]
    assert node.events[-1][:2] == ("Normal", "Wiping")
    assert "phase" not in node.tick()  # derived once, not rewritten every tick
    node.enrol(REBOOTED)  # the fresh boot, a new boot key
    node.tick()
    assert node.status["phase"] == "Enrolled" and node.status["agentKey"] == "0x" + REBOOTED.public_key().hex()
    assert "phase" not in node.tick()  # lastWipe still InProgress (proof not yet signed): stays Enrolled
    node.status["lastWipe"] = {**node.status["lastWipe"], "state": "Clean"}
    assert "phase" not in node.tick()


def test_a_quarantined_node_is_not_moved_to_wiping(monkeypatch: pytest.MonkeyPatch) -> None:
    node = _registered(monkeypatch)
    QuarantineReporter(NODE, node, wall=lambda: node.now.timestamp())(_failed_check("x.y"))
    node.tick()
    node.patch_status(NODE, {"status": {"lastWipe": {"level": "Reboot", "request": "r2", "state": "InProgress",
                                                     "startedAt": hpcnode.cond.format_time(node.now)}}})
    node.tick()
    assert node.status["phase"] == "Quarantined"


def test_evidence_waiting_for_its_references_is_booting(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Booting the gateway used to write is the operator's now: a new agent's evidence, undecided."""
    node = _registered(monkeypatch)
    node.enrol()
    monkeypatch.setitem(INDEXES, "trustcap_gateways", {})  # the Gateway not seen yet (watch lag)
    node.tick()
    assert node.status["phase"] == "Booting" and "enrolmentChecked" not in node.status
    monkeypatch.undo()
    node = Node(monkeypatch, node.status)
    node.tick()
    assert node.status["phase"] == "Enrolled"
