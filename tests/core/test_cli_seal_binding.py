"""`trustcap seal/open --capsule-namespace NS --capsule-name NAME --manifest FILE`: the command computes the
binding the operator and the runner check (capsule id of NS/NAME, the spec's binding digest), so an owner
seals for the capsule.yaml it will apply; an envelope for another capsule or manifest is refused on open,
and the two ways of naming a binding are never mixed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from trustcap import scenario
from trustcap.capsule.envelope import open_bytes
from trustcap.capsule.ids import capsule_id
from trustcap.capsule.keys import KeyPair
from trustcap.capsule.manifest import parse_manifest
from trustcap.cli import main

PLAIN = b"alice\nbob\ncarol\n"


@pytest.fixture
def party(tmp_path: Path) -> Path:
    """B's key pair, B's list, and a PSI capsule.yaml naming B and C (CIDs still placeholders)."""
    b, c = KeyPair.generate(), KeyPair.generate()
    b.save(tmp_path / "b")
    owners = [scenario.Owner(name="b", keys=b, broker_url="http://127.0.0.1:8481", names=["x"]),
              scenario.Owner(name="c", keys=c, broker_url="http://127.0.0.1:8482", names=["y"])]
    doc = scenario.manifest_for(name="psi", namespace="default", image_digest="sha256:" + "ab" * 32, owners=owners,
                                payer="0x" + "11" * 20, amount_wei=10**15)
    _write(tmp_path / "capsule.yaml", doc)
    (tmp_path / "names.txt").write_bytes(PLAIN)
    return tmp_path


def _write(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _bound(d: Path, manifest: str = "capsule.yaml", name: str = "psi", ns: str = "default") -> list[str]:
    return ["--capsule-namespace", ns, "--capsule-name", name, "--manifest", str(d / manifest)]


def _seal(d: Path, *binding: str) -> int:
    return main(["seal", "--to", str(d / "b" / "key.pub"), "--key", str(d / "b" / "key"), "--in",
                 str(d / "names.txt"), "--out", str(d / "sealed"), *binding])


def _open(d: Path, *binding: str) -> int:
    return main(["open", "--key", str(d / "b" / "key"), "--owner", str(d / "b" / "key.pub"), "--in",
                 str(d / "sealed"), "--out", str(d / "opened"), *binding])


def test_sealed_and_opened_for_the_same_capsule(party: Path) -> None:
    assert _seal(party, *_bound(party)) == 0
    assert _open(party, *_bound(party)) == 0
    assert (party / "opened").read_bytes() == PLAIN


def test_the_envelope_binds_what_the_operator_and_runner_check(party: Path) -> None:
    """Not the CLI's own idea of a binding: the library's capsule id and binding digest of the spec open it."""
    assert _seal(party, *_bound(party)) == 0
    spec = yaml.safe_load((party / "capsule.yaml").read_text())["spec"]
    key = KeyPair.load(party / "b" / "key")
    plain = open_bytes((party / "sealed").read_bytes(), key=key, owner=key.public_key(),
                       capsule_id=capsule_id("default", "psi"), manifest_digest=parse_manifest(spec).binding_digest())
    assert plain == PLAIN


def test_cids_filled_in_after_sealing_do_not_change_the_binding(party: Path) -> None:
    doc = yaml.safe_load((party / "capsule.yaml").read_text())
    placeholders = copy.deepcopy(doc)
    for item in placeholders["spec"]["inputs"]:
        item["cid"] = "B_CID"  # what the README's capsule.yaml holds before `trustcap store put`
        item.pop("sizeBytes")
    _write(party / "before.yaml", placeholders)
    assert _seal(party, *_bound(party, "before.yaml")) == 0
    assert _open(party, *_bound(party)) == 0
    assert (party / "opened").read_bytes() == PLAIN


@pytest.mark.parametrize("change", [
    pytest.param(lambda d: d["metadata"].update(name="psi2"), id="another-capsule-name"),
    pytest.param(lambda d: d["metadata"].update(namespace="other"), id="another-namespace"),
    pytest.param(lambda d: d["spec"].update(timeoutSeconds=61), id="another-manifest"),
    pytest.param(lambda d: d["spec"]["inputs"][0].update(broker="http://127.0.0.1:9999"), id="another-broker"),
])
def test_opened_for_another_capsule_is_refused(party: Path, change: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert _seal(party, *_bound(party)) == 0
    doc = yaml.safe_load((party / "capsule.yaml").read_text())
    change(doc)
    _write(party / "other.yaml", doc)
    meta = doc["metadata"]
    assert _open(party, *_bound(party, "other.yaml", name=meta["name"], ns=meta["namespace"])) == 1
    assert "envelope is bound to" in capsys.readouterr().err
    assert not (party / "opened").exists()


def test_a_bare_spec_is_a_manifest_too(party: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without metadata, only the flags name the capsule: another name is refused by the envelope itself."""
    spec = yaml.safe_load((party / "capsule.yaml").read_text())["spec"]
    _write(party / "spec.yaml", spec)
    assert _seal(party, *_bound(party, "spec.yaml")) == 0
    assert _open(party, *_bound(party, "spec.yaml", name="psi2")) == 1
    assert "envelope is bound to capsule" in capsys.readouterr().err
    assert _open(party, *_bound(party)) == 0  # the capsule.yaml with metadata binds the same


def test_the_named_and_the_raw_binding_are_the_same(party: Path) -> None:
    spec = yaml.safe_load((party / "capsule.yaml").read_text())["spec"]
    raw = ["--capsule-id", capsule_id("default", "psi").hex(),
           "--manifest-digest", "0x" + parse_manifest(spec).binding_digest().hex()]
    assert _seal(party, *raw) == 0
    assert _open(party, *_bound(party)) == 0


@pytest.mark.parametrize(("args", "expected"), [
    pytest.param(["--capsule-id", "11" * 32, "--manifest", "capsule.yaml"], "two ways to name the binding",
                 id="mixed-id-and-manifest"),
    pytest.param(["--manifest-digest", "11" * 32, "--capsule-name", "psi"], "two ways to name the binding",
                 id="mixed-digest-and-name"),
    pytest.param(["--capsule-name", "psi", "--manifest", "capsule.yaml"], "without --capsule-namespace",
                 id="no-namespace"),
    pytest.param(["--capsule-namespace", "default", "--capsule-name", "psi"], "without --manifest",
                 id="no-manifest"),
    pytest.param(["--capsule-namespace", "default", "--capsule-name", "psi2", "--manifest", "capsule.yaml"],
                 "metadata.name: psi", id="name-differs-from-manifest"),
    pytest.param(["--capsule-namespace", "default", "--capsule-name", "psi", "--manifest", "missing.yaml"],
                 "cannot read the manifest", id="missing-manifest"),
    pytest.param(["--capsule-namespace", "default", "--capsule-name", "psi", "--manifest", "names.txt"],
                 "holds no Capsule", id="not-a-capsule"),
])
@pytest.mark.parametrize("command", ["seal", "open"])
def test_a_wrong_binding_is_one_clear_error(party: Path, command: str, args: list[str], expected: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert _seal(party) == 0  # unbound: so `open` gets as far as the binding
    args = [str(party / a) if a.endswith((".yaml", ".txt")) else a for a in args]
    rc = _seal(party, *args) if command == "seal" else _open(party, *args)
    err = capsys.readouterr().err
    assert rc == 1 and expected in err, err
    assert not (party / "opened").exists()


def test_an_invalid_manifest_names_the_file_and_field(party: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = yaml.safe_load((party / "capsule.yaml").read_text())
    doc["spec"]["committee"]["size"] = 4
    _write(party / "bad.yaml", doc)
    assert _seal(party, *_bound(party, "bad.yaml")) == 1
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "committee" in err, err
