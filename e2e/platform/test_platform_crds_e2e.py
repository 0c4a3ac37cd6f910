"""The CRDs on the real API server: established, discoverable by short name and category, schema served."""

from __future__ import annotations

from typing import Any

from platformkit import NAMESPACE, PSI


def test_crds_are_established(kubectl: Any, trustcap_crds: list[str]) -> None:
    assert len(trustcap_crds) == 6
    for name in trustcap_crds:
        out = kubectl("get", "crd", name, "-o", 'jsonpath={.status.conditions[?(@.type=="Established")].status}')
        assert out.stdout == "True", name


def test_api_resources_with_short_names_and_scope(kubectl: Any, trustcap_crds: list[str]) -> None:
    out = kubectl("api-resources", "--api-group=trustcap.io", "--no-headers").stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()}
    assert set(rows) == {"attestations", "bootimages", "capsuleruns", "capsules", "gateways", "hpcnodes"}
    assert "cap,caps" in rows["capsules"] and "true" in rows["capsules"]       # namespaced
    assert "hpc" in rows["hpcnodes"] and "false" in rows["hpcnodes"]         # cluster-scoped
    assert "gw" in rows["gateways"] and "att" in rows["attestations"]
    assert "crun" in rows["capsuleruns"] and "true" in rows["capsuleruns"]  # run orders: the system namespace


def test_category_lists_every_kind(kubectl: Any, platform_ns: str) -> None:
    proc = kubectl("get", "trustcap", "-n", NAMESPACE, check=False)
    assert proc.returncode == 0, proc.stderr


def test_schema_is_published_for_kubectl_explain(kubectl: Any, trustcap_crds: list[str]) -> None:
    out = kubectl("explain", "capsule.spec.committee.size").stdout
    assert "integer" in out
    out = kubectl("explain", "capsule.spec.function.digest").stdout
    assert "sha256" in out


def test_psi_capsule_applies_cleanly(kubectl: Any, platform_ns: str) -> None:
    try:
        proc = kubectl("apply", "-n", NAMESPACE, "-f", str(PSI))
        assert "capsule.trustcap.io/psi" in proc.stdout
        got = kubectl("get", "capsule", "psi", "-n", NAMESPACE, "-o", "jsonpath={.spec.committee.size}").stdout
        assert got == "3"
        # Server-side defaults filled in what the example leaves out.
        again = kubectl("get", "capsule", "psi", "-n", NAMESPACE, "-o", "jsonpath={.spec.egress}").stdout
        assert again == "[]"
        # A second apply of the same file changes nothing.
        assert "unchanged" in kubectl("apply", "-n", NAMESPACE, "-f", str(PSI)).stdout
    finally:
        kubectl("patch", "capsule", "psi", "-n", NAMESPACE, "--type=merge", "-p", '{"metadata":{"finalizers":null}}',
                check=False)
        kubectl("delete", "capsule", "psi", "-n", NAMESPACE, "--ignore-not-found", "--wait=false")
