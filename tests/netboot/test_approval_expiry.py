"""A BootImage approval expires at netboot too (issue 12 item 13, decisions 0097 and 0116).

The operator dates each chain read in `status.checkedAt` and turns a stale approval Pending itself; netboot
checks the date on every request as well, so an operator that is down (and so never turns it Pending)
does not keep a revoked image bootable. The clock is frozen; the store is the real `ApprovedStore` over
real files, so what is asserted is what a booting HPC gets: the bytes, or a refusal counted in
`trustcap_netboot_refused_total` whose message names the image and the age.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from trustcap.forms import rfc3339
from trustcap.netboot.approval import BootImageApproval
from trustcap.netboot.errors import NetbootError, NotApproved
from trustcap.netboot.store import ApprovedStore, Refusal

NOW = 1_800_000_000.0
FILES = {"vmlinuz": b"kernel bytes", "initrd.img": b"initrd bytes", "boot.ipxe": b"#!ipxe\n"}


def _image(name: str, checked_age: float | None, *, phase: str = "Approved", raw: str | None = None,
           prefix: str = "", now: float = NOW) -> dict[str, Any]:
    spec = {part: {"path": prefix + f, "digest": "sha256:" + hashlib.sha256(FILES[f]).hexdigest()}
            for part, f in (("kernel", "vmlinuz"), ("initrd", "initrd.img"), ("ipxeScript", "boot.ipxe"))}
    status: dict[str, Any] = {"phase": phase}
    if raw is not None:
        status["checkedAt"] = raw
    elif checked_age is not None:
        status["checkedAt"] = rfc3339(now - checked_age)
    return {"metadata": {"name": name}, "spec": spec, "status": status}


class Pi:
    """One store over real boot files, the BootImages it lists, and a clock the test moves."""

    def __init__(self, root: Path, **approval: Any) -> None:
        for f, data in FILES.items():
            (root / f).write_bytes(data)
        self.images: list[dict[str, Any]] = []
        self.now = NOW
        self.approval = BootImageApproval(list_images=lambda: self.images, clock=lambda: self.now, **approval)
        self.store = ApprovedStore(root, self.approval)
        self.refusals: list[Refusal] = []
        self.store.on_refused(self.refusals.append)

    def fetch(self, name: str = "vmlinuz") -> bytes:
        return self.store.fetch(name, "test-expiry", "10.0.0.2")


@pytest.fixture
def pi(tmp_path: Path) -> Pi:
    return Pi(tmp_path, max_age_s=600)


def _refused_count() -> float:
    return REGISTRY.get_sample_value("trustcap_netboot_refused_total",
                                     {"protocol": "test-expiry", "reason": "not-approved"}) or 0.0


def test_an_approval_older_than_the_maximum_is_not_served_and_the_refusal_names_image_and_age(pi: Pi) -> None:
    pi.images = [_image("hpc-boot", checked_age=60)]
    assert pi.fetch() == FILES["vmlinuz"]  # control: a fresh approval is served
    pi.now += 600 - 60 + 300  # the operator stopped dating it: now 900 s old
    before = _refused_count()
    with pytest.raises(NotApproved) as err:
        pi.fetch()
    message = str(err.value)
    assert "BootImage hpc-boot" in message and "900 s old" in message and "maximum of 600 s" in message
    assert "TRUSTCAP_BOOTIMAGE_MAX_AGE_SECONDS" in message
    assert _refused_count() == before + 1
    assert [(r.reason, r.name) for r in pi.refusals] == [("not-approved", "vmlinuz")]
    assert "900 s old" in pi.refusals[0].detail  # what the Warning event on the HPCNode says
    pi.images = [_image("hpc-boot", checked_age=5, now=pi.now)]  # the operator read the chain again
    assert pi.fetch() == FILES["vmlinuz"]


@pytest.mark.parametrize(("age", "served"), [
    pytest.param(600, True, id="exactly-the-maximum"),
    pytest.param(601, False, id="one-second-over"),
    pytest.param(-30, True, id="clock-skew-within-a-minute"),
    pytest.param(-3600, False, id="dated-an-hour-ahead"),
])
def test_the_age_boundary(pi: Pi, age: float, served: bool) -> None:
    pi.images = [_image("hpc-boot", checked_age=age)]
    if served:
        assert pi.fetch() == FILES["vmlinuz"]
    else:
        with pytest.raises(NotApproved, match="BootImage hpc-boot"):
            pi.fetch()


def test_an_unparseable_checked_at_is_not_served(pi: Pi) -> None:
    pi.images = [_image("hpc-boot", None, raw="yesterday")]
    with pytest.raises(NotApproved, match=re.escape("status.checkedAt 'yesterday' is not an RFC 3339 time")):
        pi.fetch()


def test_an_undated_approval_is_served_unless_dates_are_required(tmp_path: Path) -> None:
    """A status written without checkedAt (by hand, or by an operator that does not date it) cannot be
    aged: served by default, refused once TRUSTCAP_BOOTIMAGE_REQUIRE_CHECKED_AT is on."""
    (tmp_path / "lax").mkdir()
    lax = Pi(tmp_path / "lax", max_age_s=600)
    lax.images = [_image("hpc-boot", None)]
    assert lax.fetch() == FILES["vmlinuz"]
    (tmp_path / "strict").mkdir()
    strict = Pi(tmp_path / "strict", max_age_s=600, require_checked=True)
    strict.images = [_image("hpc-boot", None)]
    with pytest.raises(NotApproved, match=r"carries no status\.checkedAt"):
        strict.fetch()
    strict.images = [_image("hpc-boot", checked_age=1)]
    assert strict.fetch() == FILES["vmlinuz"]


def test_a_fresh_image_with_the_same_files_is_still_served(pi: Pi) -> None:
    """Staleness takes only that image's approval away: another, fresh approval of the same bytes
    serves them, and a stale image's paths that no fresh image approves are refused with its reason."""
    pi.images = [_image("old", checked_age=3600), _image("new", checked_age=10)]
    assert pi.fetch() == FILES["vmlinuz"]
    pi.images = [_image("old", checked_age=3600), _image("other", checked_age=10, prefix="x")]
    with pytest.raises(NotApproved, match="BootImage old's approval is 3600 s old"):
        pi.fetch()


def test_a_revoked_or_pending_image_is_refused_whatever_its_date(pi: Pi) -> None:
    for phase in ("Revoked", "Pending"):
        pi.images = [_image("hpc-boot", checked_age=1, phase=phase)]
        with pytest.raises(NotApproved, match="not part of any approved boot image"):
            pi.fetch()


@pytest.mark.parametrize(("env", "check"), [
    pytest.param({}, lambda a: a.max_age_s == 600 and a.require_checked is False, id="defaults"),
    pytest.param({"TRUSTCAP_BOOTIMAGE_MAX_AGE_SECONDS": "30", "TRUSTCAP_BOOTIMAGE_REQUIRE_CHECKED_AT": "1"},
                 lambda a: a.max_age_s == 30 and a.require_checked is True, id="the-operators-settings"),
])
def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                            check: Callable[[BootImageApproval], bool]) -> None:
    for k in ("TRUSTCAP_BOOTIMAGE_MAX_AGE_SECONDS", "TRUSTCAP_BOOTIMAGE_REQUIRE_CHECKED_AT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert check(BootImageApproval(list_images=list))


@pytest.mark.parametrize(("name", "value"), [
    pytest.param("TRUSTCAP_BOOTIMAGE_MAX_AGE_SECONDS", "0", id="zero-age"),
    pytest.param("TRUSTCAP_BOOTIMAGE_MAX_AGE_SECONDS", "ten", id="not-a-number"),
    pytest.param("TRUSTCAP_BOOTIMAGE_MAX_AGE_SECONDS", "inf", id="forever"),
    pytest.param("TRUSTCAP_BOOTIMAGE_REQUIRE_CHECKED_AT", "maybe", id="not-a-flag"),
])
def test_a_malformed_setting_is_refused_at_start_naming_it(monkeypatch: pytest.MonkeyPatch, name: str,
                                                           value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(NetbootError, match=name):
        BootImageApproval(list_images=list)
