"""The secp256k1 primitives on libsecp256k1 (coincurve, decision 0100) against what they replaced, on
random keys and digests: eth_keys' pure-Python backend for signing and recovery, OpenSSL (through
`cryptography`) for ECDH. Same bytes out, same refusals, so signatures, addresses and envelopes made
before the change verify and open after it, and the other way round."""

from __future__ import annotations

import hashlib
import io
import random

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from eth_keys.backends import NativeECCBackend
from eth_keys.datatypes import PrivateKey, Signature

from trustcap.capsule import KeyPair, envelope
from trustcap.evidence import signing
from trustcap.trustroot import _secp256k1

PURE = NativeECCBackend()
ROUNDS = 40


def _secret(rng: random.Random) -> bytes:
    return rng.randrange(1, _secp256k1.N).to_bytes(32, "big")


def _pure_sign(secret: bytes, digest: bytes) -> bytes:
    sig = PrivateKey(secret, backend=PURE).sign_msg_hash(digest)
    return int(sig.r).to_bytes(32, "big") + int(sig.s).to_bytes(32, "big") + bytes([27 + int(sig.v)])


def test_the_reference_backend_is_pure_python() -> None:
    """Positive control: the comparison is against the other arithmetic, not coincurve twice."""
    assert type(PURE).__module__.startswith("eth_keys.backends.native")


@pytest.mark.parametrize("seed", range(ROUNDS))
def test_sign_recover_and_address_agree_with_pure_python(seed: int) -> None:
    rng = random.Random(seed)  # noqa: S311 - reproducible test inputs, not key material
    secret, digest = _secret(rng), rng.randbytes(32)
    pure_key = PrivateKey(secret, backend=PURE)
    compressed = bytes(pure_key.public_key.to_compressed_bytes())
    assert _secp256k1.public_key_from_secret(secret) == compressed
    sig = _secp256k1.sign(secret, digest)
    assert sig == _pure_sign(secret, digest)
    assert _secp256k1.recover(digest, sig) == compressed
    address = pure_key.public_key.to_checksum_address()
    assert signing.address_of(compressed) == address
    assert signing.recover_address(digest, sig) == address
    pure_recovered = Signature(vrs=(sig[64] - 27, int.from_bytes(sig[:32], "big"),
                                    int.from_bytes(sig[32:64], "big")), backend=PURE)
    assert pure_recovered.recover_public_key_from_msg_hash(digest).to_checksum_address() == address


@pytest.mark.parametrize("seed", range(ROUNDS))
def test_a_changed_digest_or_signature_recovers_someone_else(seed: int) -> None:
    rng = random.Random(1000 + seed)  # noqa: S311 - reproducible test inputs
    secret, digest = _secret(rng), rng.randbytes(32)
    sig = _secp256k1.sign(secret, digest)
    me = signing.recover_address(digest, sig)
    other_digest = bytes([digest[0] ^ 1]) + digest[1:]
    assert signing.recover_address(other_digest, sig) != me
    flipped = bytearray(sig)
    flipped[rng.randrange(64)] ^= 1 << rng.randrange(8)
    try:
        assert signing.recover_address(digest, bytes(flipped)) != me
    except signing.SignatureError:
        pass  # out of range or no point: refused outright, which is as good
    high_s = sig[:32] + (_secp256k1.N - int.from_bytes(sig[32:64], "big")).to_bytes(32, "big") + sig[64:]
    assert _secp256k1.recover(digest, high_s) is None
    with pytest.raises(signing.SignatureError, match="high s"):
        signing.recover_address(digest, high_s)


def test_address_of_refuses_what_is_not_a_compressed_key() -> None:
    uncompressed = b"\x04" + bytes(64)
    for bad in (b"", b"\x02" + bytes(31), uncompressed, b"\x05" + bytes(32), b"\x02" + b"\xff" * 32):
        with pytest.raises(signing.SignatureError):
            signing.address_of(bad)


@pytest.mark.parametrize("seed", range(10))
def test_ecdh_is_the_openssl_shared_secret(seed: int) -> None:
    """Envelope wrapping keys come from this value: it must be OpenSSL's x-coordinate exactly."""
    rng = random.Random(2000 + seed)  # noqa: S311 - reproducible test inputs
    mine, theirs = KeyPair(_secret(rng)), KeyPair(_secret(rng))
    openssl_mine = ec.derive_private_key(int.from_bytes(mine._secret, "big"), ec.SECP256K1())
    peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), theirs.public_key())
    assert mine.ecdh(theirs.public_key()) == openssl_mine.exchange(ec.ECDH(), peer)
    with pytest.raises(ValueError):
        mine.ecdh(b"\x02" + b"\xff" * 32)


def test_recipient_slots_cross_between_openssl_and_libsecp256k1() -> None:
    """Byte compatibility of the format: a slot wrapped the old way (OpenSSL ephemeral key and ECDH)
    unwraps with the new opener, and a slot of a new seal unwraps with an OpenSSL-computed secret."""
    owner, alice = KeyPair.generate(), KeyPair.generate()
    capsule, manifest = hashlib.sha256(b"c").digest(), hashlib.sha256(b"m").digest()
    alice_openssl = ec.derive_private_key(int.from_bytes(alice._secret, "big"), ec.SECP256K1())
    cek = bytes(range(32))
    eph = ec.generate_private_key(ec.SECP256K1())
    enc = eph.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    shared = eph.exchange(ec.ECDH(), alice_openssl.public_key())
    old_slot = (enc, envelope._kek(shared, enc, alice.public_key(), capsule, manifest).encrypt(
        bytes(12), cek, envelope._CEK_AAD))
    header = envelope.Header(capsule, manifest, envelope.DEFAULT_CHUNK, 0, bytes(7), owner.public_key(), (old_slot,))
    assert envelope._unwrap(header, alice) == cek

    blob = envelope.seal_bytes(b"payload" * 1000, recipients=[alice.public_key()], owner=owner,
                               capsule_id=capsule, manifest_digest=manifest)
    new_header, _ = envelope.read_header(io.BytesIO(blob))
    new_enc, wrapped = new_header.recipients[0]
    openssl_shared = alice_openssl.exchange(
        ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), new_enc))
    kek = envelope._kek(openssl_shared, new_enc, alice.public_key(), capsule, manifest)
    assert kek.decrypt(bytes(12), wrapped, envelope._CEK_AAD) == envelope._unwrap(new_header, alice)
    assert envelope.open_bytes(blob, key=alice, owner=owner.public_key(), capsule_id=capsule,
                               manifest_digest=manifest) == b"payload" * 1000


@pytest.mark.parametrize("seed", range(10))
def test_recovers_key_is_true_only_for_the_signing_key(seed: int) -> None:
    """The appraisal compares keys instead of addresses: the signer's key passes (positive control),
    another key fails, and a malformed key or signature is an error, never a pass."""
    rng = random.Random(3000 + seed)  # noqa: S311 - reproducible test inputs
    secret, other, digest = _secret(rng), _secret(rng), rng.randbytes(32)
    sig = _secp256k1.sign(secret, digest)
    mine, theirs = _secp256k1.public_key_from_secret(secret), _secp256k1.public_key_from_secret(other)
    assert signing.recovers_key(digest, sig, mine)
    assert not signing.recovers_key(digest, sig, theirs)
    assert not signing.recovers_key(bytes([digest[0] ^ 1]) + digest[1:], sig, mine)
    with pytest.raises(signing.SignatureError):
        signing.recovers_key(digest, sig, b"\x04" + bytes(64))
    with pytest.raises(signing.SignatureError):
        signing.recovers_key(digest, sig[:64] + b"\x1d", mine)


@pytest.mark.parametrize("seed", range(20))
def test_recovers_address_agrees_with_recover_address(seed: int) -> None:
    """The appraisal compares the 20 address bytes instead of EIP-55 strings: the signer's address passes
    in either case form (positive control), another address or digest fails, a string that is no address
    fails, and a malformed signature is an error, never a pass."""
    rng = random.Random(4000 + seed)  # noqa: S311 - reproducible test inputs
    secret, other, digest = _secret(rng), _secret(rng), rng.randbytes(32)
    sig = _secp256k1.sign(secret, digest)
    mine = signing.address_of(_secp256k1.public_key_from_secret(secret))
    theirs = signing.address_of(_secp256k1.public_key_from_secret(other))
    assert signing.recover_address(digest, sig) == mine
    assert signing.recovers_address(digest, sig, mine) and signing.recovers_address(digest, sig, mine.lower())
    assert not signing.recovers_address(digest, sig, theirs)
    assert not signing.recovers_address(bytes([digest[0] ^ 1]) + digest[1:], sig, mine)
    for bad in (mine[:-1], mine + "0", "0x" + "zz" * 20, mine[2:] + "00", ""):
        assert not signing.recovers_address(digest, sig, bad)
    with pytest.raises(signing.SignatureError):
        signing.recovers_address(digest, sig[:64] + b"\x1d", mine)
