"""BootImage status from the chain's answer (decision 0063): the pure decision, table-driven, and the timer
handler with our own NodeRegistry reader faked (never the RPC layer; a tripwire fails any real call).

Frozen clock; the chain answer is (approved, history); None means the chain could not be asked.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
import pytest

from trustcap.bootimage import image_id_of_spec
from trustcap.chain.bootimages import ApprovalHistory
from trustcap.chain.errors import RpcUnavailable
from trustcap.operator import bootimage as bi

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)
BOOT = "sha256:" + "44" * 32
SPEC: dict[str, Any] = {
    "kernel": {"path": "vmlinuz", "digest": "sha256:" + "11" * 32},
    "initrd": {"path": "initrd.img", "digest": "sha256:" + "22" * 32},
    "ipxeScript": {"path": "boot.ipxe", "digest": "sha256:" + "33" * 32},
    "bootDigest": BOOT,
}
IID = "0x" + image_id_of_spec(SPEC).hex()
TX1 = "0x" + "a1" * 32
NEVER = ApprovalHistory(ever_approved=False, latest_approval_tx=None)
ONCE = ApprovalHistory(ever_approved=True, latest_approval_tx=TX1)


def _apply(status: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(status)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


# What the controller itself writes for an approved image: the starting point of the later steps.
APPROVED_STATUS = _apply({}, bi.decide(SPEC, {}, generation=1, approved=True, history=ONCE, now=NOW).patch)

@pytest.mark.parametrize(("status", "approved", "history", "phase", "reason", "on_chain"), [
    pytest.param({}, False, NEVER, "Pending", bi.REASON_AWAITING_CHAIN_APPROVAL, False, id="new-not-approved"),
    pytest.param({}, True, ONCE, "Approved", bi.REASON_APPROVED_ON_CHAIN, True, id="new-approved"),
    pytest.param({"phase": "Pending", "imageId": IID}, True, ONCE, "Approved", bi.REASON_APPROVED_ON_CHAIN, True,
                 id="pending-then-approved"),
    pytest.param(APPROVED_STATUS, False, ONCE, "Revoked", bi.REASON_REVOKED_ON_CHAIN, False,
                 id="approved-then-revoked"),
    pytest.param(APPROVED_STATUS, False, NEVER, "Revoked", bi.REASON_REVOKED_ON_CHAIN, False,
                 id="revoked-before-the-scanned-blocks"),
    pytest.param({}, False, ONCE, "Revoked", bi.REASON_REVOKED_ON_CHAIN, False,
                 id="first-seen-after-revocation"),
    pytest.param({"phase": "Approved"}, False, NEVER, "Pending", bi.REASON_AWAITING_CHAIN_APPROVAL, False,
                 id="approved-by-hand-but-never-on-chain"),
    pytest.param({"phase": "Revoked", "imageId": IID}, True, ONCE, "Approved", bi.REASON_APPROVED_ON_CHAIN, True,
                 id="re-approved"),
])
def test_chain_answer_sets_phase(status: dict[str, Any], approved: bool, history: ApprovalHistory, phase: str,
                                 reason: str, on_chain: bool) -> None:
    d = bi.decide(SPEC, status, generation=1, approved=approved, history=history, now=LATER)
    new = _apply(status, d.patch)
    assert new["phase"] == phase
    assert new["approvedOnChain"] is on_chain
    assert new["imageId"] == IID
    assert new["observedGeneration"] == 1
    (ready,) = new["conditions"]
    assert (ready["type"], ready["reason"]) == ("Ready", reason)
    assert ready["status"] == ("True" if on_chain else "False")
    if on_chain:
        assert new["imageDigest"] == BOOT, "Approved carries the digest quotes must carry"
        assert new["approvalTx"] == TX1
        assert d.warning is None
    else:
        assert "imageDigest" not in new and "approvalTx" not in new, "a digest not approved is never published"
        assert IID in ready["message"], "the message names the id to approve"
        assert d.warning == (reason, ready["message"]), "Ready going False is mirrored by a Warning"


def test_pending_message_says_who_must_do_what() -> None:
    d = bi.decide(SPEC, {}, generation=1, approved=False, history=NEVER, now=NOW)
    assert d.patch["conditions"][0]["message"] == (
        f"image id {IID} is not approved on chain: the NodeRegistry owner must call approveBootImage({IID})")


def test_same_answer_twice_writes_nothing() -> None:
    d = bi.decide(SPEC, APPROVED_STATUS, generation=1, approved=True, history=None, now=LATER)
    assert d.patch == {} and d.warning is None


def test_a_repeated_revocation_keeps_the_transition_time_and_warns_once() -> None:
    first = bi.decide(SPEC, APPROVED_STATUS, generation=1, approved=False, history=ONCE, now=NOW)
    revoked = _apply(APPROVED_STATUS, first.patch)
    again = bi.decide(SPEC, revoked, generation=1, approved=False, history=None, now=LATER)
    assert again.patch == {} and again.warning is None
    assert revoked["conditions"][0]["lastTransitionTime"] == "2025-03-01T12:00:00Z"


@pytest.mark.parametrize("status", [
    pytest.param(APPROVED_STATUS, id="approved"),
    pytest.param({"phase": "Revoked", "imageId": IID}, id="revoked"),
    pytest.param({}, id="new"),
])
def test_unreachable_chain_changes_nothing(status: dict[str, Any]) -> None:
    d = bi.decide(SPEC, status, generation=1, approved=None, history=None, now=LATER)
    assert d.patch == {} and d.warning is None


@pytest.mark.parametrize(("spec", "needle"), [
    pytest.param({k: v for k, v in SPEC.items() if k != "bootDigest"}, "spec.bootDigest: missing", id="no-boot-digest"),
    pytest.param({**SPEC, "bootDigest": "sha256:xyz"}, "spec.bootDigest", id="bad-boot-digest"),
])
def test_spec_without_a_usable_boot_digest_is_pending_naming_the_field(spec: dict[str, Any], needle: str) -> None:
    # even a status that said Approved loses it: the chain cannot have approved an id that cannot be computed
    d = bi.decide(spec, APPROVED_STATUS, generation=1, approved=None, history=None, now=LATER)
    new = _apply(APPROVED_STATUS, d.patch)
    assert new["phase"] == "Pending" and new["approvedOnChain"] is False
    assert not {"imageDigest", "imageId", "approvalTx"} & set(new)
    assert new["conditions"][0]["reason"] == bi.REASON_INVALID_SPEC
    assert needle in new["conditions"][0]["message"]


@pytest.mark.parametrize(("status", "approved", "expected"), [
    pytest.param(APPROVED_STATUS, True, False, id="approved-and-known"),
    pytest.param({**APPROVED_STATUS, "approvalTx": None}, True, True, id="approved-tx-unknown"),
    pytest.param({"phase": "Pending", "imageId": IID}, True, True, id="newly-approved"),
    pytest.param({"phase": "Pending", "imageId": IID}, False, True, id="pending-rechecks-history"),
    pytest.param({"phase": "Revoked", "imageId": IID}, False, False, id="revoked-and-known"),
    pytest.param({"phase": "Revoked", "imageId": "0x" + "00" * 32}, False, True, id="other-image-id"),
])
def test_events_are_read_only_when_the_status_disagrees(status: dict[str, Any], approved: bool,
                                                         expected: bool) -> None:
    assert bi.needs_history(status, IID, approved) is expected


class FakeRegistry:
    """Our own NodeRegistry reader, faked: `answer` is what approvedBootImage returns, or an exception."""

    def __init__(self, answer: bool | Exception, history: ApprovalHistory = ONCE) -> None:
        self.answer, self._history, self.calls = answer, history, []  # type: list[str]

    def is_approved(self, image_id: bytes) -> bool:
        self.calls.append("is_approved")
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def history(self, image_id: bytes) -> ApprovalHistory:
        self.calls.append("history")
        return self._history


def _run(monkeypatch: pytest.MonkeyPatch, registry: FakeRegistry, status: dict[str, Any]) -> kopf.Patch:
    monkeypatch.setattr(kopf, "warn", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no event expected")))
    patch = kopf.Patch()
    bi.sync_bootimage(spec=SPEC, status=status, meta={"generation": 1}, body={}, patch=patch,
                      logger=bi.log, memo=kopf.Memo(bootimage_registry=registry))  # type: ignore[arg-type]
    return patch


def test_handler_keeps_the_status_when_the_rpc_is_down(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    reg = FakeRegistry(RpcUnavailable("read approvedBootImage: the chain RPC endpoint did not answer"))
    patch = _run(monkeypatch, reg, APPROVED_STATUS)
    assert dict(patch) == {}
    assert "keeping the BootImage status (phase Approved)" in caplog.text


def test_handler_approves_and_reads_the_approval_tx(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = FakeRegistry(True)
    patch = _run(monkeypatch, reg, {})
    assert reg.calls == ["is_approved", "history"]
    assert patch.status["phase"] == "Approved" and patch.status["approvalTx"] == TX1
    assert patch.status["imageDigest"] == BOOT


def test_handler_skips_the_event_scan_when_nothing_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = FakeRegistry(True)
    dated = {**APPROVED_STATUS, "checkedAt": bi.rfc3339(bi.utcnow().timestamp())}  # confirmed just now
    patch = _run(monkeypatch, reg, dated)
    assert reg.calls == ["is_approved"] and dict(patch) == {}
    patch = _run(monkeypatch, FakeRegistry(True), APPROVED_STATUS)  # undated: the read dates it, nothing else
    assert dict(patch) == {"status": {"checkedAt": patch["status"]["checkedAt"]}}


def test_handler_does_nothing_without_chain_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    memo = kopf.Memo(bootimage_registry=None)
    assert bi._configured(memo=memo) is False and bi._configured(memo=kopf.Memo(bootimage_registry=object()))
    patch = kopf.Patch()
    bi.sync_bootimage(spec=SPEC, status={}, meta={"generation": 1}, body={}, patch=patch,
                      logger=bi.log, memo=memo)  # type: ignore[arg-type]
    assert dict(patch) == {}
