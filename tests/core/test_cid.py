"""CIDv1 raw sha2-256: published IPFS vectors, round trips, and every way a CID string can be wrong."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustcap import cid
from trustcap.cid import CidError, CidMismatch

VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).parents[1] / "data" / "cid_vectors.json").read_text())["vectors"]


def _b32(raw: bytes) -> str:
    return "b" + base64.b32encode(raw).decode().lower().rstrip("=")


@pytest.mark.parametrize("v", [pytest.param(v, id=v["id"]) for v in VECTORS])
def test_matches_ipfs(v: dict[str, Any], tmp_path: Path) -> None:
    data = bytes.fromhex(v["data_hex"])
    assert cid.compute(data) == v["cid"]
    assert cid.compute_stream(io.BytesIO(data), chunk=3) == v["cid"]
    (tmp_path / "f").write_bytes(data)
    assert cid.compute_file(tmp_path / "f") == v["cid"]
    assert str(cid.parse(v["cid"])) == v["cid"]
    cid.verify(v["cid"], data)


def test_verify_refuses_other_data() -> None:
    with pytest.raises(CidMismatch, match="does not match"):
        cid.verify(VECTORS[1]["cid"], b"hello World")


GOOD = VECTORS[1]["cid"]
DIGEST = cid.parse(GOOD).digest


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("", "empty", id="empty"),
        pytest.param("QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG", "CIDv0", id="cidv0"),
        pytest.param("z" + GOOD[1:], "multibase prefix 'z'", id="base58-prefix"),
        pytest.param(GOOD.upper(), "multibase prefix 'B'", id="uppercase"),
        pytest.param("b" + GOOD[1:].upper(), "outside base32", id="uppercase-body"),
        pytest.param(GOOD + "=", "outside base32", id="padding"),
        pytest.param(GOOD[:-1] + "1", "outside base32", id="bad-char"),
        pytest.param(GOOD + "a" * 80, "characters long", id="too-long"),
        pytest.param(_b32(bytes([2, 0x55, 0x12, 32]) + DIGEST), "version is 2", id="version-2"),
        pytest.param(_b32(bytes([1, 0x70, 0x12, 32]) + DIGEST), "codec is 0x70", id="dag-pb-codec"),
        pytest.param(_b32(bytes([1, 0x71, 0x12, 32]) + DIGEST), "codec is 0x71", id="dag-cbor-codec"),
        pytest.param(_b32(bytes([1, 0x55, 0x1E, 32]) + DIGEST), "hash is 0x1e", id="blake3"),
        pytest.param(_b32(bytes([1, 0x55, 0x12, 20]) + DIGEST[:20]), "digest length is 20", id="short-length"),
        pytest.param(_b32(bytes([1, 0x55, 0x12, 32]) + DIGEST[:31]), "31 bytes", id="truncated-digest"),
        pytest.param(_b32(bytes([1, 0x55, 0x12, 32]) + DIGEST + b"\x00"), "33 bytes", id="trailing-byte"),
        pytest.param(_b32(bytes([0x81, 0x00, 0x55, 0x12, 32]) + DIGEST), "not minimally", id="non-minimal-varint"),
        pytest.param(_b32(bytes([1, 0x55, 0x12])), "truncated", id="no-length"),
        pytest.param(_b32(b"\xff" * 12), "truncated or malformed", id="endless-varint"),
        pytest.param(GOOD[:-1] + "f", "canonical", id="non-canonical-tail-bits"),
    ],
)
def test_parse_refuses(text: str, message: str) -> None:
    with pytest.raises(CidError, match=message):
        cid.parse(text)


def test_parse_refuses_non_string() -> None:
    with pytest.raises(CidError, match="must be a string"):
        cid.parse(b"bafk")  # type: ignore[arg-type]


@given(st.binary(max_size=4096))
def test_roundtrip(data: bytes) -> None:
    text = cid.compute(data)
    assert text.startswith("bafkrei") and len(text) == 59
    assert str(cid.parse(text)) == text
    cid.verify(text, data)


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.text(max_size=120), st.text(alphabet="abcdefghijklmnopqrstuvwxyz234567", max_size=70),
                 st.binary(max_size=60).map(_b32)))
def test_fuzz_parse_never_crashes(text: str) -> None:
    """Random strings, random base32, random bytes behind a 'b': a CID or our own CidError, nothing else."""
    try:
        parsed = cid.parse(text)
    except CidError:
        return
    assert str(parsed) == text
