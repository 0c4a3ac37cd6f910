"""The image id the chain approves (decision 0063): a fixed vector, every field named when it is wrong,
and the CLI that prints it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from trustcap.bootimage import BootImageSpecError, image_id, image_id_of_spec
from trustcap.cli import main

KERNEL, INITRD, SCRIPT, BOOT = (f"sha256:{c * 64}" for c in "1234")
SPEC: dict[str, Any] = {
    "kernel": {"path": "vmlinuz", "digest": KERNEL},
    "initrd": {"path": "initrd.img", "digest": INITRD},
    "ipxeScript": {"path": "boot.ipxe", "digest": SCRIPT},
    "bootDigest": BOOT,
}
# sha256 of {"bootDigest":"0x44..","initrd":"0x22..","ipxeScript":"0x33..","kernel":"0x11.."} (JCS): recorded
# once; a change to the encoding would make every approval on chain point at nothing.
VECTOR = "47e351c512da8b2838793bda5adf91a4ddaa033d80dde20a1706221a59add77f"


def test_fixed_digests_give_the_recorded_id() -> None:
    assert image_id_of_spec(SPEC).hex() == VECTOR


def test_the_vector_is_plain_sorted_json_of_0x_hex() -> None:
    """An independent encoding (stdlib json, sorted keys, no spaces) agrees: anyone can recompute the id."""
    doc = {"bootDigest": "0x" + "44" * 32, "initrd": "0x" + "22" * 32, "ipxeScript": "0x" + "33" * 32,
           "kernel": "0x" + "11" * 32}
    assert hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest() == VECTOR


@pytest.mark.parametrize("field", ["kernel", "initrd", "ipxe_script", "boot_digest"])
def test_each_digest_changes_the_id(field: str) -> None:
    base = {"kernel": b"\x11" * 32, "initrd": b"\x22" * 32, "ipxe_script": b"\x33" * 32, "boot_digest": b"\x44" * 32}
    changed = dict(base, **{field: b"\x55" * 32})
    assert image_id(**base) != image_id(**changed)


def test_swapping_two_digests_changes_the_id() -> None:
    a, b = b"\x11" * 32, b"\x22" * 32
    assert image_id(kernel=a, initrd=b, ipxe_script=a, boot_digest=a) != \
        image_id(kernel=b, initrd=a, ipxe_script=a, boot_digest=a)


def _without(*path: str) -> dict[str, Any]:
    spec = json.loads(json.dumps(SPEC))
    target = spec
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return spec


def _with(value: Any, *path: str) -> dict[str, Any]:
    spec = json.loads(json.dumps(SPEC))
    target = spec
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return spec


@pytest.mark.parametrize(("spec", "field"), [
    pytest.param(_without("bootDigest"), "spec.bootDigest: missing", id="no-boot-digest"),
    pytest.param(_without("kernel"), "spec.kernel: missing", id="no-kernel"),
    pytest.param(_without("initrd", "digest"), "spec.initrd.digest: missing", id="no-initrd-digest"),
    pytest.param(_with("oops", "ipxeScript"), "spec.ipxeScript: missing", id="script-not-a-mapping"),
    pytest.param(_with("sha256:" + "A" * 64, "kernel", "digest"), "spec.kernel.digest", id="uppercase-hex"),
    pytest.param(_with("sha512:" + "a" * 64, "initrd", "digest"), "spec.initrd.digest", id="wrong-algorithm"),
    pytest.param(_with("sha256:" + "a" * 63, "bootDigest"), "spec.bootDigest", id="short-boot-digest"),
    pytest.param(_with(42, "bootDigest"), "spec.bootDigest", id="boot-digest-not-a-string"),
])
def test_a_bad_spec_is_refused_naming_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(BootImageSpecError, match=field.replace(".", r"\.")):
        image_id_of_spec(spec)


def test_a_digest_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(BootImageSpecError, match="kernel"):
        image_id(kernel=b"\x11" * 31, initrd=b"\x22" * 32, ipxe_script=b"\x33" * 32, boot_digest=b"\x44" * 32)


def _manifest(tmp_path: Path, spec: dict[str, Any]) -> Path:
    path = tmp_path / "bootimage.yaml"
    path.write_text(json.dumps({"apiVersion": "trustcap.io/v1alpha1", "kind": "BootImage",
                                "metadata": {"name": "img"}, "spec": spec}))
    return path


def test_cli_prints_the_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bootimage", "id", str(_manifest(tmp_path, SPEC))]) == 0
    assert capsys.readouterr().out.strip() == "0x" + VECTOR


@pytest.mark.parametrize(("content", "needle"), [
    pytest.param(None, "spec.bootDigest: missing", id="missing-boot-digest"),
    pytest.param("kind: Capsule\nspec: {}\n", "kind BootImage, found 0", id="not-a-bootimage"),
    pytest.param("kind: BootImage\nspec: [1]\n", "spec: missing or not a mapping", id="spec-not-mapping"),
    pytest.param("kind: BootImage\nspec: {a: [\n", "not valid YAML", id="broken-yaml"),
])
def test_cli_names_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None,
                                 needle: str) -> None:
    if content is None:
        path = _manifest(tmp_path, _without("bootDigest"))
    else:
        path = tmp_path / "bad.yaml"
        path.write_text(content)
    assert main(["bootimage", "id", str(path)]) == 1
    captured = capsys.readouterr()
    assert needle in " ".join(captured.err.split()), captured.err
    assert captured.out == ""


def test_cli_names_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bootimage", "id", str(tmp_path / "nope.yaml")]) == 1
    assert "nope.yaml" in capsys.readouterr().err
