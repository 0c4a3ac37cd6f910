"""Fuzz every parser of the trust core this file's owner wrote: VRF proofs and keys, Merkle proofs, signed
quotes, signed verdicts, policies. Random bytes, random JSON and mutations of valid encodings; nothing
may escape but our own TrustcapError subclasses. Bounded: a fixed number of examples per target, no
deadline per example, no example database written to disk."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trustcap import merkle, vrf
from trustcap.chain.keys import KeySigner
from trustcap.errors import TrustcapError
from trustcap.evidence import (
    Domain,
    EvidenceFormatError,
    NonceRegistry,
    Verdict,
    appraise_quote,
    check_policy,
    decode_signed_quote,
    decode_signed_verdict,
    encode_signed_quote,
    encode_signed_verdict,
    new_quote,
    parse_policy,
    sign_quote,
    sign_verdict,
    verify_verdict,
)

FUZZ = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


AGENT, GATEWAY = (KeySigner(hashlib.sha256(seed).digest()) for seed in (b"fuzz-agent", b"fuzz-gateway"))
NONCE = b"\x33" * 32
DOMAIN = Domain(chain_id=31337, verifying_contract=GATEWAY.address)
VALID_QUOTE = encode_signed_quote(
    sign_quote(
        new_quote(
            nonce=NONCE, issued_at=1000, node_id="hpc-1", gateway=GATEWAY.address, agent_key=AGENT.public_key(),
            boot_image_digest=b"\x44" * 32, measurements={"kernel": "0x" + "55" * 32},
            capsule_state={"phase": "idle", "containers": 0},
        ),
        AGENT,
        GATEWAY,
    )
)
VALID_VERDICT = encode_signed_verdict(
    sign_verdict(
        Verdict(
            attestation_id="0x" + "11" * 32, node=GATEWAY.address, verifier=AGENT.address, phase=1, passed=True,
            quote_digest="0x" + "22" * 32, policy_digest="0x" + "33" * 32, epoch=1, issued_at=1000,
        ),
        DOMAIN,
        AGENT,
    )
)
VALID_POLICY = f"bootImages: ['0x{'44' * 32}']\nmeasurements: {{kernel: {{equals: '0x{'55' * 32}'}}}}\n"
SK = hashlib.sha256(b"fuzz-vrf").digest()
PK = vrf.public_key(SK)
PI = vrf.prove(SK, b"fuzz")


def _only_our_errors(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except TrustcapError:
        pass


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    buf = bytearray(data)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    return bytes(buf[:cut] if cut is not None else buf)


EDITS = st.lists(st.tuples(st.integers(min_value=0, max_value=10**6), st.integers(0, 255)), max_size=6)
CUT = st.none() | st.integers(min_value=0, max_value=2000)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


# --- VRF ----------------------------------------------------------------------------------------------------


@FUZZ
@given(pi=st.binary(max_size=120), pk=st.binary(max_size=40), alpha=st.binary(max_size=40))
def test_fuzz_vrf_verify_random_bytes(pi: bytes, pk: bytes, alpha: bytes) -> None:
    _only_our_errors(lambda: vrf.verify(pk, pi, alpha))
    _only_our_errors(lambda: vrf.proof_to_hash(pi))


@FUZZ
@given(edits=EDITS, cut=CUT)
def test_fuzz_vrf_mutated_proofs(edits: list[tuple[int, int]], cut: int | None) -> None:
    mutated = _mutate(PI, edits, cut)
    try:
        beta = vrf.verify(PK, mutated, b"fuzz")
    except TrustcapError:
        return
    assert mutated == PI and beta == vrf.proof_to_hash(PI)  # only the genuine proof may verify


@FUZZ
@given(sk=st.binary(max_size=40), alpha=st.binary(max_size=40))
def test_fuzz_vrf_secret_keys(sk: bytes, alpha: bytes) -> None:
    _only_our_errors(lambda: vrf.public_key(sk))


# --- Merkle -------------------------------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=400), root=st.binary(max_size=40), leaf=st.binary(max_size=40))
def test_fuzz_merkle_proof_parsing(data: bytes, root: bytes, leaf: bytes) -> None:
    def run() -> None:
        proof = merkle.decode_proof(data)
        assert merkle.verify_proof(root, leaf, proof) in (True, False)

    _only_our_errors(run)


@FUZZ
@given(leaves=st.lists(st.binary(min_size=0, max_size=40), max_size=9), index=st.integers(-2, 10))
def test_fuzz_merkle_trees(leaves: list[bytes], index: int) -> None:
    def run() -> None:
        tree = merkle.MerkleTree(leaves)
        proof = tree.proof(index)
        assert merkle.verify_proof(tree.root, leaves[index], proof)

    _only_our_errors(run)


# --- quotes, verdicts, policies ----------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=600))
def test_fuzz_quote_random_bytes(data: bytes) -> None:
    _only_our_errors(lambda: decode_signed_quote(data))


@FUZZ
@given(doc=JSON)
def test_fuzz_quote_random_json(doc: Any) -> None:
    _only_our_errors(lambda: decode_signed_quote(json.dumps(doc).encode()))


@FUZZ
@given(edits=EDITS, cut=CUT)
def test_fuzz_quote_mutations_then_appraisal(edits: list[tuple[int, int]], cut: int | None) -> None:
    """A mutated quote either fails to parse with our error, or parses and is appraised without a crash;
    and only the unmodified quote passes appraisal."""
    data = _mutate(VALID_QUOTE, edits, cut)

    def run() -> None:
        signed = decode_signed_quote(data)
        registry = NonceRegistry(60, clock=lambda: 1000.0, token=lambda n: NONCE)
        registry.issue()
        report = appraise_quote(
            signed, nonces=registry, expected_nonce=NONCE, node_id="hpc-1", agent_key=AGENT.public_key(),
            gateway_address=GATEWAY.address, now=1000.0, max_age_seconds=30,
        )
        report.merge(check_policy(signed.quote, parse_policy(VALID_POLICY)))
        if report.ok:
            assert encode_signed_quote(signed) == VALID_QUOTE

    _only_our_errors(run)


@FUZZ
@given(data=st.binary(max_size=400))
def test_fuzz_verdict_random_bytes(data: bytes) -> None:
    _only_our_errors(lambda: decode_signed_verdict(data))


def test_the_unmutated_verdict_verifies() -> None:
    """Positive control of the mutation fuzz: without it, a verdict that never verifies would pass it."""
    assert verify_verdict(decode_signed_verdict(VALID_VERDICT), domain=DOMAIN) == AGENT.address


@FUZZ
@given(edits=EDITS, cut=CUT)
def test_fuzz_verdict_mutations(edits: list[tuple[int, int]], cut: int | None) -> None:
    """A mutated verdict either fails with our error or is the unchanged verdict."""
    data = _mutate(VALID_VERDICT, edits, cut)

    def run() -> None:
        signed = decode_signed_verdict(data)
        signer = verify_verdict(signed, domain=DOMAIN)  # raises unless signed, by the verifier it names, for DOMAIN
        assert signer == AGENT.address and encode_signed_verdict(signed) == VALID_VERDICT  # only the genuine one

    _only_our_errors(run)


@FUZZ
@given(text=st.text(max_size=300))
def test_fuzz_policy_random_text(text: str) -> None:
    _only_our_errors(lambda: parse_policy(text))


@FUZZ
@given(edits=EDITS, cut=CUT)
def test_fuzz_policy_mutations(edits: list[tuple[int, int]], cut: int | None) -> None:
    data = _mutate(VALID_POLICY.encode(), edits, cut)
    _only_our_errors(lambda: parse_policy(data))


@pytest.mark.parametrize(
    "bomb",
    [
        pytest.param("a: &a [" + "*a," * 10 + "]", id="yaml-alias"),
        pytest.param("[" * 5000, id="deep-nesting"),
        pytest.param("!!python/object:os.system ls", id="python-tag"),
    ],
)
def test_hostile_policy_yaml_is_refused_with_our_error(bomb: str) -> None:
    with pytest.raises(EvidenceFormatError):
        parse_policy(bomb)
