"""The sealed envelope: round trips, and every attack the issue names: any altered byte, a wrong key,
a truncated file, an envelope replayed for another capsule, a forged or re-signed header."""

from __future__ import annotations

import hashlib
import io
import json

import pytest

from trustcap import canonical
from trustcap.capsule import (
    EnvelopeError,
    EnvelopeReplayed,
    EnvelopeTampered,
    EnvelopeTruncated,
    KeyPair,
    NotARecipient,
    open_bytes,
    open_stream,
    read_header,
    seal_bytes,
)
from trustcap.capsule import envelope as env
from trustcap.trustroot import SoftwareTrustRoot

CAPSULE = hashlib.sha256(b"capsule-a").digest()
MANIFEST = hashlib.sha256(b"manifest-a").digest()
OWNER = KeyPair(bytes.fromhex("11" * 32))
ALICE = KeyPair(bytes.fromhex("22" * 32))
BOB = KeyPair(bytes.fromhex("33" * 32))
MALLORY = KeyPair(bytes.fromhex("44" * 32))


def _seal(data: bytes, recipients: list[KeyPair] | None = None, chunk: int = 1024) -> bytes:
    return seal_bytes(data, recipients=[r.public_key() for r in recipients or [ALICE, BOB]], owner=OWNER,
                      capsule_id=CAPSULE, manifest_digest=MANIFEST, chunk_size=chunk)


def _open(blob: bytes, key: KeyPair = ALICE, **kw: bytes) -> bytes:
    kw.setdefault("capsule_id", CAPSULE)
    kw.setdefault("manifest_digest", MANIFEST)
    kw.setdefault("owner", OWNER.public_key())
    return open_bytes(blob, key=key, **kw)


@pytest.mark.parametrize(
    "size", [pytest.param(0, id="empty"), pytest.param(1, id="one-byte"), pytest.param(1024, id="one-full-chunk"),
             pytest.param(1025, id="chunk-plus-one"), pytest.param(10_000, id="several-chunks")])
def test_every_recipient_opens(size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    blob = _seal(data)
    assert _open(blob, ALICE) == data
    assert _open(blob, BOB) == data
    assert size < 16 or data[:16] not in blob


def test_a_trust_root_can_sign_as_owner(tmp_path: object) -> None:
    from pathlib import Path
    root = SoftwareTrustRoot.create(Path(str(tmp_path)), bytes(32))
    blob = seal_bytes(b"x", recipients=[ALICE.public_key()], owner=root, capsule_id=CAPSULE,
                      manifest_digest=MANIFEST)
    assert open_bytes(blob, key=ALICE, owner=root.public_key(), capsule_id=CAPSULE, manifest_digest=MANIFEST) == b"x"


def test_wrong_key_is_not_a_recipient() -> None:
    with pytest.raises(NotARecipient, match="not a recipient"):
        _open(_seal(b"secret"), MALLORY)


def test_every_byte_altered_is_refused_and_nothing_is_written() -> None:
    blob = _seal(b"small secret", [ALICE], chunk=1024)
    for i in range(len(blob)):
        for flip in (0x01, 0x80):
            altered = blob[:i] + bytes([blob[i] ^ flip]) + blob[i + 1:]
            out = io.BytesIO()
            with pytest.raises(EnvelopeError):
                open_stream(io.BytesIO(altered), out, key=ALICE, owner=OWNER.public_key(), capsule_id=CAPSULE,
                            manifest_digest=MANIFEST)
            assert out.getvalue() == b"", f"plaintext released for a flip at byte {i}"


def test_every_truncation_and_extension_is_refused() -> None:
    blob = _seal(b"small secret", [ALICE])
    for n in range(len(blob)):
        with pytest.raises(EnvelopeError):
            _open(blob[:n])
    with pytest.raises(EnvelopeTruncated, match="header says"):
        _open(blob[:-1])
    with pytest.raises(EnvelopeTruncated, match="header says"):
        _open(blob + b"\x00")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        pytest.param({"capsule_id": hashlib.sha256(b"capsule-b").digest()}, "bound to capsule", id="other-capsule"),
        pytest.param({"manifest_digest": hashlib.sha256(b"m-b").digest()}, "bound to manifest", id="other-manifest"),
        pytest.param({"owner": MALLORY.public_key()}, "not the expected owner", id="other-owner"),
    ],
)
def test_authentic_envelope_for_another_capsule_is_a_replay(kw: dict[str, bytes], message: str) -> None:
    with pytest.raises(EnvelopeReplayed, match=message):
        _open(_seal(b"for capsule a"), ALICE, **kw)


def _resign(blob: bytes, edit_header: dict[str, object] | None = None, edit_body: int | None = None,
            signer: KeyPair = MALLORY) -> bytes:
    """What an attacker with its own key can build from a captured envelope."""
    _, head = read_header(io.BytesIO(blob))
    doc = json.loads(head[11:])
    if edit_header:
        doc.update(edit_header)
    raw = canonical.encode(doc)
    body = bytearray(blob[len(head):-65])
    if edit_body is not None:
        body[edit_body] ^= 1
    prefix = env.MAGIC + bytes([env.VERSION]) + len(raw).to_bytes(4, "big") + raw + bytes(body)
    digest = hashlib.sha256(b"trustcap/envelope/v1/signature" + prefix).digest()
    return prefix + signer.sign_digest(digest)


def test_resigned_envelope_with_a_new_capsule_id_does_not_open() -> None:
    other = hashlib.sha256(b"capsule-b").digest()
    forged = _resign(_seal(b"secret"), {"capsuleId": "0x" + other.hex(), "owner": "0x" + MALLORY.public_key().hex()})
    with pytest.raises(EnvelopeReplayed, match="not the expected owner"):
        _open(forged, capsule_id=other)
    # even an opener that expects the forger as owner gets nothing: the content key is bound to the capsule
    with pytest.raises((NotARecipient, EnvelopeTampered)):
        open_bytes(forged, key=ALICE, owner=MALLORY.public_key(), capsule_id=other, manifest_digest=MANIFEST)


def test_owner_who_signs_a_corrupt_chunk_is_caught_at_the_chunk() -> None:
    blob = _seal(b"x" * 3000, [ALICE])
    forged = _resign(blob, edit_body=1500, signer=OWNER)
    with pytest.raises(EnvelopeTampered, match="chunk 1 does not authenticate"):
        _open(forged)


def test_reordered_chunks_are_refused() -> None:
    blob = _seal(b"a" * 1024 + b"b" * 1024 + b"c" * 10, [ALICE])
    _, head = read_header(io.BytesIO(blob))
    c = 1024 + 16
    body = blob[len(head):-65]
    swapped = body[c:2 * c] + body[:c] + body[2 * c:]
    prefix = head + swapped
    forged = prefix + OWNER.sign_digest(hashlib.sha256(b"trustcap/envelope/v1/signature" + prefix).digest())
    with pytest.raises(EnvelopeTampered, match="chunk 0"):
        _open(forged)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        pytest.param({"suite": "x25519"}, "suite", id="suite"),
        pytest.param({"chunkSize": 1}, "chunkSize", id="chunk-too-small"),
        pytest.param({"plaintextLength": -1}, "plaintextLength", id="negative-length"),
        pytest.param({"plaintextLength": 1.5}, "plaintextLength", id="float-length"),
        pytest.param({"owner": "0x02"}, "owner", id="short-owner"),
        pytest.param({"recipients": []}, "recipients", id="no-recipients"),
        pytest.param({"recipients": [{"enc": "0x" + "02" * 33}]}, "exactly 'enc' and 'wrapped'", id="slot-fields"),
        pytest.param({"extra": 1}, "exactly the fields", id="extra-field"),
    ],
)
def test_malformed_header_fields_are_named(edit: dict[str, object], message: str) -> None:
    with pytest.raises(EnvelopeError, match=message):
        _open(_resign(_seal(b"x"), edit))


@pytest.mark.parametrize(
    ("blob", "error", "message"),
    [
        pytest.param(b"", EnvelopeTruncated, "shorter than its preamble", id="empty"),
        pytest.param(b"TCENV", EnvelopeTruncated, "shorter than its preamble", id="magic-only"),
        pytest.param(b"PK\x03\x04" + bytes(20), EnvelopeError, "bad magic", id="zip-file"),
        pytest.param(env.MAGIC + b"\x02" + bytes(4), EnvelopeError, "version 2", id="future-version"),
        pytest.param(env.MAGIC + b"\x01" + (1 << 30).to_bytes(4, "big"), EnvelopeError, "header length",
                     id="huge-hlen"),
        pytest.param(env.MAGIC + b"\x01" + (10).to_bytes(4, "big") + b"{}", EnvelopeTruncated, "ends early",
                     id="header-cut"),
        pytest.param(env.MAGIC + b"\x01" + (2).to_bytes(4, "big") + b"[]", EnvelopeError, "exactly the fields",
                     id="header-array"),
        pytest.param(env.MAGIC + b"\x01" + (2).to_bytes(4, "big") + b"\xff\xfe", EnvelopeError, "not JSON",
                     id="header-binary"),
    ],
)
def test_garbage_is_refused_clearly(blob: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        _open(blob)


def test_non_canonical_header_is_refused() -> None:
    blob = _seal(b"x")
    _, head = read_header(io.BytesIO(blob))
    pretty = json.dumps(json.loads(head[11:]), indent=1).encode()
    prefix = env.MAGIC + b"\x01" + len(pretty).to_bytes(4, "big") + pretty + blob[len(head):-65]
    forged = prefix + OWNER.sign_digest(hashlib.sha256(b"trustcap/envelope/v1/signature" + prefix).digest())
    with pytest.raises(EnvelopeError, match="canonical"):
        _open(forged)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        pytest.param({"recipients": []}, "1 to 16 recipients", id="no-recipients"),
        pytest.param({"recipients": [b"\x02" + bytes(32)]}, "not a secp256k1 public key", id="bad-recipient"),
        pytest.param({"capsule_id": b"short"}, "32 bytes", id="short-capsule-id"),
    ],
)
def test_seal_refuses_bad_arguments(kw: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"recipients": [ALICE.public_key()], "owner": OWNER, "capsule_id": CAPSULE,
                               "manifest_digest": MANIFEST}
    args.update(kw)
    with pytest.raises(EnvelopeError, match=message):
        seal_bytes(b"x", **args)  # type: ignore[arg-type]


def test_seal_refuses_short_input() -> None:
    with pytest.raises(EnvelopeError, match="input ended"):
        env.seal_stream(io.BytesIO(b"abc"), io.BytesIO(), length=10, recipients=[ALICE.public_key()], owner=OWNER,
                        capsule_id=CAPSULE, manifest_digest=MANIFEST)
