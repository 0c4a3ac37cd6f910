"""Trust expires where the operator grants it (issue 12 item 13, decision 0097): an Enrolled HPCNode whose
freshest verified evidence is too old, an enrolled node whose gateway applies another policy than the one
it declares, and a BootImage approval the chain has not confirmed for too long. Each attack sits beside
its passing control; the clock is frozen and the chain reader is our own wrapper, faked (a tripwire fails
any call that is not scripted)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
import pytest

from trustcap.agent.identity import BootKey
from trustcap.bootimage import image_id_of_spec
from trustcap.chain.bootimages import ApprovalHistory
from trustcap.chain.errors import RpcUnavailable
from trustcap.evidence import encode_signed_quote, new_quote, sign_quote
from trustcap.netboot.approval import BootImageApproval
from trustcap.operator import bootimage as bi
from trustcap.operator import hpcnode

NOW = datetime(2026, 12, 3, 12, 0, 0, tzinfo=UTC)
MAX_AGE = 1800.0
ACTIVE_GW = {"spec": {"trustRoot": "software"}, "status": {"phase": "Active", "reputation": 1200}}
POLICY = "sha256:" + "5e" * 32
OTHER_POLICY = "sha256:" + "66" * 32


def _at(seconds_ago: float) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _enrolled(quote_age_s: float | None, **extra: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Enrolled", "enrolmentChallenge": {"nonce": "0x" + "11" * 32,
                                                                          "issuedAt": _at(quote_age_s or 0)}}
    if quote_age_s is not None:
        status["lastQuote"] = {"time": _at(quote_age_s)}
    status.update(extra)
    return status


def _round(result: str, decided_s_ago: float, name: str = "r-1-pre") -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"result": result, "decidedAt": _at(decided_s_ago)}}


def _judge(status: dict[str, Any], *, spec: dict[str, Any] | None = None, gateway: dict[str, Any] | None = ACTIVE_GW,
           last_round: dict[str, Any] | None = None) -> tuple[dict[str, Any], tuple[str, str, str] | None]:
    patch: dict[str, Any]
    event: tuple[str, str, str] | None
    patch, event = hpcnode.trust_patch(status=status, spec=spec or {}, generation=1, gateway=gateway,
                                       last_round=last_round, now=NOW, max_age_s=MAX_AGE)
    return patch, event


def _ready(patch: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in patch["conditions"] if c["type"] == "Ready")


# -- 1. Enrolled expires ---------------------------------------------------------------------------------------

def test_a_freshly_enrolled_node_is_ready_and_stays_enrolled() -> None:  # the positive control
    patch, event = _judge(_enrolled(60))
    assert _ready(patch)["status"] == "True" and "phase" not in patch
    assert event is not None and event[:2] == ("Normal", hpcnode.REASON_TRUSTED)


def test_an_enrolment_older_than_the_maximum_is_taken_back_and_says_why() -> None:
    patch, event = _judge(_enrolled(MAX_AGE + 60))
    ready = _ready(patch)
    assert (ready["status"], ready["reason"]) == ("False", hpcnode.REASON_ENROLMENT_EXPIRED)
    assert patch["phase"] == "Registered" and patch["trustLevel"] == 0
    assert "1860 s old" in ready["message"] and "TRUSTCAP_ENROLMENT_MAX_AGE_SECONDS" in ready["message"]
    assert "verified enrolment quote" in ready["message"]
    assert event is not None and event[:2] == ("Warning", hpcnode.REASON_ENROLMENT_EXPIRED)


def test_expiry_holds_even_where_no_chain_judges_the_gateway() -> None:
    """Without a chain the enrolment's word stands, but not forever."""
    assert _judge(_enrolled(60), gateway={"spec": {}, "status": {}}) == ({}, None)  # control: left alone
    patch, _ = _judge(_enrolled(MAX_AGE + 1), gateway=None)
    assert patch["phase"] == "Registered" and _ready(patch)["reason"] == hpcnode.REASON_ENROLMENT_EXPIRED


def test_an_enrolled_node_with_no_dated_evidence_is_expired() -> None:
    patch, _ = _judge(_enrolled(None))
    assert patch["phase"] == "Registered" and "no dated evidence" in _ready(patch)["message"]


def test_a_recent_passed_round_renews_an_old_enrolment_and_a_failed_one_does_not() -> None:
    renewed, _ = _judge(_enrolled(MAX_AGE + 600), last_round=_round("Passed", 30, "r-7-during"))
    assert _ready(renewed)["status"] == "True" and "phase" not in renewed
    failed, _ = _judge(_enrolled(MAX_AGE + 600), last_round=_round("Failed", 30))
    assert failed["phase"] == "Registered" and _ready(failed)["reason"] == hpcnode.REASON_ENROLMENT_EXPIRED
    old_pass, _ = _judge(_enrolled(MAX_AGE + 600), last_round=_round("Passed", MAX_AGE + 5))
    assert old_pass["phase"] == "Registered"


def test_the_gateways_own_enrolment_time_does_not_renew_it() -> None:
    """status.enrolment.time is the gateway's word: a gateway rewriting it keeps nothing alive."""
    status = _enrolled(MAX_AGE + 60, enrolment={"time": _at(1)})
    assert _judge(status)[0]["phase"] == "Registered"


def test_the_timer_rejudges_without_any_event(monkeypatch: pytest.MonkeyPatch) -> None:
    """judge_node_trust is the kopf timer: fed the same status twice, the second tick (the clock moved
    past the maximum) takes the node back, with its Warning event."""
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(kopf, "event", lambda body, **kw: events.append(kw))
    monkeypatch.delenv("TRUSTCAP_ENROLMENT_MAX_AGE_SECONDS", raising=False)
    status = _enrolled(60)
    indexes = {"trustcap_gateway_trust": {"gw-a": [ACTIVE_GW]}, "trustcap_node_rounds": {}}

    def tick(now: datetime) -> kopf.Patch:
        monkeypatch.setattr(hpcnode.cond, "utcnow", lambda: now)
        patch = kopf.Patch()
        hpcnode.judge_node_trust(body={}, name="hpc-a", meta={"generation": 1}, spec={"gateway": "gw-a"},
                                 status=status, patch=patch, **indexes)
        return patch

    assert "phase" not in tick(NOW).status
    later = tick(NOW + timedelta(seconds=hpcnode.ENROLMENT_MAX_AGE_S))
    assert later.status["phase"] == "Registered"
    assert events[-1]["reason"] == hpcnode.REASON_ENROLMENT_EXPIRED and events[-1]["type"] == "Warning"


@pytest.mark.parametrize(("raw", "expected"), [
    pytest.param("", hpcnode.ENROLMENT_MAX_AGE_S, id="default"),
    pytest.param("90", 90.0, id="set"),
])
def test_the_maximum_age_is_an_operator_setting(monkeypatch: pytest.MonkeyPatch, raw: str, expected: float) -> None:
    monkeypatch.setenv("TRUSTCAP_ENROLMENT_MAX_AGE_SECONDS", raw)
    assert hpcnode.enrolment_max_age_s() == expected


@pytest.mark.parametrize("raw", ["0", "-5", "soon", "nan"])
def test_a_bad_maximum_age_names_the_setting(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("TRUSTCAP_ENROLMENT_MAX_AGE_SECONDS", raw)
    with pytest.raises(kopf.PermanentError, match="TRUSTCAP_ENROLMENT_MAX_AGE_SECONDS"):
        hpcnode.enrolment_max_age_s()


AGENT, GATEWAY = BootKey(b"\x01" * 32), BootKey(b"\x02" * 32)
BOOT = "sha256:" + "ab" * 32


def _evidence(nonce: str, issued: datetime) -> dict[str, Any]:
    quote = new_quote(nonce=bytes.fromhex(nonce[2:]), issued_at=int(issued.timestamp()), node_id="hpc-a",
                      gateway=GATEWAY.address, agent_key=AGENT.public_key(), boot_image_digest=bytes.fromhex(BOOT[7:]),
                      measurements={"kernel": "0x" + "22" * 32}, capsule_state={"phase": "idle"})
    signed = sign_quote(quote, AGENT, GATEWAY)
    return {"agentKey": quote.agent_key, "bootImageDigest": BOOT, "gateway": GATEWAY.address,
            "quote": encode_signed_quote(signed).decode(), "time": _at(0)}


def test_fresh_evidence_renews_an_enrolled_node_without_dropping_its_ready() -> None:
    """Re-published evidence of the same agent renews lastQuote.time (what the age counts from) and leaves
    a Trusted Ready alone; a new agent key still starts from Ready False/Enrolled (control)."""
    nonce = "0x" + "33" * 32
    trusted = [{"type": "Ready", "status": "True", "reason": "Trusted", "message": "m",
                "lastTransitionTime": _at(3000), "observedGeneration": 1}]
    status = _enrolled(MAX_AGE + 60, agentKey="0x" + AGENT.public_key().hex(), conditions=trusted,
                       enrolment=_evidence(nonce, NOW - timedelta(seconds=2)),
                       enrolmentChallenge={"nonce": nonce, "issuedAt": _at(10)})
    gw = {"address": GATEWAY.address, "signingKey": "0x" + GATEWAY.public_key().hex()}
    decision = hpcnode.decide(node_name="hpc-a", status=status, generation=1, gateway=gw,
                              boot_image={"phase": "Approved", "imageDigest": BOOT}, now=NOW)
    assert decision is not None and decision.enrolled
    assert "conditions" not in decision.status and decision.status["lastQuote"]["time"] == _at(2)
    renewed = {**status, **decision.status}
    patch, event = _judge(renewed)
    assert _ready(patch)["status"] == "True" and _ready(patch)["lastTransitionTime"] == _at(3000)  # no flap
    assert event is None and "phase" not in patch
    fresh_agent = hpcnode.decide(node_name="hpc-a", status={**status, "agentKey": "0x02" + "77" * 32}, generation=1,
                                 gateway=gw, boot_image={"phase": "Approved", "imageDigest": BOOT}, now=NOW)
    assert fresh_agent is not None and fresh_agent.status["conditions"][0]["reason"] == hpcnode.REASON_ENROLLED


# -- 4. the policy the gateway applies is the one the node declares ----------------------------------------------

@pytest.mark.parametrize("reported", [
    pytest.param(POLICY, id="same-digest"),
    pytest.param("0x" + POLICY[7:], id="same-digest-0x-form"),
])
def test_a_gateway_applying_the_declared_policy_is_ready(reported: str) -> None:  # the positive control
    status = _enrolled(60, enrolment={"policyDigest": reported})
    assert _ready(_judge(status, spec={"policy": {"digest": POLICY}})[0])["status"] == "True"


@pytest.mark.parametrize(("enrolment", "needle"), [
    pytest.param({"policyDigest": OTHER_POLICY}, "applies policy " + OTHER_POLICY, id="another-policy"),
    pytest.param({}, "reports no applied policy digest", id="not-reported"),
    pytest.param({"policyDigest": "zeros"}, "'zeros'", id="malformed"),
])
def test_a_gateway_applying_another_policy_is_not_ready(enrolment: dict[str, Any], needle: str) -> None:
    patch, event = _judge(_enrolled(60, enrolment=enrolment), spec={"policy": {"digest": POLICY}})
    ready = _ready(patch)
    assert (ready["status"], ready["reason"]) == ("False", hpcnode.REASON_POLICY_MISMATCH)
    assert needle in ready["message"] and POLICY in ready["message"]
    assert event is not None and event[0] == "Warning" and "phase" not in patch


def test_a_node_declaring_no_policy_digest_is_not_held_to_one() -> None:
    status = _enrolled(60, enrolment={"policyDigest": OTHER_POLICY})
    assert _ready(_judge(status, spec={"policy": {"wipe": "Reboot"}})[0])["status"] == "True"


# -- 2. BootImage approval expires --------------------------------------------------------------------------------

SPEC: dict[str, Any] = {
    "kernel": {"path": "vmlinuz", "digest": "sha256:" + "11" * 32},
    "initrd": {"path": "initrd.img", "digest": "sha256:" + "22" * 32},
    "ipxeScript": {"path": "boot.ipxe", "digest": "sha256:" + "33" * 32},
    "bootDigest": "sha256:" + "44" * 32,
}
IID = image_id_of_spec(SPEC)
ONCE = ApprovalHistory(ever_approved=True, latest_approval_tx="0x" + "a1" * 32)


class Registry:
    """Our NodeRegistry reader, scripted: `answer` is returned or raised; anything else is a tripwire."""

    def __init__(self) -> None:
        self.answer: Any = True

    def is_approved(self, image_id: bytes) -> bool:
        assert image_id == IID
        if isinstance(self.answer, BaseException):
            raise self.answer
        return bool(self.answer)

    def history(self, image_id: bytes) -> ApprovalHistory:
        assert image_id == IID
        return ONCE


class Cluster:
    """One BootImage whose status takes the controller's patches, ticked at chosen times."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mp = monkeypatch
        self.registry = Registry()
        self.status: dict[str, Any] = {}
        self.now = NOW
        self.warnings: list[tuple[str, str]] = []
        self.memo = kopf.Memo(bootimage_registry=self.registry, bootimage_checked_at={})
        monkeypatch.setattr(kopf, "warn", lambda body, **kw: self.warnings.append((kw["reason"], kw["message"])))
        monkeypatch.delenv("TRUSTCAP_BOOTIMAGE_MAX_AGE_SECONDS", raising=False)

    def tick(self, at: datetime) -> None:
        self.now = at  # netboot reads the status at the same moment (served)
        self.mp.setattr(bi, "utcnow", lambda: at)
        patch = kopf.Patch()
        bi.sync_bootimage(spec=SPEC, status=self.status, meta={"generation": 1, "uid": "u-1", "name": "img"},
                          body={}, patch=patch, logger=bi.log, memo=self.memo)
        for key, value in patch.status.items():
            if value is None:
                self.status.pop(key, None)
            else:
                self.status[key] = value

    def served(self) -> dict[str, bytes]:
        """What netboot serves from this status (its own reader, netboot/approval.py)."""
        item = {"metadata": {"name": "img"}, "spec": SPEC, "status": self.status}
        return dict(BootImageApproval(list_images=lambda: [item], clock=lambda: self.now.timestamp()).approved())


def test_a_short_rpc_outage_keeps_the_approval(monkeypatch: pytest.MonkeyPatch) -> None:  # the positive control
    c = Cluster(monkeypatch)
    c.tick(NOW)
    assert c.status["phase"] == "Approved" and set(c.served()) == {"vmlinuz", "initrd.img", "boot.ipxe"}
    c.registry.answer = RpcUnavailable("read approvedBootImage: the chain RPC endpoint did not answer")
    c.tick(NOW + timedelta(seconds=bi.MAX_AGE_S - 5))
    assert c.status["phase"] == "Approved" and c.served() and c.warnings == []


def test_an_approval_unconfirmed_past_the_maximum_turns_stale_and_is_not_served(
        monkeypatch: pytest.MonkeyPatch) -> None:
    c = Cluster(monkeypatch)
    c.tick(NOW)
    c.registry.answer = RpcUnavailable("read approvedBootImage: the chain RPC endpoint did not answer")
    c.tick(NOW + timedelta(seconds=60))
    c.tick(NOW + timedelta(seconds=bi.MAX_AGE_S + 1))
    assert c.status["phase"] == "Pending" and "imageDigest" not in c.status
    ready = next(x for x in c.status["conditions"] if x["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", bi.REASON_APPROVAL_STALE)
    assert "601 s ago" in ready["message"] and "RPC is unreachable" in ready["message"]
    assert "did not answer" in ready["message"] and "TRUSTCAP_BOOTIMAGE_MAX_AGE_SECONDS" in ready["message"]
    assert c.warnings == [(bi.REASON_APPROVAL_STALE, ready["message"])]
    assert c.served() == {}  # netboot serves nothing of a stale approval
    # ... and the enrolment check no longer accepts the image's digest
    report = hpcnode.Report()
    assert hpcnode._approved_digest(c.status, report) is None and "boot.image.not_approved" in report.event_ids
    # the chain answers again: approved again at the next read
    c.registry.answer = True
    c.tick(NOW + timedelta(seconds=bi.MAX_AGE_S + 10))
    assert c.status["phase"] == "Approved" and c.served()


def test_after_a_restart_the_outage_clock_starts_at_the_first_failed_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator restarted in an outage does not know when its predecessor last read the chain: the
    approval stands for one maximum age from its first failed read, then turns stale."""
    c = Cluster(monkeypatch)
    c.tick(NOW)
    c.status.pop("checkedAt")  # a status written before the operator dated its approvals
    c.memo["bootimage_checked_at"] = {}  # the restart
    c.registry.answer = RpcUnavailable("no answer")
    c.tick(NOW + timedelta(hours=5))
    assert c.status["phase"] == "Approved"
    c.tick(NOW + timedelta(hours=5, seconds=bi.MAX_AGE_S + 1))
    assert c.status["phase"] == "Pending"


def test_after_a_restart_a_recorded_check_time_dates_the_approval(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the status carries checkedAt (decision 0097 asks the CRD for it), a restarted operator in an
    outage counts from it, not from its own first failed read."""
    c = Cluster(monkeypatch)
    c.tick(NOW)
    c.memo["bootimage_checked_at"] = {}  # the restart
    c.registry.answer = RpcUnavailable("no answer")
    c.status["checkedAt"] = _at(60)  # control: recent
    c.tick(NOW)
    assert c.status["phase"] == "Approved"
    c.memo["bootimage_checked_at"] = {}
    c.status["checkedAt"] = _at(bi.MAX_AGE_S + 1)
    c.tick(NOW)
    assert c.status["phase"] == "Pending"


def test_each_approving_read_dates_the_status_with_bounded_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """netboot ages an approval by status.checkedAt (decision 0116): the operator writes it on a read that
    finds the image approved, again only after a quarter of the maximum age, and never for an image the
    chain does not approve."""
    c = Cluster(monkeypatch)
    c.tick(NOW)
    assert c.status["checkedAt"] == _at(0)
    c.tick(NOW + timedelta(seconds=bi.MAX_AGE_S / 4 - 1))
    assert c.status["checkedAt"] == _at(0)  # not rewritten every poll
    c.tick(NOW + timedelta(seconds=bi.MAX_AGE_S / 4 + 1))
    assert c.status["checkedAt"] == _at(-(bi.MAX_AGE_S / 4 + 1))
    fresh = Cluster(monkeypatch)
    fresh.registry.answer = False
    fresh.tick(NOW)
    assert "checkedAt" not in fresh.status


@pytest.mark.parametrize(("raw", "ok"), [
    pytest.param("", True, id="default"), pytest.param("120", True, id="set"),
    pytest.param("0", False, id="zero"), pytest.param("ten", False, id="not-a-number"),
])
def test_the_approval_maximum_age_is_an_operator_setting(monkeypatch: pytest.MonkeyPatch, raw: str, ok: bool) -> None:
    monkeypatch.setenv("TRUSTCAP_BOOTIMAGE_MAX_AGE_SECONDS", raw)
    if ok:
        assert bi.max_age_s() == (float(raw) if raw else bi.MAX_AGE_S)
    else:
        with pytest.raises(kopf.PermanentError, match="TRUSTCAP_BOOTIMAGE_MAX_AGE_SECONDS"):
            bi.max_age_s()
