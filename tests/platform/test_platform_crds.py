"""The CRDs as files: well-formed, every schema node typed, patterns that compile and mean what they say,
printer columns that read real fields, and code constants that agree with the schema."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml
from crdcheck import PSI, load_crds, resolve, validate, version_schema, walk

from trustcap.operator import conditions, lifecycle

CRDS = load_crds()
EXPECTED = {
    "Capsule": ("Namespaced", "capsules"),
    "HPCNode": ("Cluster", "hpcnodes"),
    "Gateway": ("Cluster", "gateways"),
    "BootImage": ("Cluster", "bootimages"),
    "Attestation": ("Namespaced", "attestations"),
    "CapsuleRun": ("Namespaced", "capsuleruns"),
}
KINDS = sorted(EXPECTED)
STATUS_PHASES = {
    "Capsule": [p.value for p in lifecycle.Phase],
    "HPCNode": ["Registered", "Booting", "Enrolled", "Ready", "Executing", "Wiping", "Quarantined"],
}


def _capsule_spec_schema() -> dict[str, Any]:
    return version_schema(CRDS["Capsule"])["properties"]["spec"]  # type: ignore[no-any-return]


def test_exactly_our_kinds_one_file_each() -> None:
    assert sorted(CRDS) == KINDS
    assert sorted(c["_file"] for c in CRDS.values()) == sorted(f"{k.lower()}.yaml" for k in KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_names_scope_and_version(kind: str) -> None:
    crd = CRDS[kind]
    scope, plural = EXPECTED[kind]
    spec = crd["spec"]
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert spec["group"] == "trustcap.io"
    assert spec["scope"] == scope
    assert spec["names"]["plural"] == plural
    assert crd["metadata"]["name"] == f"{plural}.trustcap.io"
    assert spec["names"]["shortNames"], "short names for kubectl users"
    assert "trustcap" in spec["names"]["categories"]
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_short_names_are_unique_across_kinds() -> None:
    seen: list[str] = []
    for crd in CRDS.values():
        seen += crd["spec"]["names"]["shortNames"] + [crd["spec"]["names"]["plural"]]
    assert len(seen) == len(set(seen))


@pytest.mark.parametrize("kind", KINDS)
def test_every_schema_node_has_a_type(kind: str) -> None:
    untyped = [p or "<root>" for p, node in walk(version_schema(CRDS[kind])) if "type" not in node]
    assert untyped == []


@pytest.mark.parametrize("kind", KINDS)
def test_required_fields_exist(kind: str) -> None:
    for path, node in walk(version_schema(CRDS[kind])):
        missing = set(node.get("required", [])) - set(node.get("properties", {}))
        assert not missing, f"{kind}{path}: required but not declared: {missing}"


@pytest.mark.parametrize("kind", KINDS)
def test_patterns_compile_and_are_anchored_re2(kind: str) -> None:
    for path, node in walk(version_schema(CRDS[kind])):
        if "pattern" in node:
            pat = node["pattern"]
            re.compile(pat)
            assert pat.startswith("^") and pat.endswith("$"), f"{kind}{path}: unanchored pattern {pat}"
            assert "(?=" not in pat and "(?!" not in pat and "(?<" not in pat, f"{kind}{path}: RE2 has no lookaround"


@pytest.mark.parametrize("kind", KINDS)
def test_lists_and_strings_are_bounded(kind: str) -> None:
    """Unbounded lists or free strings let one object fill etcd and blow CEL's cost budget."""
    for path, node in walk(version_schema(CRDS[kind])):
        if node.get("type") == "array":
            assert "maxItems" in node, f"{kind}{path}: array without maxItems"
        if node.get("type") == "string" and not path.endswith(("apiVersion", "kind")):
            bounded = {"maxLength", "enum", "pattern", "format"} & set(node)
            assert bounded, f"{kind}{path}: string without maxLength/pattern/enum/format"
            if re.search(r"[*+]|\{\d+,\}", node.get("pattern", "")):
                assert "maxLength" in node, f"{kind}{path}: open-ended pattern needs a maxLength"


@pytest.mark.parametrize("kind", KINDS)
def test_cel_rules_have_messages(kind: str) -> None:
    for path, node in walk(version_schema(CRDS[kind])):
        for rule in node.get("x-kubernetes-validations", []):
            assert rule.get("message"), f"{kind}{path}: rule {rule['rule']!r} without a message"


@pytest.mark.parametrize("kind", KINDS)
def test_printer_columns_read_existing_fields(kind: str) -> None:
    (version,) = CRDS[kind]["spec"]["versions"]
    schema = version_schema(CRDS[kind])
    cols = version["additionalPrinterColumns"]
    for col in cols:
        node = resolve(schema, col["jsonPath"])
        assert node is not None, f"{kind}: column {col['name']} reads {col['jsonPath']}, which is no field"
        want = {"integer": "integer", "boolean": "boolean"}.get(node["type"], "string")
        if col["type"] != "date":
            assert col["type"] == want, f"{kind}: column {col['name']} typed {col['type']}, field is {node['type']}"
    names = [c["name"] for c in cols]
    assert names[0] == "Ready" and names[-1] == "Age"
    assert cols[0]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    for col in cols:
        if col["name"] == "Message":
            assert col.get("priority") == 1, "long messages only in -o wide"


def test_resolve_rejects_a_misspelt_column() -> None:
    """Guard for the check above: a typo must not resolve."""
    assert resolve(version_schema(CRDS["Capsule"]), ".status.phse") is None
    assert resolve(version_schema(CRDS["Capsule"]), ".spec.committee.size") == {"type": "integer", "minimum": 3,
                                                                                  "maximum": 31}


@pytest.mark.parametrize("kind", KINDS)
def test_conditions_schema_matches_metav1_condition_and_our_code(kind: str) -> None:
    cond = version_schema(CRDS[kind])["properties"]["status"]["properties"]["conditions"]
    assert cond["x-kubernetes-list-type"] == "map" and cond["x-kubernetes-list-map-keys"] == ["type"]
    item = cond["items"]
    assert set(item["properties"]) == {"type", "status", "reason", "message", "lastTransitionTime",
                                       "observedGeneration"}
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert item["properties"]["reason"]["pattern"] == conditions._REASON_RE.pattern
    assert item["properties"]["message"]["maxLength"] == conditions.MAX_MESSAGE


def test_every_reason_constant_matches_the_crd_pattern() -> None:
    reasons = [v for k, v in vars(conditions).items() if k.startswith("REASON_")]
    assert len(reasons) >= 9
    for reason in reasons:
        assert conditions._REASON_RE.match(reason), reason
    for _status, reason, _msg in lifecycle.READY_BY_PHASE.values():
        assert reason in reasons


@pytest.mark.parametrize("kind", sorted(STATUS_PHASES))
def test_status_phase_enum_matches_the_code(kind: str) -> None:
    phase = version_schema(CRDS[kind])["properties"]["status"]["properties"]["phase"]
    assert phase["enum"] == STATUS_PHASES[kind]


def test_attestation_phases_follow_the_verdict_uint8_order() -> None:
    """Verdict.phase is uint8: boot 0, pre 1, during 2, post 3, wipe 4 (design.md); the enum keeps that order."""
    spec = version_schema(CRDS["Attestation"])["properties"]["spec"]["properties"]
    assert spec["phase"]["enum"] == ["boot", "pre", "during", "post", "wipe"]


# --- the patterns mean what they say -------------------------------------------------------------------
_S = _capsule_spec_schema()["properties"]
PATTERN_CASES = [
    # (schema node, value, accepted)
    pytest.param(_S["function"]["properties"]["digest"], "sha256:" + "a" * 64, True, id="digest-ok"),
    pytest.param(_S["function"]["properties"]["digest"], "sha256:" + "A" * 64, False, id="digest-uppercase"),
    pytest.param(_S["function"]["properties"]["digest"], "sha512:" + "a" * 64, False, id="digest-sha512"),
    pytest.param(_S["function"]["properties"]["digest"], "sha256:" + "a" * 63, False, id="digest-short"),
    pytest.param(_S["function"]["properties"]["image"], "trustcap/psi", True, id="image-ok"),
    pytest.param(_S["function"]["properties"]["image"], "registry.local:5000/a/b", True, id="image-registry"),
    pytest.param(_S["function"]["properties"]["image"], "trustcap/psi:latest", False, id="image-tag"),
    pytest.param(_S["function"]["properties"]["image"], "Trustcap/psi", False, id="image-uppercase"),
    pytest.param(_S["inputs"]["items"]["properties"]["cid"], "bafkrei" + "a" * 52, True, id="cid-v1"),
    pytest.param(_S["inputs"]["items"]["properties"]["cid"], "Qm" + "a" * 44, False, id="cid-v0"),
    pytest.param(_S["inputs"]["items"]["properties"]["cid"], "bafkrei" + "1" * 52, False, id="cid-not-base32"),
    pytest.param(_S["inputs"]["items"]["properties"]["owner"], "0x02" + "ab" * 32, True, id="key-compressed"),
    pytest.param(_S["inputs"]["items"]["properties"]["owner"], "0x04" + "ab" * 64, False, id="key-uncompressed"),
    pytest.param(_S["inputs"]["items"]["properties"]["owner"], "0x05" + "ab" * 32, False, id="key-bad-prefix"),
    pytest.param(_S["inputs"]["items"]["properties"]["owner"], "02" + "ab" * 32, False, id="key-no-0x"),
    pytest.param(_S["payment"]["properties"]["payer"], "0x" + "aB" * 20, True, id="address-ok"),
    pytest.param(_S["payment"]["properties"]["payer"], "0x" + "ab" * 19, False, id="address-short"),
    pytest.param(_S["payment"]["properties"]["amountWei"], "0", True, id="wei-zero"),
    pytest.param(_S["payment"]["properties"]["amountWei"], "007", False, id="wei-leading-zero"),
    pytest.param(_S["payment"]["properties"]["amountWei"], "-5", False, id="wei-negative"),
    pytest.param(_S["egress"]["items"], "api.example.org:443", True, id="egress-dns"),
    pytest.param(_S["egress"]["items"], "10.0.0.1:8080", True, id="egress-ipv4"),
    pytest.param(_S["egress"]["items"], "[fd00::1]:53", True, id="egress-ipv6"),
    pytest.param(_S["egress"]["items"], "example.org", False, id="egress-no-port"),
    pytest.param(_S["egress"]["items"], "example.org:0", False, id="egress-port-0"),
    pytest.param(_S["egress"]["items"], "example.org:65536", False, id="egress-port-65536"),
    pytest.param(_S["egress"]["items"], "example.org:65535", True, id="egress-port-65535"),
    pytest.param(_S["egress"]["items"], "*:443", False, id="egress-wildcard"),
    pytest.param(_S["egress"]["items"], "http://example.org:80", False, id="egress-url"),
    pytest.param(_S["devices"]["items"], "/dev/nvidia0", True, id="device-ok"),
    pytest.param(_S["devices"]["items"], "/etc/passwd", False, id="device-not-dev"),
    pytest.param(
        version_schema(CRDS["HPCNode"])["properties"]["spec"]["properties"]["mac"], "52:54:00:12:34:56", True,
        id="mac-ok"),
    pytest.param(
        version_schema(CRDS["HPCNode"])["properties"]["spec"]["properties"]["mac"], "52-54-00-12-34-56", False,
        id="mac-dashes"),
    pytest.param(
        version_schema(CRDS["HPCNode"])["properties"]["spec"]["properties"]["mac"], "52:54:00:12:34", False,
        id="mac-short"),
]


@pytest.mark.parametrize(("node", "value", "accepted"), PATTERN_CASES)
def test_pattern_meaning(node: dict[str, Any], value: str, accepted: bool) -> None:
    assert bool(re.search(node["pattern"], value)) is accepted


# --- the PSI example --------------------------------------------------------------------------------------
def _psi() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(PSI.read_text())
    return doc


def test_psi_capsule_matches_the_schema() -> None:
    assert validate(_psi(), version_schema(CRDS["Capsule"])) == []


def test_psi_capsule_is_the_seed_task_7_shape() -> None:
    """Two parties' name lists in; the result sealed to both of them; a pure function (no egress, no devices)."""
    spec = _psi()["spec"]
    owners = {i["owner"] for i in spec["inputs"]}
    assert len(spec["inputs"]) == 2 and len(owners) == 2
    assert {r["publicKey"] for r in spec["recipients"]} == owners
    assert spec["egress"] == [] and spec["devices"] == []
    assert spec["committee"]["size"] >= 3


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        pytest.param(lambda s: s["function"].pop("digest"), "spec.function.digest", id="missing-digest"),
        pytest.param(lambda s: s.update(timeoutSeconds=-1), "spec.timeoutSeconds", id="negative-timeout"),
        pytest.param(lambda s: s["inputs"][0].update(owner="0x04" + "0" * 128), "spec.inputs[0].owner",
                     id="bad-key"),
        pytest.param(lambda s: s.update(extra=1), "spec.extra", id="unknown-field"),
    ],
)
def test_validator_names_the_field(mutate: Any, field: str) -> None:
    """Guard for the offline validator itself: a broken manifest is caught and the field named."""
    doc = copy.deepcopy(_psi())
    mutate(doc["spec"])
    errors = validate(doc, version_schema(CRDS["Capsule"]))
    assert any(e.startswith(field + ":") for e in errors), errors
