"""The chart's ValidatingAdmissionPolicy against the real API server: a gateway's ServiceAccount, which
RBAC lets patch hpcnodes/status, cannot raise an HPCNode's trust (issue 12 item 12: only the operator
decides), while its own writes (enrolment, Booting, Quarantined) go through.

The attack: impersonate the gateway's ServiceAccount (the chart's own ClusterRole, rendered by the real
helm) and patch `status.phase: Ready`, or the operator's `conditions`. Refused with the policy, and, as
the control, accepted once the policy's binding is gone (so the refusal is the policy's, not RBAC's).
Everything is named after one random release, and the policy matches only that release's gateway user,
so nothing else on the shared stack is affected. Needs the stack (and its helm), not a World.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from trustcap.stack import paths

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
Kubectl = Callable[..., Any]


def _helm() -> str:
    helm = paths.bin_dir() / "helm"
    assert helm.is_file(), f"{helm} is missing: `make stack` builds helm into the tool cache"
    return str(helm)


@pytest.fixture(scope="module")
def release(kubectl: Kubectl) -> Iterator[dict[str, str]]:
    import subprocess

    name = f"vap{secrets.token_hex(3)}"
    ns = f"{name}-system"
    proc = subprocess.run(
        [_helm(), "template", name, str(ROOT), "--namespace", ns,
         "--show-only", "charts/gateway/templates/rbac.yaml", "--show-only", "templates/admissionpolicy.yaml"],
        capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # Only the cluster-scoped objects: impersonation needs no ServiceAccount object, and a namespace made
    # here would stay Terminating on a stack without a namespace controller.
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d and not d["metadata"].get("namespace")]
    assert {d["kind"] for d in docs} == {"ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy",
                                         "ValidatingAdmissionPolicyBinding"}, [d["kind"] for d in docs]
    rendered = yaml.safe_dump_all(docs)
    kubectl("apply", "-f", str(ROOT / "crds" / "hpcnode.yaml"))
    kubectl("wait", "--for=condition=Established", "crd/hpcnodes.trustcap.io", "--timeout=30s")
    node = f"{name}-node"
    info = {"name": name, "ns": ns, "node": node,
            "gateway": f"system:serviceaccount:{ns}:{name}-trustcap-gateway",
            "policy": f"{name}-trustcap-gateway-hpcnode-status"}
    try:
        kubectl("apply", "-f", "-", input=rendered)
        kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "trustcap.io/v1alpha1", "kind": "HPCNode", "metadata": {"name": node},
            "spec": {"gateway": f"{name}-gw", "mac": "02:00:00:00:00:01", "bootImage": "default"}}))
        yield info
    finally:
        kubectl("delete", "hpcnode", node, "--ignore-not-found", check=False)
        kubectl("delete", "-f", "-", "--ignore-not-found", input=rendered, check=False)


@dataclass
class Outcome:
    returncode: int
    stderr: str


@pytest.fixture(scope="module")
def clients(kubeconfig: Path, release: dict[str, str]) -> Iterator[dict[bool, Any]]:
    """The admin's client and one that impersonates the gateway's ServiceAccount. Both patch the way
    gateway/publish.py does (a merge patch of the status subresource, no read first)."""
    from kubernetes import client, config

    admin = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    gateway = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    gateway.set_default_header("Impersonate-User", release["gateway"])
    try:
        yield {False: client.CustomObjectsApi(admin), True: client.CustomObjectsApi(gateway)}
    finally:
        admin.close()
        gateway.close()


def _patch(clients: dict[bool, Any], release: dict[str, str], status: dict[str, Any], *, as_gateway: bool) -> Outcome:
    from kubernetes.client.exceptions import ApiException

    try:
        clients[as_gateway].patch_cluster_custom_object_status(
            "trustcap.io", "v1alpha1", "hpcnodes", release["node"], {"status": status}, _request_timeout=15)
    except ApiException as exc:
        return Outcome(exc.status or 1, str(exc.body))
    return Outcome(0, "")


def _phase(kubectl: Kubectl, release: dict[str, str]) -> str:
    out = kubectl("get", "hpcnode", release["node"], "-o", "jsonpath={.status.phase}").stdout
    return str(out)


def _until_enforced(clients: dict[bool, Any], release: dict[str, str]) -> Outcome:
    """The API server loads a new policy within seconds; until then an attack would pass. Wait for the
    first refusal (bounded), then the cases below run against a loaded policy."""
    deadline = time.monotonic() + 30
    while True:
        proc = _patch(clients, release, {"phase": "Ready"}, as_gateway=True)
        if proc.returncode != 0 or time.monotonic() > deadline:
            return proc
        _patch(clients, release, {"phase": "Enrolled"}, as_gateway=False)
        time.sleep(1)


def test_a_gateway_cannot_raise_trust_but_writes_its_own_fields(kubectl: Kubectl, release: dict[str, str],
                                                                clients: dict[bool, Any]) -> None:
    assert _patch(clients, release, {"phase": "Enrolled"}, as_gateway=False).returncode == 0  # the operator's move
    refused = _until_enforced(clients, release)
    assert refused.returncode != 0 and "status.phase" in refused.stderr, refused.stderr
    assert "only the operator decides trust" in refused.stderr
    assert _phase(kubectl, release) == "Enrolled"

    conditions = [{"type": "Ready", "status": "True", "reason": "Forged", "message": "by a gateway",
                   "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    forged = _patch(clients, release, {"conditions": conditions}, as_gateway=True)
    assert forged.returncode != 0 and "status.conditions" in forged.stderr, forged.stderr

    # The gateway's own writes: a fresh enrolment (phase Booting), then a failed check (Quarantined).
    assert _patch(clients, release, {"phase": "Booting"}, as_gateway=True).returncode == 0
    quarantine = {"phase": "Quarantined", "quarantineReason": "gateway monitor: pcr mismatch"}
    assert _patch(clients, release, quarantine, as_gateway=True).returncode == 0
    # ...and never out of quarantine, even to Booting; a person (admin) may clear it.
    out = _patch(clients, release, {"phase": "Booting"}, as_gateway=True)
    assert out.returncode != 0 and "never out of Quarantined" in out.stderr, out.stderr
    assert _patch(clients, release, {"phase": "Registered"}, as_gateway=False).returncode == 0


def test_without_the_policy_the_same_attack_passes(kubectl: Kubectl, release: dict[str, str],
                                                    clients: dict[bool, Any]) -> None:
    """Control: RBAC alone lets the gateway write phase Ready, so the refusal above is the policy's."""
    assert _patch(clients, release, {"phase": "Enrolled"}, as_gateway=False).returncode == 0
    kubectl("delete", "validatingadmissionpolicybinding", release["policy"])
    deadline = time.monotonic() + 30
    while _patch(clients, release, {"phase": "Ready"}, as_gateway=True).returncode != 0:
        assert time.monotonic() < deadline, "the gateway's patch stays refused without the policy binding"
        time.sleep(1)
    assert _phase(kubectl, release) == "Ready"
