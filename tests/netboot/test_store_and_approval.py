"""The serve-time gate (names, approval, symlinks, digests, reporting) and the approval sources."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from nbtestkit import KERNEL, SCRIPT, Root
from prometheus_client import REGISTRY

from trustcap.errors import TrustcapError
from trustcap.netboot.approval import BootImageApproval, ManifestApproval, pin_directory
from trustcap.netboot.errors import (
    ApprovalUnavailable,
    DigestMismatch,
    NetbootError,
    NotApproved,
    PathRejected,
)
from trustcap.netboot.store import ApprovedStore, normalize_name


@pytest.mark.parametrize(("raw", "expected"), [
    pytest.param("kernel", "kernel", id="plain"),
    pytest.param("/kernel", "kernel", id="one-leading-slash"),
    pytest.param("sub/initrd", "sub/initrd", id="subdir"),
    pytest.param("a-b_c.d+e", "a-b_c.d+e", id="allowed-punctuation"),
])
def test_normalize_accepts_plain_names(raw: str, expected: str) -> None:
    assert normalize_name(raw) == expected


@pytest.mark.parametrize("raw", [
    pytest.param("../x", id="dotdot"), pytest.param("//x", id="double-slash"), pytest.param("a/../b", id="inner"),
    pytest.param("a\\b", id="backslash"), pytest.param("a\x00b", id="nul"), pytest.param("%2e%2e", id="percent"),
    pytest.param("", id="empty"), pytest.param(".hidden", id="dotfile"), pytest.param("a/", id="trailing"),
])
def test_normalize_rejects(raw: str) -> None:
    with pytest.raises(PathRejected):
        normalize_name(raw)


def _count(reason: str, protocol: str = "test") -> float:
    return REGISTRY.get_sample_value("trustcap_netboot_refused_total", {"protocol": protocol, "reason": reason}) or 0.0


def test_serves_verified_bytes(boot_root: Root) -> None:
    assert boot_root.store.fetch("kernel", "test", "c") == KERNEL
    assert boot_root.refusals == []


@pytest.mark.parametrize(("name", "exc", "reason"), [
    pytest.param("unapproved", NotApproved, "not-approved", id="not-approved"),
    pytest.param("escape", NotApproved, "not-approved", id="approved-symlink-out"),
    pytest.param("sibdir/secret", NotApproved, "not-approved", id="approved-symlinked-dir-out"),
    pytest.param("../secret", PathRejected, "path", id="dotdot"),
])
def test_refusals_are_raised_counted_and_hooked(boot_root: Root, name: str, exc: type, reason: str) -> None:
    before = _count(reason)
    with pytest.raises(exc):
        boot_root.store.fetch(name, "test", "10.0.0.9:1")
    assert _count(reason) == before + 1
    assert [(r.name, r.reason, r.client) for r in boot_root.refusals] == [(name, reason, "10.0.0.9:1")]


def test_tamper_after_approval_is_refused_every_time(boot_root: Root) -> None:
    assert boot_root.store.fetch("boot.ipxe", "test", "c") == SCRIPT
    p = boot_root.root / "boot.ipxe"
    st = p.stat()
    p.write_bytes(SCRIPT.replace(b"hi", b"ho"))  # same size
    import os

    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime
    before = _count("digest-mismatch")
    with pytest.raises(DigestMismatch, match="differs from approved"):
        boot_root.store.fetch("boot.ipxe", "test", "c")
    assert _count("digest-mismatch") == before + 1


def test_replacing_a_file_by_a_symlink_is_refused(boot_root: Root, tmp_path: Path) -> None:
    (boot_root.root / "kernel").unlink()
    (tmp_path / "k").write_bytes(KERNEL)  # the very bytes that are approved, but outside the root
    (boot_root.root / "kernel").symlink_to(tmp_path / "k")
    with pytest.raises(NotApproved, match="symlink"):
        boot_root.store.fetch("kernel", "test", "c")


def test_revocation_applies_at_the_next_request(tmp_path: Path) -> None:
    (tmp_path / "k").write_bytes(b"k")
    approved = {"k": hashlib.sha256(b"k").digest()}

    class Live:
        def approved(self) -> dict[str, bytes]:
            return dict(approved)

    store = ApprovedStore(tmp_path, Live())
    assert store.fetch("k", "test", "c") == b"k"
    approved.clear()
    with pytest.raises(NotApproved):
        store.fetch("k", "test", "c")


def test_a_broken_hook_does_not_stop_the_refusal(boot_root: Root) -> None:
    def boom(_: object) -> None:
        raise RuntimeError("reporter down")

    boot_root.store.on_refused(boom)
    with pytest.raises(NotApproved):
        boot_root.store.fetch("unapproved", "test", "c")


def test_pin_directory_pins_files_not_symlinks(boot_root: Root) -> None:
    pinned = pin_directory(boot_root.root).approved()
    assert set(pinned) == {"kernel", "boot.ipxe", "sub/initrd", "unapproved"}
    assert pinned["kernel"] == hashlib.sha256(KERNEL).digest()


@pytest.mark.parametrize(("content", "match"), [
    pytest.param("{", "cannot read JSON", id="not-json"),
    pytest.param("[]", "must be an object", id="not-object"),
    pytest.param('{"kernel": "md5:00"}', "kernel: must be sha256:<64 lowercase hex>", id="bad-digest"),
    pytest.param('{"../k": "sha256:' + "0" * 64 + '"}', "not a plain relative", id="bad-path"),
])
def test_manifest_errors_name_the_field(tmp_path: Path, content: str, match: str) -> None:
    p = tmp_path / "m.json"
    p.write_text(content)
    with pytest.raises(NetbootError, match=match):
        ManifestApproval.from_json(p)


def _bi(name: str, phase: str | None, kernel: str = "k", digest: str = "sha256:" + "1" * 64) -> dict[str, Any]:
    spec = {part: {"path": f"{name}-{part}", "digest": digest} for part in ("initrd", "ipxeScript")}
    spec["kernel"] = {"path": kernel, "digest": digest}
    return {"metadata": {"name": name}, "spec": spec, "status": {"phase": phase} if phase else {}}


def test_bootimage_approval_takes_only_approved_images() -> None:
    items = [_bi("a", "Approved"), _bi("b", "Pending", kernel="kb"), _bi("c", None, kernel="kc"),
             _bi("d", "Revoked", kernel="kd")]
    files = BootImageApproval(list_images=lambda: items).approved()
    assert set(files) == {"k", "a-initrd", "a-ipxeScript"}
    assert files["k"] == bytes.fromhex("1" * 64)


def test_bootimage_approval_skips_malformed_and_conflicting() -> None:
    bad = _bi("bad", "Approved", kernel="../etc/passwd")
    conflict = _bi("x", "Approved", kernel="k", digest="sha256:" + "2" * 64)
    files = BootImageApproval(list_images=lambda: [bad, _bi("a", "Approved"), conflict]).approved()
    assert "k" not in files and "../etc/passwd" not in files
    assert "a-initrd" in files and "x-initrd" in files


def test_bootimage_approval_unavailable_propagates() -> None:
    def down() -> list[dict[str, Any]]:
        raise ApprovalUnavailable("cannot list BootImages: connection refused")

    with pytest.raises(ApprovalUnavailable):
        BootImageApproval(list_images=down).approved()


def test_every_netboot_error_is_a_trustcap_error() -> None:
    import trustcap.netboot.errors as errors

    for name in errors.__all__:
        assert issubclass(getattr(errors, name), TrustcapError), name


def test_manifest_roundtrip(tmp_path: Path) -> None:
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"kernel": "sha256:" + hashlib.sha256(KERNEL).hexdigest()}))
    assert ManifestApproval.from_json(p).approved() == {"kernel": hashlib.sha256(KERNEL).digest()}
