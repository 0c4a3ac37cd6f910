"""The native-arithmetic VRF (trustcap.vrf, on fastecdsa) against the pure-Python implementation it
replaced (tests/core/_vrf_pure_reference.py, on ecdsa), byte for byte, on random keys and inputs.

The RFC 9381 vectors (test_vrf.py) pin three points of the function; this pins the rest: the same pi,
beta and public key for many random (key, alpha), the same verdict on each other's proofs, and the
same refusals for tampered proofs, so that the change of arithmetic changed nothing a peer can see.
"""

from __future__ import annotations

import importlib.util
import os
import random
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
ROUNDS = 60


def _random_case(rng: random.Random) -> tuple[bytes, bytes]:
    x = rng.randrange(1, vrf._Q)
    alpha = rng.randbytes(rng.choice([0, 1, 7, 32, 100, 1000]))
    return x.to_bytes(32, "big"), alpha


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
