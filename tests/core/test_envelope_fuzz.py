"""Fuzz the envelope parser and opener (hypothesis, bounded): random bytes, random headers behind a valid
preamble, and random mutations of a real envelope raise only our EnvelopeError, never anything else,
and never release plaintext."""

from __future__ import annotations

import hashlib
import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trustcap.capsule import EnvelopeError, KeyPair, open_stream, seal_bytes
from trustcap.capsule import envelope as env

KEY = KeyPair(bytes.fromhex("22" * 32))
OWNER = KeyPair(bytes.fromhex("11" * 32))
CAPSULE = hashlib.sha256(b"c").digest()
REAL = seal_bytes(b"fuzz me please", recipients=[KEY.public_key()], owner=OWNER, capsule_id=CAPSULE,
                  manifest_digest=CAPSULE, chunk_size=1024)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check(blob: bytes) -> None:
    out = io.BytesIO()
    try:
        open_stream(io.BytesIO(blob), out, key=KEY, owner=OWNER.public_key(), capsule_id=CAPSULE,
                    manifest_digest=CAPSULE)
    except EnvelopeError:
        assert out.getvalue() == b""
        return
    assert blob == REAL  # only the untouched envelope may open


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(blob: bytes) -> None:
    _check(blob)


@FUZZ
@given(st.binary(max_size=600))
def test_random_header_behind_a_valid_preamble(header: bytes) -> None:
    _check(env.MAGIC + bytes([env.VERSION]) + len(header).to_bytes(4, "big") + header + bytes(100))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(REAL) - 1), st.integers(1, 255)), min_size=1, max_size=8),
       st.integers(0, len(REAL)))
def test_mutations_of_a_real_envelope(flips: list[tuple[int, int]], cut: int) -> None:
    blob = bytearray(REAL)
    for pos, xor in flips:
        blob[pos] ^= xor
    _check(bytes(blob[: cut or len(blob)]))
