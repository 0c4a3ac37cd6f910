"""Approval from the real API server: a BootImage's files are served only while its status says Approved.

The stack's kube-apiserver holds the BootImage CRD (crds/bootimage.yaml); the test creates a BootImage,
flips its status through the status subresource as the operator would, and asks the gateway's store
(through `BootImageApproval`, the same source `trustcap netboot serve --bootimages` uses) over real HTTP.
An approval also has an age there: the status's `checkedAt`, which the API server keeps (the CRD declares
it), is what netboot reads, so a stale one is refused with no operator running.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from trustcap.netboot.approval import BootImageApproval
from trustcap.netboot.http import HttpServer
from trustcap.netboot.store import ApprovedStore, Refusal

REPO = Path(__file__).resolve().parents[2]

Kubectl = Callable[..., Any]


@pytest.fixture
def bootimage(kubectl: Kubectl, tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    kubectl("apply", "-f", str(REPO / "crds" / "bootimage.yaml"))
    kubectl("wait", "--for=condition=Established", "crd/bootimages.trustcap.io", "--timeout=30s")
    name = f"nb-e2e-{os.getpid()}"
    root = tmp_path / "root"
    files = {"vmlinuz": b"kernel bytes", "initrd.img": b"initrd bytes", "boot.ipxe": b"#!ipxe\n"}
    spec = {}
    for part, fname in (("kernel", "vmlinuz"), ("initrd", "initrd.img"), ("ipxeScript", "boot.ipxe")):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / fname).write_bytes(files[fname])
        spec[part] = {"path": f"{name}/{fname}", "digest": "sha256:" + hashlib.sha256(files[fname]).hexdigest()}
    manifest = {"apiVersion": "trustcap.io/v1alpha1", "kind": "BootImage", "metadata": {"name": name},
                "spec": {"version": "e2e", **spec}}
    kubectl("apply", "-f", "-", input=json.dumps(manifest))
    try:
        yield name, root, f"{name}/vmlinuz"
    finally:
        kubectl("delete", "bootimage", name, "--ignore-not-found", "--wait=false", check=False)


def _phase(kubectl: Kubectl, name: str, phase: str, **status: Any) -> None:
    kubectl("patch", "bootimage", name, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": {"phase": phase, **status}}))


def _get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_served_only_while_approved(kubectl: Kubectl, kubeconfig: Path, bootimage: tuple[str, Path, str]) -> None:
    name, root, kernel_path = bootimage
    store = ApprovedStore(root, BootImageApproval(kubeconfig=str(kubeconfig)))
    refusals: list[Refusal] = []
    store.on_refused(refusals.append)
    server = HttpServer(store, "127.0.0.1", 0).start()
    try:
        assert _get(server.port, f"/{kernel_path}") == 403  # no status yet: pending, not served
        _phase(kubectl, name, "Approved")
        assert _get(server.port, f"/{kernel_path}") == 200
        assert _get(server.port, f"/{name}/initrd.img") == 200
        (root / kernel_path).write_bytes(b"tampered kernel")
        assert _get(server.port, f"/{kernel_path}") == 403  # approved, but the bytes changed
        (root / kernel_path).write_bytes(b"kernel bytes")
        _phase(kubectl, name, "Revoked")
        assert _get(server.port, f"/{kernel_path}") == 403  # revocation applies at the next request
    finally:
        server.stop()
    assert [r.reason for r in refusals] == ["not-approved", "digest-mismatch", "not-approved"]


def test_a_tampered_file_becomes_a_warning_event_on_the_hpcnode(
    kubectl: Kubectl, kubeconfig: Path, bootimage: tuple[str, Path, str]
) -> None:
    from trustcap.netboot.events import KubeEventReporter

    name, root, kernel_path = bootimage
    node = f"{name}-node"
    _phase(kubectl, name, "Approved")
    store = ApprovedStore(root, BootImageApproval(kubeconfig=str(kubeconfig)))
    reporter = KubeEventReporter(node, kubeconfig=str(kubeconfig))
    store.on_refused(reporter)
    server = HttpServer(store, "127.0.0.1", 0).start()
    try:
        (root / kernel_path).write_bytes(b"tampered kernel")
        assert _get(server.port, f"/{kernel_path}") == 403
        reporter.flush()
        out = kubectl("get", "events", "-n", "default", "--field-selector", f"involvedObject.name={node}",
                      "-o", "json").stdout
        events = json.loads(out)["items"]
        assert [(e["type"], e["reason"], e["involvedObject"]["kind"]) for e in events] == \
            [("Warning", "BootFileTampered", "HPCNode")]
        assert kernel_path in events[0]["message"]
    finally:
        server.stop()
        reporter.close()
        kubectl("delete", "events", "-n", "default", "--field-selector", f"involvedObject.name={node}", check=False)


def test_an_approval_older_than_the_maximum_is_refused_naming_image_and_age(
    kubectl: Kubectl, kubeconfig: Path, bootimage: tuple[str, Path, str]
) -> None:
    """Issue 12 item 13: the operator dates each chain read in status.checkedAt; a status it stopped
    dating (the operator down, the RPC unreachable) is not served once older than the maximum, and the
    refusal names the image and the age. Control: the same image dated a moment ago is served."""
    from prometheus_client import REGISTRY

    from trustcap.forms import rfc3339

    name, root, kernel_path = bootimage
    store = ApprovedStore(root, BootImageApproval(kubeconfig=str(kubeconfig), max_age_s=600))
    refusals: list[Refusal] = []
    store.on_refused(refusals.append)
    server = HttpServer(store, "127.0.0.1", 0).start()

    def refused() -> float:
        return REGISTRY.get_sample_value("trustcap_netboot_refused_total",
                                         {"protocol": "http", "reason": "not-approved"}) or 0.0

    try:
        _phase(kubectl, name, "Approved", checkedAt=rfc3339(time.time() - 5))
        assert _get(server.port, f"/{kernel_path}") == 200  # control: a fresh approval is served
        stale_at = rfc3339(time.time() - 900)
        _phase(kubectl, name, "Approved", checkedAt=stale_at)
        stored = json.loads(kubectl("get", "bootimage", name, "-o", "json").stdout)["status"]
        assert stored["checkedAt"] == stale_at, "the API server dropped status.checkedAt: apply crds/bootimage.yaml"
        before = refused()
        assert _get(server.port, f"/{kernel_path}") == 403
        assert refused() == before + 1
        assert [r.reason for r in refusals] == ["not-approved"]
        detail = refusals[0].detail
        assert f"BootImage {name}'s approval is" in detail and "s old" in detail, detail
        assert "maximum of 600 s" in detail
        age = int(detail.split("approval is ")[1].split(" s old")[0])
        assert 900 <= age < 960, detail
        _phase(kubectl, name, "Approved", checkedAt=rfc3339(time.time()))  # the operator read the chain again
        assert _get(server.port, f"/{kernel_path}") == 200
    finally:
        server.stop()
