"""One field, one writer, as the chart enforces it (issue 12 item 12, decision 0113): the gateway's
admission policy guards every HPCNode status field except the three the gateway writes, the phase
included, and ties each write to the Gateway registered on the writing pod's node.

Rendered offline by the real helm and read against the CRDs, so a new status field without a rule, or a
gateway field the CRD lost, fails here; the policy itself runs against the real API server in
e2e/observe/test_chart_admission_e2e.py.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from trustcap.stack import paths

ROOT = Path(__file__).resolve().parents[2]
#: What the gateway writes into HPCNode status: publish.py, actions.py, boot.py (and nothing else).
GATEWAY_FIELDS = {"enrolment", "quarantineRequest", "lastWipe"}
NODE_KEY = "authentication.kubernetes.io/node-name"


@pytest.fixture(scope="module")
def policy() -> dict[str, dict[str, Any]]:
    helm = paths.bin_dir() / "helm"
    assert helm.is_file(), f"{helm} is missing: `make stack` builds helm into the tool cache (trustcap/stack)"
    proc = subprocess.run([str(helm), "template", "rel", str(ROOT), "--namespace", "trustcap",
                           "--show-only", "templates/admissionpolicy.yaml"], capture_output=True, text=True,
                          timeout=120, check=False,
                          env={"HOME": str(Path.home()), "PATH": "/usr/bin:/bin", "KUBECONFIG": "/nonexistent"})
    assert proc.returncode == 0, proc.stderr
    return {d["kind"]: d for d in yaml.safe_load_all(proc.stdout) if d}


def _schema(crd: str) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "crds" / f"{crd}.yaml").read_text())
    return dict(doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"])


def test_every_status_field_but_the_gateways_own_is_guarded_phase_included(policy: dict[str, Any]) -> None:
    status = set(_schema("hpcnode")["status"]["properties"])
    assert status >= GATEWAY_FIELDS | {"phase", "quarantineReason", "quarantineChecked"}
    messages = [v.get("message") or "" for v in policy["ValidatingAdmissionPolicy"]["spec"]["validations"]]
    guarded = {m.group(1) for text in messages for m in [re.match(r"status\.(\w+):", text)] if m}
    assert guarded == status - GATEWAY_FIELDS


def test_writes_are_tied_to_the_gateway_on_the_pods_node(policy: dict[str, Any]) -> None:
    vap, binding = policy["ValidatingAdmissionPolicy"]["spec"], policy["ValidatingAdmissionPolicyBinding"]["spec"]
    assert vap["paramKind"] == {"apiVersion": "trustcap.io/v1alpha1", "kind": "Gateway"}
    assert binding["paramRef"] == {"selector": {}, "parameterNotFoundAction": "Deny"}
    assert vap["failurePolicy"] == "Fail"
    variables = {v["name"]: v["expression"] for v in vap["variables"]}
    assert NODE_KEY in variables["writerNode"] and "params.spec.nodeName" in variables["gatewayNode"]
    assert variables["named"] == "params.metadata.name == object.spec.gateway"
    node_rules = [v["expression"] for v in vap["validations"] if "writerNode" in v["expression"]]
    assert len(node_rules) == 3, node_rules
    (cond,) = vap["matchConditions"]
    assert cond["expression"] == 'request.userInfo.username == "system:serviceaccount:trustcap:rel-trustcap-gateway"'


def test_the_gateway_names_its_node_and_cannot_move(policy: dict[str, Any]) -> None:
    spec = _schema("gateway")["spec"]
    node = spec["properties"]["nodeName"]
    assert node["type"] == "string" and any(r["rule"] == "self == oldSelf" for r in node["x-kubernetes-validations"])
    assert any("oldSelf.nodeName" in r["rule"] for r in spec["x-kubernetes-validations"])  # nor be removed
    hpc = _schema("hpcnode")["spec"]["properties"]["gateway"]
    assert any(r["rule"] == "self == oldSelf" for r in hpc["x-kubernetes-validations"])  # the other half of the tie
