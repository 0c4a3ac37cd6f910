"""The capsule manifest: the repo's PSI capsule validates, the digest is canonical, and each field the
CRD bounds is refused here too, with the field named."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from trustcap.capsule import ManifestError, parse_manifest

PSI = yaml.safe_load((Path(__file__).parents[2] / "capsules" / "psi" / "capsule.yaml").read_text())["spec"]
KEY = "0x02" + "ab" * 32
BASE: dict[str, Any] = {
    "function": {"image": "trustcap/psi", "digest": "sha256:" + "a" * 64, "entrypoint": ["python3", "/f.py"]},
    "recipients": [{"name": "b", "publicKey": KEY}],
    "timeoutSeconds": 60,
    "committee": {"size": 3},
    "payment": {"payer": "0x" + "a" * 40, "amountWei": "10"},
}


def test_the_psi_example_validates() -> None:
    m = parse_manifest(PSI)
    assert len(m.inputs) == 2 and m.egress == []


def test_digest_is_canonical_and_fills_defaults() -> None:
    explicit = copy.deepcopy(BASE)
    explicit["resources"] = {"cpuMillis": 1000, "memoryMiB": 256, "pids": 64, "scratchMiB": 64}
    explicit["egress"] = []
    reordered = dict(reversed(list(BASE.items())))
    assert parse_manifest(BASE).digest() == parse_manifest(explicit).digest() == parse_manifest(reordered).digest()
    changed = copy.deepcopy(BASE)
    changed["timeoutSeconds"] = 61
    assert parse_manifest(changed).digest() != parse_manifest(BASE).digest()


def _with(path: str, value: Any) -> dict[str, Any]:
    spec = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node: Any = spec
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    node[last] = value
    return spec


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        pytest.param("function.digest", "sha256:abc", "function.digest", id="short-digest"),
        pytest.param("function.digest", "md5:" + "a" * 32, "function.digest", id="not-sha256"),
        pytest.param("function.image", "Trustcap/PSI", "function.image", id="uppercase-image"),
        pytest.param("function.entrypoint", [], "function.entrypoint", id="no-entrypoint"),
        pytest.param("timeoutSeconds", 0, "timeoutSeconds", id="zero-timeout"),
        pytest.param("timeoutSeconds", 86401, "timeoutSeconds", id="timeout-over-a-day"),
        pytest.param("timeoutSeconds", "60", "timeoutSeconds", id="timeout-as-string"),
        pytest.param("committee.size", 4, "committee", id="even-committee"),
        pytest.param("committee.quorum", 1, "committee.quorum", id="quorum-too-small"),
        pytest.param("recipients", [], "recipients", id="no-recipients"),
        pytest.param("recipients", [{"name": "b", "publicKey": "0x04" + "ab" * 32}], "recipients.0.publicKey",
                     id="uncompressed-key"),
        pytest.param("inputs", [{"name": "x", "cid": "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG",
                                 "owner": KEY}], "inputs.0.cid", id="cidv0-input"),
        pytest.param("egress", ["example.com"], "egress.0", id="egress-without-port"),
        pytest.param("egress", ["example.com:70000"], "egress.0", id="egress-port-range"),
        pytest.param("devices", ["/dev/../etc"], "devices", id="device-dotdot"),
        pytest.param("payment.amountWei", str(1 << 256), "payment.amountWei", id="amount-over-uint256"),
        pytest.param("payment.amountWei", "01", "payment.amountWei", id="amount-leading-zero"),
        pytest.param("resources.memoryMiB", 8, "resources.memoryMiB", id="memory-too-small"),
        pytest.param("surprise", 1, "surprise", id="unknown-field"),
    ],
)
def test_invalid_field_is_named(path: str, value: Any, field: str) -> None:
    with pytest.raises(ManifestError, match=f"invalid manifest: .*{field.replace('.', '[.]')}"):
        parse_manifest(_with(path, value))


def test_duplicates_and_non_mappings_are_refused() -> None:
    dup = _with("recipients", [{"name": "b", "publicKey": KEY}, {"name": "b", "publicKey": KEY}])
    with pytest.raises(ManifestError, match="duplicate entries: b"):
        parse_manifest(dup)
    with pytest.raises(ManifestError, match="must be a mapping"):
        parse_manifest(["not", "a", "spec"])
