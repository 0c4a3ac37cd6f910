"""Malformed objects are refused by the real API server with an error that names the field.

Each case breaks one thing in a valid object and asserts on the field path the API server reports (in
`details.causes[].field`, or in the message for decoding errors). Creates are server-side dry runs
(`dryRun=All`: full validation, nothing stored) with strict field validation, as `kubectl apply` does.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from platformkit import GROUP, NAMESPACE, VERSION, psi_capsule, unique

KEY_B = "0x0332f0552e3d3633882edb25d67d96d3a2d71277a2395ee76383990f5c0e1aa85b"
ADDR = "0x4C9183C39E36BD8bfb8e86f073b3F5693E57d128"
DIGEST = "sha256:" + "ab" * 32
BYTES32 = "0x" + "cd" * 32

BASES: dict[str, tuple[str, bool, dict[str, Any]]] = {
    # kind: (plural, namespaced, spec)
    "HPCNode": ("hpcnodes", False, {"gateway": "pi-1", "mac": "52:54:00:12:34:56", "bootImage": "hpc-bookworm"}),
    "Gateway": ("gateways", False, {"address": ADDR, "signingKey": KEY_B, "vrfKey": KEY_B,
                                    "endpoint": "pi-1.local:7443"}),
    "BootImage": ("bootimages", False, {
        "kernel": {"path": "vmlinuz", "digest": DIGEST}, "initrd": {"path": "initrd.img", "digest": DIGEST},
        "ipxeScript": {"path": "boot.ipxe", "digest": DIGEST}}),
    "Attestation": ("attestations", True, {
        "capsule": "psi", "node": "hpc-1", "executor": ADDR, "phase": "pre", "nonce": BYTES32, "epoch": 7,
        "committee": {"quorum": 2, "members": [{"address": "0x" + f"{i:040x}"} for i in (1, 2, 3)]}}),
}


def _obj(kind: str) -> dict[str, Any]:
    if kind == "Capsule":
        return psi_capsule(unique("bad"))
    _plural, namespaced, spec = BASES[kind]
    meta: dict[str, Any] = {"name": unique("bad")}
    if namespaced:
        meta["namespace"] = NAMESPACE
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": meta, "spec": copy.deepcopy(spec)}


def _create(custom: Any, body: dict[str, Any]) -> Any:
    kind = body["kind"]
    plural, namespaced = ("capsules", True) if kind == "Capsule" else BASES[kind][:2]
    if namespaced:
        return custom.create_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, plural, body, dry_run="All", field_validation="Strict")
    return custom.create_cluster_custom_object(GROUP, VERSION, plural, body, dry_run="All", field_validation="Strict")


def _refusal(custom: Any, body: dict[str, Any]) -> tuple[int, str, list[str]]:
    with pytest.raises(ApiException) as info:
        _create(custom, body)
    err = json.loads(info.value.body or "{}")
    fields = [c.get("field", "") for c in (err.get("details") or {}).get("causes") or []]
    return int(info.value.status), str(err.get("message", "")), fields


Mutator = Callable[[dict[str, Any]], Any]


def _spec(fn: Callable[[dict[str, Any]], Any]) -> Mutator:
    return lambda obj: fn(obj["spec"])


def _set_in(path: list[Any], value: Any) -> Mutator:
    def mutate(obj: dict[str, Any]) -> None:
        node = obj["spec"]
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = value
    return mutate


CAPSULE_CASES = [
    pytest.param(_spec(lambda s: s["function"].pop("digest")), "spec.function.digest", id="missing-image-digest"),
    pytest.param(_set_in(["function", "digest"], "latest"), "spec.function.digest", id="image-tag-not-digest"),
    pytest.param(_set_in(["function", "digest"], "sha256:" + "AB" * 32), "spec.function.digest",
                 id="digest-uppercase"),
    pytest.param(_set_in(["function", "image"], "trustcap/psi:latest"), "spec.function.image",
                 id="image-with-tag"),
    pytest.param(_set_in(["function", "entrypoint"], []), "spec.function.entrypoint", id="empty-entrypoint"),
    pytest.param(_set_in(["inputs", 0, "owner"], "0x04" + "ab" * 64), "spec.inputs[0].owner",
                 id="uncompressed-owner-key"),
    pytest.param(_set_in(["recipients", 1, "publicKey"], KEY_B[:-2]), "spec.recipients[1].publicKey",
                 id="short-recipient-key"),
    pytest.param(_set_in(["inputs", 1, "cid"], "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"), "spec.inputs[1].cid",
                 id="cid-v0"),
    pytest.param(_set_in(["inputs", 0, "cid"], "bafy"), "spec.inputs[0].cid", id="cid-too-short"),
    pytest.param(_spec(lambda s: s.update(inputs=[dict(s["inputs"][0], name=f"in-{i}") for i in range(200)])),
                 "spec.inputs", id="huge-input-list"),
    pytest.param(_spec(lambda s: s["inputs"].append(dict(s["inputs"][0]))), "spec.inputs[2]",
                 id="duplicate-input-name"),
    pytest.param(_set_in(["recipients"], []), "spec.recipients", id="no-recipients"),
    pytest.param(_set_in(["timeoutSeconds"], -30), "spec.timeoutSeconds", id="negative-timeout"),
    pytest.param(_set_in(["timeoutSeconds"], 10**6), "spec.timeoutSeconds", id="timeout-over-a-day"),
    pytest.param(_set_in(["egress"], ["example.org"]), "spec.egress[0]", id="egress-without-port"),
    pytest.param(_set_in(["egress"], ["10.0.0.1:70000"]), "spec.egress[0]", id="egress-port-out-of-range"),
    pytest.param(_set_in(["egress"], ["*:443"]), "spec.egress[0]", id="egress-wildcard"),
    pytest.param(_set_in(["devices"], ["/etc/shadow"]), "spec.devices[0]", id="device-outside-dev"),
    pytest.param(_set_in(["devices"], ["/dev/../etc/shadow"]), "spec.devices[0]", id="device-path-traversal"),
    pytest.param(_set_in(["resources", "memoryMiB"], -1), "spec.resources.memoryMiB", id="negative-memory"),
    pytest.param(_set_in(["committee", "size"], 101), "spec.committee.size", id="committee-too-large"),
    pytest.param(_set_in(["committee", "size"], 1), "spec.committee.size", id="committee-of-one"),
    pytest.param(_set_in(["committee", "size"], 4), "spec.committee.size", id="committee-even"),
    pytest.param(_spec(lambda s: s.update(committee={"size": 7, "quorum": 4})), "spec.committee.quorum",
                 id="quorum-below-two-thirds"),
    pytest.param(_spec(lambda s: s.update(committee={"size": 3, "quorum": 5})), "spec.committee.quorum",
                 id="quorum-above-size"),
    pytest.param(_set_in(["payment", "payer"], "0x1234"), "spec.payment.payer", id="bad-payer-address"),
    pytest.param(_set_in(["payment", "amountWei"], "-5"), "spec.payment.amountWei", id="negative-payment"),
    pytest.param(_set_in(["payment", "amountWei"], 5), "spec.payment.amountWei", id="payment-not-a-string"),
    pytest.param(_spec(lambda s: s.pop("payment")), "spec.payment", id="missing-payment"),
    pytest.param(_spec(lambda s: s.update(functoin={})), "spec.functoin", id="unknown-field"),
]

OTHER_CASES = [
    pytest.param("Attestation", _set_in(["phase"], "midway"), "spec.phase", id="attestation-unknown-phase"),
    pytest.param("Attestation", _set_in(["nonce"], "0x1234"), "spec.nonce", id="attestation-short-nonce"),
    pytest.param("Attestation", _spec(lambda s: s.pop("capsule")), "spec.capsuleRef",
                 id="attestation-pre-without-capsule"),
    pytest.param("Attestation", _set_in(["committee", "quorum"], 1), "spec.committee.quorum",
                 id="attestation-quorum-of-one"),
    pytest.param("HPCNode", _set_in(["mac"], "52-54-00-12-34-56"), "spec.mac", id="hpcnode-bad-mac"),
    pytest.param("HPCNode", _spec(lambda s: s.update(policy={"monitorMinIntervalSeconds": 30,
                                                              "monitorMaxIntervalSeconds": 5})),
                 "spec.policy.monitorMinIntervalSeconds", id="hpcnode-monitor-interval-inverted"),
    pytest.param("HPCNode", _spec(lambda s: s.update(policy={"wipe": "Shred"})), "spec.policy.wipe",
                 id="hpcnode-unknown-wipe-level"),
    pytest.param("Gateway", _set_in(["address"], "0xZZ" + "0" * 38), "spec.address", id="gateway-bad-address"),
    pytest.param("Gateway", _set_in(["endpoint"], "pi-1.local"), "spec.endpoint", id="gateway-endpoint-no-port"),
    pytest.param("Gateway", _set_in(["vrfKey"], "0x" + "ab" * 32), "spec.vrfKey", id="gateway-vrf-key-wrong-suite"),
    pytest.param("BootImage", _set_in(["kernel", "digest"], "md5:abc"), "spec.kernel.digest",
                 id="bootimage-bad-digest"),
    pytest.param("BootImage", _set_in(["initrd", "path"], "../../etc/shadow"), "spec.initrd.path",
                 id="bootimage-path-traversal"),
]


@pytest.mark.parametrize("kind", ["Capsule", *sorted(BASES)])
def test_valid_bases_are_accepted(custom: Any, platform_ns: str, kind: str) -> None:
    """The malformed cases below differ from these in one field only."""
    created = _create(custom, _obj(kind))
    assert created["kind"] == kind


def _assert_names_field(status: int, message: str, fields: list[str], field: str) -> None:
    assert status in (400, 422), (status, message)
    if fields:
        assert field in fields, f"expected {field} in causes {fields}; message: {message}"
    assert field in message, message


@pytest.mark.parametrize(("mutate", "field"), CAPSULE_CASES)
def test_malformed_capsule_is_refused_naming_the_field(
        custom: Any, platform_ns: str, mutate: Mutator, field: str) -> None:
    body = _obj("Capsule")
    mutate(body)
    _assert_names_field(*_refusal(custom, body), field)


@pytest.mark.parametrize(("kind", "mutate", "field"), OTHER_CASES)
def test_malformed_object_is_refused_naming_the_field(
        custom: Any, platform_ns: str, kind: str, mutate: Mutator, field: str) -> None:
    body = _obj(kind)
    mutate(body)
    _assert_names_field(*_refusal(custom, body), field)


def test_kubectl_user_sees_the_field(kubectl: Any, platform_ns: str) -> None:
    """What a user typing `kubectl apply` reads: the field path and the rule, in one line."""
    body = _obj("Capsule")
    body["spec"]["timeoutSeconds"] = -1
    proc = kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(body), check=False)
    assert proc.returncode != 0
    assert "spec.timeoutSeconds" in proc.stderr and "greater than or equal to 1" in proc.stderr


# --- rules that need a stored object: status phases and immutability -------------------------------------
def _expect_422(call: Callable[[], Any], field: str) -> str:
    with pytest.raises(ApiException) as info:
        call()
    assert info.value.status == 422, info.value.body
    err = json.loads(info.value.body or "{}")
    fields = [c.get("field", "") for c in (err.get("details") or {}).get("causes") or []]
    assert field in fields, (fields, err.get("message"))
    return str(err["message"])


def test_unknown_status_phase_is_refused(capsules: Any) -> None:
    name = unique("phase")
    capsules.create(psi_capsule(name))
    _expect_422(lambda: capsules.patch_status(name, {"phase": "Exploding"}), "status.phase")


def test_final_phase_cannot_be_left(capsules: Any) -> None:
    """Completed is final: nobody (operator bug or tampering) can put a finished capsule back to work."""
    name = unique("final")
    capsules.create(psi_capsule(name))
    capsules.patch_status(name, {"phase": "Completed"})
    msg = _expect_422(lambda: capsules.patch_status(name, {"phase": "Running"}), "status.phase")
    assert "keeps its phase" in msg


def test_spec_is_immutable_once_submitted(capsules: Any) -> None:
    """The committee attests exactly the submitted spec: swapping the function afterwards is refused."""
    name = unique("immut")
    capsules.create(psi_capsule(name))
    patch = {"spec": {"function": {"digest": "sha256:" + "00" * 32}}}
    msg = _expect_422(lambda: capsules.custom.patch_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, "capsules", name, patch), "spec")
    assert "immutable" in msg
    assert capsules.get(name)["spec"]["function"]["digest"] != "sha256:" + "00" * 32


def test_a_gateways_vrf_key_cannot_change(custom: Any, platform_ns: str) -> None:
    """Issue 12 item 7: a node that could swap its VRF key after seeing a seed could grind the draw, so the
    key (and its suite) is fixed for the Gateway's life. Control: the endpoint, which is not identity, can
    be patched on the same object."""
    body = _obj("Gateway")
    name = body["metadata"]["name"]
    custom.create_cluster_custom_object(GROUP, VERSION, "gateways", body)
    try:
        other = "0x02" + "11" * 32
        msg = _expect_422(lambda: custom.patch_cluster_custom_object(
            GROUP, VERSION, "gateways", name, {"spec": {"vrfKey": other}}), "spec.vrfKey")
        assert "VRF key cannot change" in msg
        msg = _expect_422(lambda: custom.patch_cluster_custom_object(
            GROUP, VERSION, "gateways", name, {"spec": {"vrfSuite": "ECVRF-EDWARDS25519-SHA512-TAI",
                                                        "vrfKey": "0x" + "11" * 32}}), "spec.vrfSuite")
        assert custom.get_cluster_custom_object(GROUP, VERSION, "gateways", name)["spec"]["vrfKey"] == KEY_B
        patched = custom.patch_cluster_custom_object(GROUP, VERSION, "gateways", name,
                                                     {"spec": {"endpoint": "pi-1.local:7444"}})
        assert patched["spec"]["endpoint"] == "pi-1.local:7444"
    finally:
        custom.delete_cluster_custom_object(GROUP, VERSION, "gateways", name)
