"""Issue 12 item 17: an owner-bound open verifies exactly the bytes it decrypts, in one pass.

The attack: Bob is a co-recipient of an envelope that Owner sealed to Alice and Bob, so Bob knows the
content key. He re-encrypts forged chunks under it (they authenticate: same key, nonces and header) and
serves Alice a file that shows the genuine bytes to a first read and the forged ones to a second. An
opener that checks the signature in one pass and decrypts in another releases the forgery as Owner's.
"""

from __future__ import annotations

import hashlib
import io

import pytest

from trustcap.capsule import EnvelopeError, EnvelopeTampered, KeyPair, open_bytes, open_stream, read_header, seal_bytes
from trustcap.capsule import envelope as env

CAPSULE = hashlib.sha256(b"capsule-a").digest()
MANIFEST = hashlib.sha256(b"manifest-a").digest()
OWNER = KeyPair(bytes.fromhex("11" * 32))
ALICE = KeyPair(bytes.fromhex("22" * 32))
BOB = KeyPair(bytes.fromhex("33" * 32))
GENUINE = b"owner says: pay alice 1 coin;" * 100
FORGED = b"owner says: pay bobby 9 coin;" * 100
CHUNK = 1024


def _sealed() -> bytes:
    return seal_bytes(GENUINE, recipients=[ALICE.public_key(), BOB.public_key()], owner=OWNER, capsule_id=CAPSULE,
                      manifest_digest=MANIFEST, chunk_size=CHUNK)


def _bobs_forgery(blob: bytes) -> bytes:
    """Bob unwraps the content key with his own key and re-encrypts FORGED under it, keeping Owner's
    header and signature (which no longer match)."""
    header, head = read_header(io.BytesIO(blob))
    _, cek = env.unwrap_cek(head, BOB)
    aead = env.AESGCM(cek)
    aad = hashlib.sha256(head).digest()
    body = b"".join(
        aead.encrypt(env._nonce(header.nonce_prefix, i, i == header.chunk_count - 1),
                     FORGED[i * CHUNK:(i + 1) * CHUNK], aad)
        for i in range(header.chunk_count))
    return head + body + blob[-env.SIG_LEN:]


class _Swapping(io.BytesIO):
    """A file whose content changes once it has been read to its end: first the genuine envelope,
    afterwards the forgery."""

    def __init__(self, first: bytes, then: bytes | None) -> None:
        super().__init__(first)
        self._first, self._then, self.swapped = first, then, False

    def read(self, n: int | None = -1) -> bytes:
        data = super().read(n)
        if self._then is not None and not self.swapped and self.tell() >= len(self._first):
            here = self.tell()
            self.seek(0)
            self.write(self._then)
            self.seek(here)
            self.swapped = True
        return data


def _open(src: io.BytesIO) -> bytes:
    out = io.BytesIO()
    open_stream(src, out, key=ALICE, owner=OWNER.public_key(), capsule_id=CAPSULE, manifest_digest=MANIFEST)
    return out.getvalue()


def test_positive_control_the_forgery_is_well_formed_and_refused_when_served_alone() -> None:
    blob = _sealed()
    forged = _bobs_forgery(blob)
    assert len(forged) == len(blob) and forged != blob
    assert _open(_Swapping(blob, None)) == GENUINE
    with pytest.raises(EnvelopeTampered, match="signature does not verify"):
        _open(_Swapping(forged, None))


def test_chunks_swapped_after_the_signature_was_read_are_never_released() -> None:
    blob = _sealed()
    src = _Swapping(blob, _bobs_forgery(blob))
    got = _open(src)
    assert src.swapped, "the attack did not run: the source was never read to its end"
    assert got == GENUINE
    assert b"bobby" not in got


def test_a_bytearray_changed_after_the_call_cannot_reach_the_decryption() -> None:
    """open_bytes copies its input before it checks anything, so a caller-shared buffer cannot change
    between the check and the decryption either."""
    blob = bytearray(_sealed())
    opened = open_bytes(blob, key=ALICE, owner=OWNER.public_key(), capsule_id=CAPSULE, manifest_digest=MANIFEST)
    assert opened == GENUINE


@pytest.mark.parametrize("missing", ["owner", "capsule_id", "manifest_digest"])
def test_owner_and_capsule_binding_are_mandatory(missing: str) -> None:
    kw: dict[str, object] = {"owner": OWNER.public_key(), "capsule_id": CAPSULE, "manifest_digest": MANIFEST}
    kw[missing] = None
    with pytest.raises(EnvelopeError, match=f"{missing} must be given"):
        open_bytes(_sealed(), key=ALICE, **kw)  # type: ignore[arg-type]
