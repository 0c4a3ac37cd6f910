"""ECVRF-P256-SHA256-TAI against every RFC 9381 Appendix B.1 vector, intermediate values included, and
every way a proof or key can be malformed or forged."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from trustcap import _p256, vrf
from trustcap.errors import InvalidKey, InvalidProof, TrustcapError

DATA = json.loads((Path(__file__).parents[1] / "data" / "rfc9381_p256_sha256_tai.json").read_text())
VECTORS: list[dict[str, Any]] = DATA["vectors"]
_Q = vrf._Q
_P = vrf._P


def _cases() -> list[Any]:
    return [pytest.param(v, id=v["id"]) for v in VECTORS]


def test_every_appendix_b1_example_is_present() -> None:
    assert [v["id"] for v in VECTORS] == ["example-10", "example-11", "example-12"]


@pytest.mark.parametrize("v", _cases())
def test_public_key_matches_rfc(v: dict[str, Any]) -> None:
    assert vrf.public_key(bytes.fromhex(v["SK"])).hex() == v["PK"]


@pytest.mark.parametrize("v", _cases())
def test_prove_reproduces_pi(v: dict[str, Any]) -> None:
    assert vrf.prove(bytes.fromhex(v["SK"]), bytes.fromhex(v["alpha"])).hex() == v["pi"]


@pytest.mark.parametrize("v", _cases())
def test_verify_returns_beta(v: dict[str, Any]) -> None:
    beta = vrf.verify(bytes.fromhex(v["PK"]), bytes.fromhex(v["pi"]), bytes.fromhex(v["alpha"]))
    assert beta.hex() == v["beta"]


@pytest.mark.parametrize("v", _cases())
def test_proof_to_hash_and_evaluate_give_beta(v: dict[str, Any]) -> None:
    assert vrf.proof_to_hash(bytes.fromhex(v["pi"])).hex() == v["beta"]
    assert vrf.evaluate(bytes.fromhex(v["SK"]), bytes.fromhex(v["alpha"])).hex() == v["beta"]


@pytest.mark.parametrize("v", _cases())
def test_intermediate_values_match_rfc(v: dict[str, Any]) -> None:
    """H (encode_to_curve), k (RFC 6979 nonce), U = k*B and V = k*H, each as the RFC prints them."""
    x = int(v["SK"], 16)
    h_point, ctr = vrf._encode_to_curve(bytes.fromhex(v["PK"]), bytes.fromhex(v["alpha"]))
    h_string = vrf._point_to_string(h_point)
    assert h_string.hex() == v["H"]
    if "ctr" in v:
        assert ctr == v["ctr"]
    k = vrf._nonce(x, h_string)
    assert f"{k:064x}" == v["k"]
    assert vrf._point_to_string(_p256.base_mul(k)).hex() == v["U"]
    assert vrf._point_to_string(_p256.mul(h_point, k)).hex() == v["V"]


@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in DATA["rfc6979"]])
def test_nonce_generation_is_rfc6979_section_3_2(case: dict[str, Any]) -> None:
    """RFC 9381 5.4.2.1 is RFC 6979 3.2 over m = h_string: the same code must give RFC 6979's own k."""
    k = vrf._nonce(int(case["x"], 16), case["message_ascii"].encode())
    assert f"{k:064x}" == case["k"]


EX10 = VECTORS[0]
PK10 = bytes.fromhex(EX10["PK"])
PI10 = bytes.fromhex(EX10["pi"])
ALPHA10 = bytes.fromhex(EX10["alpha"])


def _with(pi: bytes, offset: int, new: bytes) -> bytes:
    return pi[:offset] + new + pi[offset + len(new):]


def _off_curve_x() -> bytes:
    """The smallest x whose x^3 + ax + b is not a square mod p: no point has it, in either parity."""
    for x in range(1, 100):
        rhs = (pow(x, 3, _P) + vrf._A * x + vrf._BCOEF) % _P
        if pow(rhs, (_P - 1) // 2, _P) != 1:
            return x.to_bytes(32, "big")
    raise AssertionError("no off-curve x below 100")  # pragma: no cover


OFF_X = _off_curve_x()

BAD_PROOFS = [
    pytest.param(b"", "must be 81 bytes", id="empty"),
    pytest.param(PI10[:-1], "must be 81 bytes", id="truncated"),
    pytest.param(PI10 + b"\x00", "must be 81 bytes", id="one-byte-too-long"),
    pytest.param(_with(PI10, 0, b"\x04"), "Gamma is not a valid", id="gamma-uncompressed-tag"),
    pytest.param(_with(PI10, 0, b"\x00"), "Gamma is not a valid", id="gamma-identity-tag"),
    pytest.param(_with(PI10, 1, OFF_X), "Gamma is not a valid", id="gamma-off-curve"),
    pytest.param(_with(PI10, 1, (_P).to_bytes(32, "big")), "Gamma is not a valid", id="gamma-x-equals-p"),
    pytest.param(_with(PI10, 1, (2**256 - 1).to_bytes(32, "big")), "Gamma is not a valid", id="gamma-x-above-p"),
    pytest.param(_with(PI10, 49, _Q.to_bytes(32, "big")), "s is not below", id="s-equals-q"),
    pytest.param(_with(PI10, 49, (2**256 - 1).to_bytes(32, "big")), "s is not below", id="s-all-ones"),
    pytest.param(_with(PI10, 0, b"\x02"), "does not verify", id="gamma-other-parity"),
    pytest.param(_with(PI10, 33, bytes([PI10[33] ^ 1])), "does not verify", id="c-bit-flipped"),
    pytest.param(_with(PI10, 80, bytes([PI10[80] ^ 1])), "does not verify", id="s-bit-flipped"),
    pytest.param(_with(PI10, 49, b"\x00" * 32), "does not verify", id="s-zero"),
    pytest.param(_with(PI10, 33, b"\x00" * 16), "does not verify", id="c-zero"),
]


@pytest.mark.parametrize(("pi", "reason"), BAD_PROOFS)
def test_malformed_or_altered_proofs_are_refused(pi: bytes, reason: str) -> None:
    with pytest.raises(InvalidProof, match=reason):
        vrf.verify(PK10, pi, ALPHA10)


def test_every_single_byte_change_of_a_proof_is_refused() -> None:
    for i in range(len(PI10)):
        altered = _with(PI10, i, bytes([PI10[i] ^ 0x80]))
        with pytest.raises(InvalidProof):
            vrf.verify(PK10, altered, ALPHA10)


BAD_KEYS = [
    pytest.param(b"", id="empty"),
    pytest.param(PK10[:-1], id="truncated"),
    pytest.param(b"\x04" + PK10[1:], id="uncompressed-tag-on-33-bytes"),
    pytest.param(b"\x00" * 33, id="identity-tag"),
    pytest.param(b"\x02" + OFF_X, id="off-curve"),
    pytest.param(b"\x03" + _P.to_bytes(32, "big"), id="x-equals-p"),
]


@pytest.mark.parametrize("pk", BAD_KEYS)
def test_invalid_public_keys_are_refused(pk: bytes) -> None:
    with pytest.raises(InvalidProof, match="public key"):
        vrf.verify(pk, PI10, ALPHA10)


@pytest.mark.parametrize(
    ("pk", "alpha"),
    [
        pytest.param(bytes.fromhex(VECTORS[2]["PK"]), ALPHA10, id="wrong-key"),
        pytest.param(PK10, b"notsample", id="wrong-alpha"),
        pytest.param(PK10, b"", id="empty-alpha"),
        pytest.param(b"\x02" + PK10[1:], ALPHA10, id="key-negated"),
    ],
)
def test_valid_proof_under_wrong_key_or_input_is_refused(pk: bytes, alpha: bytes) -> None:
    with pytest.raises(InvalidProof, match="does not verify"):
        vrf.verify(pk, PI10, alpha)


def test_proof_for_other_input_does_not_verify() -> None:
    ex11 = VECTORS[1]
    with pytest.raises(InvalidProof):
        vrf.verify(PK10, bytes.fromhex(ex11["pi"]), ALPHA10)


@pytest.mark.parametrize(
    "sk",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x01" * 31, id="short"),
        pytest.param(b"\x00" * 32, id="zero"),
        pytest.param(_Q.to_bytes(32, "big"), id="equals-q"),
        pytest.param(b"\xff" * 32, id="above-q"),
    ],
)
def test_invalid_secret_keys_are_refused(sk: bytes) -> None:
    with pytest.raises(InvalidKey):
        vrf.prove(sk, b"x")
    with pytest.raises(InvalidKey):
        vrf.public_key(sk)


def test_non_bytes_inputs_raise_our_error() -> None:
    with pytest.raises(TrustcapError):
        vrf.verify("03" * 33, PI10, ALPHA10)  # type: ignore[arg-type]
    with pytest.raises(TrustcapError):
        vrf.verify(PK10, PI10.hex(), ALPHA10)  # type: ignore[arg-type]


def test_round_trip_with_fresh_keys() -> None:
    for i in range(5):
        sk = hashlib.sha256(b"vrf-round-trip-%d" % i).digest()
        pi = vrf.prove(sk, b"capsule-%d" % i)
        assert len(pi) == vrf.PI_LEN
        assert vrf.verify(vrf.public_key(sk), pi, b"capsule-%d" % i) == vrf.proof_to_hash(pi)
        assert len(vrf.proof_to_hash(pi)) == vrf.BETA_LEN
