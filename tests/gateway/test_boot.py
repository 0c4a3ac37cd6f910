"""Per-boot tokens and the `reboot` wipe, on the real server and channel over loopback.

The power cycle is our own collaborator here: `FakePower` kills the old agent and starts a new one with a
new boot key, the way a netbooted HPC comes back (it reads the armed token from the token file, as DHCP
would hand it over). The qemu round with real dnsmasq and PXE is e2e/netboot/test_reboot_e2e.py.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
from trustcap.agent.identity import BootConfig, BootKey
from trustcap.agent.service import Agent
from trustcap.gateway.boot import REBOOT_ANNOTATION, BootArming, Rebooter, RebootRequests
from trustcap.gateway.enrol import TokenBook
from trustcap.gateway.errors import EnrolmentRefused, GatewayError

from trustcap.evidence import verify_wipe_proof
from trustcap.evidence.errors import SignatureError

BOOT = "0x" + "ab" * 32  # as tests/gateway/conftest.py's pair enrols with
MEASURED = {"kernel": "0x" + "11" * 32, "modules": "0x" + "22" * 32}  # ...and measures
Pair = Any  # conftest.Pair: imported by fixture, not by module name (other test folders have a conftest too)


def _token(path: Path) -> str:
    return path.read_text().strip()


def test_arming_writes_one_private_token_per_boot_and_clears_it_on_enrolment(tmp_path: Path) -> None:
    tokens = TokenBook([BOOT])
    path = tmp_path / "token"
    arming = BootArming(tokens, "hpc-1", path)
    first = arming.arm()
    assert _token(path) == first and stat.S_IMODE(path.stat().st_mode) == 0o600
    second = arming.arm()  # a refresh: the new one is served, the old one still enrols a boot in flight
    assert _token(path) == second != first
    tokens.enrol(first, "hpc-1", "0x02" + "11" * 32, BOOT)
    assert _token(path) == "" and arming.token is None  # enrolled: DHCP stops serving the HPC
    with pytest.raises(EnrolmentRefused, match="unknown"):
        tokens.enrol(second, "hpc-1", "0x02" + "22" * 32, BOOT)  # one boot, one enrolment


def test_refresh_is_due_at_half_the_token_lifetime() -> None:
    now = [0.0]
    tokens = TokenBook([BOOT], ttl_seconds=100)
    arming = BootArming(tokens, "hpc-1", Path("/dev/null"), clock=lambda: now[0])
    assert not arming.refresh_due()  # nothing armed
    arming.token, arming.armed_at = "t", 0.0
    now[0] = 49.9
    assert not arming.refresh_due()
    now[0] = 50.0
    assert arming.refresh_due()


def test_a_new_enrolment_retires_the_nodes_old_boot_key() -> None:
    tokens = TokenBook([BOOT])
    old, new = "0x02" + "11" * 32, "0x02" + "22" * 32
    tokens.enrol(tokens.issue("hpc-1"), "hpc-1", old, BOOT)
    tokens.enrol(tokens.issue("hpc-1"), "hpc-1", new, BOOT)
    assert tokens.lookup(old, "hpc-1") is None and tokens.lookup(new, "hpc-1") is not None
    assert tokens.revoke("hpc-1") == ([new], 0)
    assert tokens.lookup(new, "hpc-1") is None


class FakePower:
    """Stands in for the power-cycle command: the old boot ends, a new one (new key) enrols."""

    def __init__(self, pair: Pair, token_file: Path, measurements: dict[str, str] | None = None,
                 comes_back: bool = True) -> None:
        self.pair, self.token_file = pair, token_file
        self.measurements = measurements
        self.comes_back = comes_back
        self.calls: list[str] = []

    def __call__(self, reason: str) -> None:
        self.calls.append(reason)
        if not self.comes_back:
            return
        host, port = self.pair.server.address
        config = BootConfig(str(host), int(port), _token(self.token_file), BOOT, self.pair.server.root.address,
                            "hpc-1")
        agent = Agent(config, key=BootKey())
        values = dict(self.measurements or MEASURED)
        agent._measure = lambda: dict(values)  # type: ignore[method-assign]
        self.pair.serve(agent.connect())


class Store:
    def __init__(self) -> None:
        self.node: dict[str, Any] = {"metadata": {"annotations": {}}, "status": {"phase": "Enrolled"}}
        self.patches: list[dict[str, Any]] = []

    def get(self, name: str) -> dict[str, Any]:
        return self.node

    def patch_status(self, name: str, body: dict[str, Any]) -> None:
        self.patches.append(body)
        self.node["status"].update(body["status"])


def _rebooter(pair: Pair, tmp_path: Path, **kw: Any) -> tuple[Rebooter, FakePower, Store]:
    arming = BootArming(pair.server.tokens, "hpc-1", tmp_path / "token")
    power = FakePower(pair, tmp_path / "token", **kw)
    store = Store()
    rb = Rebooter(pair.server, arming, power, pair.server.root, boot_timeout_s=10, store=store)
    pair.server.on_session = rb.on_session
    rb.boot_quote(pair.server.wait_for_agent(5).enrolment.agent_key)  # the first boot's baseline
    return rb, power, store


def test_reboot_proves_a_fresh_boot_under_a_new_key(pair: Pair, tmp_path: Path) -> None:
    rb, power, store = _rebooter(pair, tmp_path)
    old_key = pair.server.session.enrolment.agent_key  # type: ignore[union-attr]
    signed = rb.reboot("test", request_id="r1")
    proof = verify_wipe_proof(signed, pair.server.root.address)
    assert power.calls == ["test"]
    assert proof["clean"] is True, proof
    assert proof["before"]["agentKey"] == old_key != proof["after"]["agentKey"]
    assert proof["checks"] == {"powerCycled": True, "newBootKey": True, "approvedImage": True, "matchesBaseline": True}
    assert proof["measurements"]["differ"] == [] and sorted(proof["measurements"]["same"]) == sorted(MEASURED)
    # The old boot key is dead: it can never reconnect without a token.
    assert pair.server.tokens.lookup(old_key, "hpc-1") is None
    # Status: Wiping while it ran, then the signed proof.
    assert store.patches[0]["status"]["phase"] == "Wiping"
    assert store.patches[0]["status"]["lastWipe"]["state"] == "InProgress"
    last = store.node["status"]["lastWipe"]
    assert (last["state"], last["clean"], last["request"]) == ("Clean", True, "r1")
    assert _token(tmp_path / "token") == ""  # the fresh boot enrolled: nothing armed any more


def test_reboot_names_measurements_that_differ_from_the_first_boot(pair: Pair, tmp_path: Path) -> None:
    rb, _, store = _rebooter(pair, tmp_path, measurements={**MEASURED, "modules": "0x" + "99" * 32})
    proof = verify_wipe_proof(rb.reboot("test"), pair.server.root.address)
    assert proof["clean"] is False and proof["checks"]["matchesBaseline"] is False
    assert proof["measurements"]["differ"] == ["modules"]
    assert "matchesBaseline" in store.node["status"]["lastWipe"]["message"]


def test_an_hpc_that_never_comes_back_is_a_failed_reboot(pair: Pair, tmp_path: Path) -> None:
    rb, _, store = _rebooter(pair, tmp_path, comes_back=False)
    rb.boot_timeout_s = 1.5
    proof = verify_wipe_proof(rb.reboot("test"), pair.server.root.address)
    assert proof["clean"] is False and proof["after"] is None
    assert "no newly enrolled agent" in proof["error"]
    assert store.node["status"]["lastWipe"]["state"] == "Failed"
    assert _token(tmp_path / "token") != ""  # still armed: the HPC may yet boot


def test_a_failing_power_command_is_recorded(pair: Pair, tmp_path: Path) -> None:
    rb, _, _ = _rebooter(pair, tmp_path)

    def broken(reason: str) -> None:
        raise GatewayError("reboot command '/usr/bin/relay' failed: exit 3")

    rb.power = broken
    proof = verify_wipe_proof(rb.reboot("test"), pair.server.root.address)
    assert proof["checks"]["powerCycled"] is False and proof["clean"] is False and "exit 3" in proof["error"]


def test_a_tampered_or_foreign_proof_is_refused(pair: Pair, tmp_path: Path, trust_root: Any) -> None:
    rb, _, _ = _rebooter(pair, tmp_path)
    signed = rb.reboot("test")
    forged = {"proof": {**signed["proof"], "clean": True, "checks": {}}, "signature": signed["signature"]}
    verify_wipe_proof(signed, pair.server.root.address)
    forged["proof"]["reason"] = "other"
    with pytest.raises(SignatureError):
        verify_wipe_proof(forged, pair.server.root.address)
    with pytest.raises(SignatureError):
        verify_wipe_proof(signed, "0x" + "00" * 20)


def test_annotation_requests_are_served_once(pair: Pair, tmp_path: Path) -> None:
    rb, power, store = _rebooter(pair, tmp_path)
    requests = RebootRequests(rb, store)
    assert requests.poll() is None  # no annotation
    store.node["metadata"]["annotations"][REBOOT_ANNOTATION] = "req-1"
    assert requests.poll() == "req-1"
    rb.join(15)
    assert requests.poll() is None  # served (status.lastWipe.request) and taken
    assert store.node["status"]["lastWipe"]["request"] == "req-1" and len(power.calls) == 1
    store.node["metadata"]["annotations"][REBOOT_ANNOTATION] = "x" * 254
    assert requests.poll() is None and len(power.calls) == 1  # too long: ignored, logged


def test_one_reboot_at_a_time(pair: Pair, tmp_path: Path) -> None:
    import threading

    rb, power, _ = _rebooter(pair, tmp_path)
    gate = threading.Event()
    rb.power = lambda reason: (gate.wait(10), power(reason))[1]  # held until the second request was made
    assert rb.request("first")
    assert not rb.request("second")  # joins the running one
    gate.set()
    rb.join(15)
    assert power.calls == ["first"]


def test_the_monitor_reboot_action_starts_one_reboot(pair: Pair, tmp_path: Path) -> None:
    import threading

    from trustcap.gateway.monitor import CheckRecord

    rb, power, _ = _rebooter(pair, tmp_path)
    gate = threading.Event()
    rb.power = lambda reason: (gate.wait(10), power(reason))[1]  # held until both checks have acted
    rec = CheckRecord(at=0.0, ok=False, failed=[{"id": "agent.unreachable", "message": "gone"}], action="reboot",
                      policy_digest="0x00")
    rb(rec)
    again = CheckRecord(at=1.0, ok=False, failed=[{"id": "agent.unreachable", "message": "gone"}], action="reboot",
                        policy_digest="0x00")
    rb(again)
    gate.set()
    rb.join(15)
    assert (rec.extra["reboot"], again.extra["reboot"]) == ("started", "already-in-progress")
    assert power.calls == ["monitor: agent.unreachable: gone"]
    assert rb.proofs[0]["proof"]["reason"] == "monitor: agent.unreachable: gone"


def test_awaiting_boot_lasts_until_enrolment_or_the_boot_timeout(tmp_path: Path) -> None:
    now = [0.0]
    tokens = TokenBook([BOOT], ttl_seconds=100)
    arming = BootArming(tokens, "hpc-1", tmp_path / "token", boot_timeout_s=300, clock=lambda: now[0])
    assert not arming.awaiting_boot()  # nothing armed: a missing agent is a lost agent
    token = arming.arm()
    now[0] = 60.0
    arming.arm(refresh=True)  # a renewed token does not restart the boot's clock
    now[0] = 299.0
    assert arming.awaiting_boot()
    now[0] = 300.0
    assert not arming.awaiting_boot()  # the boot took too long: now the policy acts
    now[0] = 10.0
    tokens.enrol(arming.token or token, "hpc-1", "0x02" + "11" * 32, BOOT)
    assert not arming.awaiting_boot()  # enrolled: the boot is over


def test_the_monitor_reports_a_booting_hpc_without_acting(trust_root: Any, tmp_path: Path, policy_yaml: Any) -> None:
    from trustcap.gateway.monitor import Monitor
    from trustcap.gateway.policy import load_gateway_policy
    from trustcap.gateway.server import AttestationServer

    path = tmp_path / "policy.yaml"
    path.write_text(policy_yaml(actions={"critical": "quarantine", "high": "quarantine", "medium": "quarantine",
                                         "unreachable": "quarantine"}))
    tokens = TokenBook([BOOT])
    server = AttestationServer(trust_root, "hpc-1", tokens)
    acted: list[str] = []
    booting = [True]
    mon = Monitor(server, load_gateway_policy(path), on_action={"quarantine": lambda r: acted.append(r.action)},
                  booting=lambda: booting[0])
    try:
        rec = mon.check_once()
        assert (rec.ok, rec.action, rec.failed[0]["id"]) == (False, "none", "agent.booting")
        assert acted == []
        booting[0] = False  # the armed boot timed out (or none was armed): a missing agent is acted on
        rec = mon.check_once()
        assert (rec.action, rec.failed[0]["id"]) == ("quarantine", "agent.unreachable") and acted == ["quarantine"]
    finally:
        server.close()


def test_a_reboot_interrupted_by_a_gateway_restart_is_closed_as_failed(pair: Pair, tmp_path: Path) -> None:
    rb, power, store = _rebooter(pair, tmp_path)
    store.node["metadata"]["annotations"][REBOOT_ANNOTATION] = "req-9"
    store.node["status"]["lastWipe"] = {"level": "Reboot", "request": "req-9", "state": "InProgress"}
    requests = RebootRequests(rb, store)
    assert requests.recover()
    last = store.node["status"]["lastWipe"]
    assert (last["state"], last["clean"], last["request"]) == ("Failed", False, "req-9")
    assert "restarted" in last["message"]
    assert requests.poll() is None and power.calls == []  # that request was served (and failed): not again
    assert not requests.recover()  # nothing left in progress


def test_a_check_in_flight_when_a_reboot_begins_is_booting_not_unreachable(pair: Pair, tmp_path: Path,
                                                                          policy_yaml: Any) -> None:
    from trustcap.gateway.monitor import Monitor
    from trustcap.gateway.policy import load_gateway_policy

    path = tmp_path / "policy.yaml"
    path.write_text(policy_yaml(actions={"critical": "quarantine", "high": "quarantine", "medium": "quarantine",
                                         "unreachable": "quarantine"}))
    booting = [False]
    acted: list[str] = []
    mon = Monitor(pair.server, load_gateway_policy(path), on_action={"quarantine": lambda r: acted.append(r.action)},
                  booting=lambda: booting[0])

    def dropped_mid_check(nonce: bytes) -> Any:
        booting[0] = True  # the Rebooter armed a boot and dropped the session while this check waited
        raise GatewayError("channel closed")

    pair.server.challenge = dropped_mid_check
    rec = mon.check_once()
    assert (rec.action, rec.failed[0]["id"]) == ("none", "agent.booting") and acted == []
    booting[0] = False  # positive control: the same failure with no boot armed is acted on
    pair.server.challenge = lambda nonce: (_ for _ in ()).throw(GatewayError("channel closed"))
    rec = mon.check_once()
    assert (rec.action, rec.failed[0]["id"]) == ("quarantine", "agent.unreachable") and acted == ["quarantine"]
