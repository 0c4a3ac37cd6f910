"""Per-boot tokens and the `reboot` wipe, on the real server and channel over loopback.

The power cycle is our own collaborator here: `FakePower` kills the old agent and starts a new one with a
new boot key, the way a netbooted HPC comes back (it reads the armed token from the token file, as DHCP
would hand it over). The qemu round with real dnsmasq and PXE is e2e/netboot/test_reboot_e2e.py.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from trustcap.agent.identity import BootConfig, BootKey
from trustcap.agent.service import Agent
from trustcap.evidence import verify_wipe_proof
from trustcap.evidence.errors import SignatureError
from trustcap.gateway.boot import REBOOT_ANNOTATION, BootArming, CarrierWatch, Rebooter, RebootRequests
from trustcap.gateway.enrol import TokenBook
from trustcap.gateway.errors import EnrolmentRefused, GatewayError

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
    """Stands in for the power-cycle command: the old boot ends, a new one (new key) enrols. With `cut`,
    the link is taken down and up first, the way a power cycle drops the NIC's carrier; without it, this
    is the forgery of issue 12 item 19: HPC software that never rebooted reads the token and enrols a key."""

    def __init__(self, pair: Pair, token_file: Path, measurements: dict[str, str] | None = None,
                 comes_back: bool = True, cut: Callable[[], None] | None = None) -> None:
        self.pair, self.token_file = pair, token_file
        self.measurements = measurements
        self.comes_back = comes_back
        self.cut = cut
        self.calls: list[str] = []

    def __call__(self, reason: str) -> None:
        self.calls.append(reason)
        if not self.comes_back:
            return
        if self.cut is not None:
            self.cut()
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


def _rebooter(pair: Pair, tmp_path: Path, carrier: CarrierWatch | None = None, baseline: bool = True,
              **kw: Any) -> tuple[Rebooter, FakePower, Store]:
    arming = BootArming(pair.server.tokens, "hpc-1", tmp_path / "token")
    power = FakePower(pair, tmp_path / "token", **kw)
    store = Store()
    rb = Rebooter(pair.server, arming, power, pair.server.root, boot_timeout_s=10, store=store, carrier=carrier)
    pair.server.on_session = rb.on_session
    session = pair.server.wait_for_agent(5)
    if baseline:
        rb.boot_quote(session.enrolment.agent_key)  # the first boot's baseline
    return rb, power, store


def _sysfs_carrier(tmp_path: Path) -> tuple[CarrierWatch, Callable[[], None]]:
    """The real CarrierWatch over a sysfs of files; `cut` counts a drop and a return, as the kernel does
    (the kernel's own counter is read in the veth tests below)."""
    (tmp_path / "sys" / "pi0").mkdir(parents=True)
    counter = tmp_path / "sys" / "pi0" / "carrier_changes"
    counter.write_text("3\n")

    def cut() -> None:
        counter.write_text(f"{int(counter.read_text()) + 2}\n")

    return CarrierWatch("pi0", sysfs=tmp_path / "sys"), cut


def test_reboot_proves_a_fresh_boot_under_a_new_key(pair: Pair, tmp_path: Path) -> None:
    carrier, cut = _sysfs_carrier(tmp_path)
    rb, power, store = _rebooter(pair, tmp_path, carrier=carrier, cut=cut)
    old_key = pair.server.session.enrolment.agent_key  # type: ignore[union-attr]
    signed = rb.reboot("test", request_id="r1")
    proof = verify_wipe_proof(signed, pair.server.root.address)
    assert power.calls == ["test"]
    assert proof["clean"] is True, proof
    assert proof["before"]["agentKey"] == old_key != proof["after"]["agentKey"]
    assert proof["checks"] == {"powerCycled": True, "newBootKey": True, "approvedImage": True, "matchesBaseline": True,
                               "linkCycled": True}
    assert proof["link"] == {"iface": "pi0", "carrierChangesBefore": 3, "carrierChangesAtEnrolment": 5}
    assert not any("watched no link" in gap or "measurements" in gap for gap in proof["notCovered"])
    assert proof["measurements"]["differ"] == [] and sorted(proof["measurements"]["same"]) == sorted(MEASURED)
    # The old boot key is dead: it can never reconnect without a token.
    assert pair.server.tokens.lookup(old_key, "hpc-1") is None
    # Status: the wipe InProgress while it ran (the operator derives Wiping), then the signed proof; the
    # gateway never writes the phase (decision 0113).
    assert store.patches[0]["status"]["lastWipe"]["state"] == "InProgress"
    assert all(set(p["status"]) == {"lastWipe"} for p in store.patches), store.patches
    last = store.node["status"]["lastWipe"]
    assert (last["state"], last["clean"], last["request"]) == ("Clean", True, "r1")
    assert _token(tmp_path / "token") == ""  # the fresh boot enrolled: nothing armed any more


def test_without_a_watched_carrier_a_reboot_is_never_clean(pair: Pair, tmp_path: Path) -> None:
    """A null linkCycled is not a pass (issue 12 item 19): every other check passes here, and that alone is
    what HPC software that never rebooted can produce. The positive control is the test above."""
    rb, _, store = _rebooter(pair, tmp_path)
    proof = verify_wipe_proof(rb.reboot("test", request_id="r-unwatched"), pair.server.root.address)
    assert {k: v for k, v in proof["checks"].items() if k != "linkCycled"} == {
        "powerCycled": True, "newBootKey": True, "approvedImage": True, "matchesBaseline": True}
    assert proof["checks"]["linkCycled"] is None and proof["clean"] is False, proof
    assert any("watched no link" in gap for gap in proof["notCovered"])
    last = store.node["status"]["lastWipe"]
    assert last["state"] == "Failed" and last["message"] == "checks failed: linkCycled (no carrier watched)", last


def test_without_a_baseline_the_measurements_are_said_not_compared(pair: Pair, tmp_path: Path) -> None:
    """A gateway that started after the old boot holds no quote of it: matchesBaseline is null, the proof
    can still be clean (the new boot's image is approved and the Pi saw the carrier drop), and notCovered
    says what was not compared."""
    carrier, cut = _sysfs_carrier(tmp_path)
    rb, _, _ = _rebooter(pair, tmp_path, carrier=carrier, cut=cut, baseline=False)
    proof = verify_wipe_proof(rb.reboot("test"), pair.server.root.address)
    assert proof["checks"]["matchesBaseline"] is None and proof["clean"] is True, proof
    assert any("measurements" in gap and "no quote of the old boot" in gap for gap in proof["notCovered"])


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


# --- the carrier: what the Pi sees itself (issue 12 item 19, decision 0119) --------------------------------
@pytest.fixture
def veth() -> Iterator[tuple[str, str]]:
    """A real veth pair in a namespace of its own: (namespace, the Pi's end). The far end stands for the
    HPC's NIC; taking it down drops the carrier on the Pi's end, as a power cycle does to a cable."""
    if os.geteuid() != 0:
        print("SKIP carrier tests: network namespaces need root")
        pytest.skip("network namespaces need root")
    ns = f"tccar-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "pi0", "type", "veth", "peer", "name", "hpc0"], check=True,
                       timeout=10)
        for dev in ("pi0", "hpc0"):
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True, timeout=10)
        yield ns, "pi0"
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)


class NsCarrier(CarrierWatch):
    """The same watch, reading the counter inside the namespace (ip netns exec remounts /sys for it)."""

    def __init__(self, ns: str, iface: str) -> None:
        super().__init__(iface)
        self.ns = ns

    def changes(self) -> int:
        out = subprocess.run(["ip", "netns", "exec", self.ns, "cat", f"/sys/class/net/{self.iface}/carrier_changes"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            raise GatewayError(f"cannot read the carrier count of {self.iface}: {out.stderr.strip()}")
        return int(out.stdout.strip())


def _cut(ns: str) -> Callable[[], None]:
    def cut() -> None:
        subprocess.run(["ip", "-n", ns, "link", "set", "hpc0", "down"], check=True, timeout=10)
        subprocess.run(["ip", "-n", ns, "link", "set", "hpc0", "up"], check=True, timeout=10)
    return cut


def test_a_power_cycle_the_pi_saw_is_clean(pair: Pair, tmp_path: Path, veth: tuple[str, str]) -> None:
    """Positive control: the link drops and returns between the power command and the new enrolment."""
    ns, iface = veth
    rb, _, _ = _rebooter(pair, tmp_path, carrier=NsCarrier(ns, iface), cut=_cut(ns))
    proof = verify_wipe_proof(rb.reboot("test", request_id="r-cut"), pair.server.root.address)
    assert proof["checks"]["linkCycled"] is True and proof["clean"] is True, proof
    link = proof["link"]
    assert link["iface"] == iface and link["carrierChangesAtEnrolment"] - link["carrierChangesBefore"] >= 2
    assert not any("watched no link" in gap for gap in proof["notCovered"])


def test_a_new_key_without_the_link_dropping_is_not_a_clean_reboot(pair: Pair, tmp_path: Path,
                                                                   veth: tuple[str, str]) -> None:
    """The attack: HPC software that never rebooted reads the armed token and enrols a fresh key (what the
    proof called clean before the carrier was watched). The Pi's own count never moved: not clean."""
    ns, iface = veth
    rb, _, store = _rebooter(pair, tmp_path, carrier=NsCarrier(ns, iface))
    proof = verify_wipe_proof(rb.reboot("test", request_id="r-forged"), pair.server.root.address)
    assert proof["checks"]["newBootKey"] is True and proof["checks"]["approvedImage"] is True  # all it could forge
    assert proof["checks"]["linkCycled"] is False and proof["clean"] is False, proof
    assert proof["link"]["carrierChangesAtEnrolment"] == proof["link"]["carrierChangesBefore"]
    assert store.node["status"]["lastWipe"]["state"] == "Failed"
    assert "linkCycled" in store.node["status"]["lastWipe"]["message"]


def test_a_link_toggled_after_the_enrolment_does_not_count(pair: Pair, tmp_path: Path, veth: tuple[str, str]) -> None:
    """The count is taken at the instant the new key enrols: software that enrols first and toggles the
    link afterwards (to look like a power cycle by the time the proof is made) is still refused."""
    ns, iface = veth
    rb, power, _ = _rebooter(pair, tmp_path, carrier=NsCarrier(ns, iface))
    enrol = power.__call__

    def enrol_then_toggle(reason: str) -> None:
        enrol(reason)
        pair.server.wait_for_new_session(None, 5)
        _cut(ns)()

    rb.power = enrol_then_toggle
    proof = verify_wipe_proof(rb.reboot("test", request_id="r-late"), pair.server.root.address)
    assert proof["checks"]["linkCycled"] is False and proof["clean"] is False, proof


def test_an_unreadable_carrier_fails_the_check_by_name(pair: Pair, tmp_path: Path) -> None:
    rb, _, _ = _rebooter(pair, tmp_path, carrier=CarrierWatch("no-such-if0"))
    proof = verify_wipe_proof(rb.reboot("test", request_id="r-gone"), pair.server.root.address)
    assert proof["checks"]["linkCycled"] is False and proof["clean"] is False
    assert "carrier count of no-such-if0" in proof["error"]


@pytest.mark.parametrize("name", ["", "../etc", "a/b", ".", ".."])
def test_a_carrier_link_that_is_not_an_interface_name_is_refused(name: str) -> None:
    with pytest.raises(GatewayError, match="not an interface name"):
        CarrierWatch(name)
