"""The native-arithmetic VRF (trustcap.vrf, on OpenSSL's libcrypto through trustcap._p256) against the
pure-Python implementation of before decision 0100 (tests/core/_vrf_pure_reference.py, on ecdsa), byte
for byte, on random keys and inputs.

The RFC 9381 vectors (test_vrf.py) pin three points of the function; this pins the rest: the same pi,
beta and public key for many random (key, alpha), the same verdict on each other's proofs, and the
same refusals, with the same message, for every kind of malformed or forged proof and key, so that a
change of arithmetic (fastecdsa in 0100, OpenSSL in 0101) changed nothing a peer can see.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from trustcap import vrf
from trustcap.errors import InvalidProof


def _reference() -> ModuleType:
    path = Path(__file__).with_name("_vrf_pure_reference.py")
    spec = importlib.util.spec_from_file_location("trustcap_vrf_pure_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REF = _reference()
ROUNDS = 100


def _random_case(rng: random.Random) -> tuple[bytes, bytes]:
    x = rng.randrange(1, vrf._Q)
    alpha = rng.randbytes(rng.choice([0, 1, 7, 32, 100, 1000]))
    return x.to_bytes(32, "big"), alpha


def _off_curve_x(rng: random.Random) -> bytes:
    """A random x below p for which x^3 + ax + b is no square: no point has it, in either parity."""
    while True:
        x = rng.randrange(vrf._P)
        if pow((pow(x, 3, vrf._P) + vrf._A * x + vrf._BCOEF) % vrf._P, (vrf._P - 1) // 2, vrf._P) == vrf._P - 1:
            return x.to_bytes(32, "big")


def forged_cases(rng: random.Random, pk: bytes, pi: bytes, alpha: bytes) -> list[tuple[str, bytes, bytes, bytes]]:
    """(kind, public key, proof, alpha): every way a proof or key can be malformed or forged, once each,
    with random contents: each is refused, most while decoding, the rest (another valid Gamma, c at its
    maximum, another key) because the challenge does not match. Also run once against the fastecdsa
    version before it was removed (decision 0101)."""
    gamma, c, s = pi[:33], pi[33:49], pi[49:]
    q, p = vrf._Q, vrf._P
    bit = rng.randrange(len(pi) * 8)
    flipped = bytearray(pi)
    flipped[bit // 8] ^= 1 << (bit % 8)
    other_point = vrf.public_key(rng.randrange(1, q).to_bytes(32, "big"))
    return [
        ("bit-flip", pk, bytes(flipped), alpha),
        ("gamma-off-curve", pk, bytes([rng.choice([2, 3])]) + _off_curve_x(rng) + c + s, alpha),
        ("gamma-x-at-or-above-p", pk, bytes([rng.choice([2, 3])]) + rng.randrange(p, 2**256).to_bytes(32, "big")
         + c + s, alpha),
        ("gamma-identity-encoding", pk, bytes(33) + c + s, alpha),
        ("gamma-bad-tag", pk, bytes([rng.choice([0, 1, 4, 5, 6, 7, 0xFF])]) + gamma[1:] + c + s, alpha),
        ("gamma-negated", pk, bytes([gamma[0] ^ 1]) + gamma[1:] + c + s, alpha),
        ("gamma-other-point", pk, other_point + c + s, alpha),
        ("truncated", pk, pi[: rng.randrange(len(pi))], alpha),
        ("extended", pk, pi + rng.randbytes(rng.randrange(1, 40)), alpha),
        ("s-at-or-above-q", pk, gamma + c + rng.randrange(q, 2**256).to_bytes(32, "big"), alpha),
        ("s-zero", pk, gamma + c + bytes(32), alpha),
        ("c-zero", pk, gamma + bytes(16) + s, alpha),
        ("c-max", pk, gamma + b"\xff" * 16 + s, alpha),
        ("u-identity", pk, gamma + bytes(16) + bytes(32), alpha),
        ("pk-off-curve", bytes([rng.choice([2, 3])]) + _off_curve_x(rng), pi, alpha),
        ("pk-x-at-or-above-p", b"\x03" + rng.randrange(p, 2**256).to_bytes(32, "big"), pi, alpha),
        ("pk-identity-encoding", bytes(33), pi, alpha),
        ("pk-uncompressed-tag", b"\x04" + pk[1:], pi, alpha),
        ("pk-wrong-length", pk[: rng.randrange(33)], pi, alpha),
        ("pk-other-key", other_point, pi, alpha),
        ("alpha-changed", pk, pi, alpha + b"\x00"),
    ]


REFUSAL = {  # kind -> the refusal each kind must meet (a bit flip may meet any of them)
    "gamma-off-curve": "Gamma is not a valid", "gamma-x-at-or-above-p": "Gamma is not a valid",
    "gamma-identity-encoding": "Gamma is not a valid", "gamma-bad-tag": "Gamma is not a valid",
    "gamma-negated": "does not verify for", "gamma-other-point": "does not verify for",
    "truncated": "must be 81 bytes", "extended": "must be 81 bytes", "s-at-or-above-q": "s is not below",
    "s-zero": "does not verify for", "c-zero": "does not verify for", "c-max": "does not verify for",
    "u-identity": "U or V is the identity", "pk-off-curve": "public key is not a valid",
    "pk-x-at-or-above-p": "public key is not a valid", "pk-identity-encoding": "public key is not a valid",
    "pk-uncompressed-tag": "public key is not a valid", "pk-wrong-length": "public key is not a valid",
    "pk-other-key": "does not verify for", "alpha-changed": "does not verify for", "bit-flip": "",
}


def verdict(module: ModuleType, pk: bytes, pi: bytes, alpha: bytes) -> tuple[str, str]:
    """("beta", hex) or ("refused", message): what a peer sees of one verify."""
    try:
        return "beta", module.verify(pk, pi, alpha).hex()
    except module.InvalidProof as exc:
        return "refused", str(exc)


def test_reference_is_the_pure_implementation() -> None:
    """Positive control: the oracle really is the other arithmetic, not trustcap.vrf again."""
    assert "ecdsa.ellipticcurve" in REF.PointJacobi.__module__
    assert not hasattr(REF, "_is_identity")


@pytest.mark.parametrize("seed", range(ROUNDS))
def test_same_key_proof_and_output_as_the_pure_implementation(seed: int) -> None:
    rng = random.Random(seed)  # noqa: S311 - reproducible test inputs, not key material
    sk, alpha = _random_case(rng)
    pk = vrf.public_key(sk)
    assert pk == REF.public_key(sk)
    pi = vrf.prove(sk, alpha)
    assert pi == REF.prove(sk, alpha)
    beta = vrf.verify(pk, pi, alpha)
    assert beta == REF.verify(pk, pi, alpha) == vrf.proof_to_hash(pi) == REF.proof_to_hash(pi)
    assert vrf.evaluate(sk, alpha) == REF.evaluate(sk, alpha) == beta


@pytest.mark.parametrize("seed", range(ROUNDS))
def test_same_refusals_as_the_pure_implementation(seed: int) -> None:
    """One random bit of the proof flipped, another key, another input: both implementations refuse."""
    rng = random.Random(10_000 + seed)  # noqa: S311 - reproducible test inputs
    sk, alpha = _random_case(rng)
    pk, pi = vrf.public_key(sk), vrf.prove(sk, alpha)
    other_pk = vrf.public_key(_random_case(rng)[0])
    bit = rng.randrange(len(pi) * 8)
    tampered = bytearray(pi)
    tampered[bit // 8] ^= 1 << (bit % 8)
    for args in ((pk, bytes(tampered), alpha), (other_pk, pi, alpha), (pk, pi, alpha + b"\x00")):
        with pytest.raises(InvalidProof):
            vrf.verify(*args)
        with pytest.raises(REF.InvalidProof):
            REF.verify(*args)


@pytest.mark.parametrize("seed", range(ROUNDS))
def test_every_forgery_gets_the_same_verdict_and_message(seed: int) -> None:
    """Off-curve or identity Gamma, bad tags, wrong lengths, s >= q, c and s zero, other keys: the same
    refusal with the same message from both, or (for a valid but wrong Gamma) the same "does not verify"."""
    rng = random.Random(20_000 + seed)  # noqa: S311 - reproducible test inputs
    sk, alpha = _random_case(rng)
    pk, pi = vrf.public_key(sk), vrf.prove(sk, alpha)
    assert verdict(vrf, pk, pi, alpha)[0] == "beta"  # positive control: the untouched proof verifies
    for kind, fpk, fpi, falpha in forged_cases(rng, pk, pi, alpha):
        ours = verdict(vrf, fpk, fpi, falpha)
        assert ours == verdict(REF, fpk, fpi, falpha), kind
        assert ours[0] == "refused" and REFUSAL[kind] in ours[1], (kind, ours)


def test_agrees_on_os_random_keys() -> None:
    """A second source of keys, so the comparison does not rest on one PRNG's values."""
    for _ in range(20):
        sk = os.urandom(32)
        if not 1 <= int.from_bytes(sk, "big") < vrf._Q:
            continue
        alpha = os.urandom(16)
        assert vrf.prove(sk, alpha) == REF.prove(sk, alpha)


def test_identity_results_are_refused_not_encoded() -> None:
    """A forged proof that makes U the identity (s = 0 and c = 0 gives U = 0*B - 0*Y) is refused with
    InvalidProof, as the pure implementation refuses it, never encoded or crashed on."""
    sk = (12345).to_bytes(32, "big")
    pk, pi = vrf.public_key(sk), vrf.prove(sk, b"a")
    forged = pi[:33] + bytes(16) + bytes(32)
    with pytest.raises(InvalidProof, match="identity"):
        vrf.verify(pk, forged, b"a")
    with pytest.raises(REF.InvalidProof, match="identity"):
        REF.verify(pk, forged, b"a")


def test_needs_neither_fastecdsa_nor_gmpy2() -> None:
    """Decision 0101 dropped both: a fresh interpreter where importing them fails still proves the RFC's
    example 10. Positive control: the same blocking does stop an import of fastecdsa."""
    example = json.loads((Path(__file__).parents[1] / "data" / "rfc9381_p256_sha256_tai.json").read_text())
    v = example["vectors"][0]
    block = "import sys; sys.modules['fastecdsa'] = sys.modules['gmpy2'] = None\n"
    sk, alpha = bytes.fromhex(v["SK"]), bytes.fromhex(v["alpha"])
    prove = block + f"from trustcap import vrf; print(vrf.prove({sk!r}, {alpha!r}).hex())"
    run = [sys.executable, "-P", "-c"]
    out = subprocess.run([*run, prove], capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert out == v["pi"]
    control = subprocess.run([*run, block + "import fastecdsa"], capture_output=True, text=True, timeout=60,
                             check=False)
    assert control.returncode != 0 and "import of fastecdsa halted" in control.stderr
