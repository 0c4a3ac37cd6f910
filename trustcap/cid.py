"""Content IDs: CIDv1, raw codec (0x55), sha2-256 multihash, base32-lower multibase ("b...").

Why this exact form: a sealed input is referred to by its CID in the Capsule spec and may be stored in
IPFS (seed, Task 7), so our CID of a block must be the one IPFS computes for the same raw block, i.e.
what `ipfs add --raw-leaves --cid-version 1` prints for a file of one block (up to the chunk size,
256 KiB by default). For larger data this is still a sound content identity (the sha2-256 of all the
bytes), but it is not the CID of IPFS's chunked DAG for that file.

    "b" + base32lower( varint(1) || varint(0x55) || varint(0x12) || varint(32) || sha256(data) )

Parsing is strict: one canonical spelling per CID (lowercase, no padding, minimal varints, nothing
after the digest), so two different strings never name the same content.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from trustcap.errors import TrustcapError

__all__ = ["CID_VERSION", "RAW_CODEC", "SHA2_256", "CidError", "CidMismatch", "ContentId", "compute",
           "compute_file", "compute_stream", "parse", "verify"]

CID_VERSION = 1
RAW_CODEC = 0x55
SHA2_256 = 0x12
DIGEST_LEN = 32
_PREFIX = bytes([CID_VERSION, RAW_CODEC, SHA2_256, DIGEST_LEN])
_B32 = re.compile(r"[a-z2-7]+")
_MAX_LEN = 100  # far above the 59 characters of ours; bounds the work a hostile string can cause


class CidError(TrustcapError):
    """A string is not a CID we accept; the message says which part is wrong."""


class CidMismatch(CidError):
    """The data does not hash to the CID it was given under."""


@dataclass(frozen=True)
class ContentId:
    """A parsed CID: always v1, raw, sha2-256 (anything else is refused by `parse`)."""

    digest: bytes

    def __str__(self) -> str:
        return "b" + base64.b32encode(_PREFIX + self.digest).decode("ascii").lower().rstrip("=")


def compute(data: bytes) -> str:
    """The CID of a raw block."""
    return str(ContentId(hashlib.sha256(data).digest()))


def compute_stream(stream: BinaryIO, chunk: int = 1 << 20) -> str:
    """The CID of everything read from `stream`, without holding it all in memory."""
    h = hashlib.sha256()
    while block := stream.read(chunk):
        h.update(block)
    return str(ContentId(h.digest()))


def compute_file(path: Path) -> str:
    with path.open("rb") as fh:
        return compute_stream(fh)


def _varint(buf: bytes, pos: int, what: str) -> tuple[int, int]:
    """Unsigned LEB128 as multiformats uses it; minimal encoding only, at most 9 bytes."""
    value = shift = 0
    for i in range(pos, min(len(buf), pos + 9)):
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and i > pos:
                raise CidError(f"CID {what} is not minimally encoded")
            return value, i + 1
        shift += 7
    raise CidError(f"CID is truncated or malformed in its {what}")


def parse(text: str) -> ContentId:
    """Parse and validate a CID string; raises CidError naming what is wrong."""
    if not isinstance(text, str):
        raise CidError(f"CID must be a string, got {type(text).__name__}")
    if not text:
        raise CidError("CID is empty")
    if len(text) > _MAX_LEN:
        raise CidError(f"CID is {len(text)} characters long; at most {_MAX_LEN}")
    if text.startswith("Qm"):
        raise CidError("CIDv0 (Qm...) is not accepted; use CIDv1 raw (ipfs add --raw-leaves --cid-version 1)")
    if text[0] != "b":
        raise CidError(f"CID multibase prefix {text[0]!r} is not 'b' (base32 lower)")
    body = text[1:]
    if not _B32.fullmatch(body):
        raise CidError("CID has characters outside base32 lower (a-z, 2-7)")
    try:
        raw = base64.b32decode(body.upper() + "=" * (-len(body) % 8))
    except binascii.Error as exc:
        raise CidError(f"CID is not valid base32: {exc}") from exc
    version, pos = _varint(raw, 0, "version")
    if version != CID_VERSION:
        raise CidError(f"CID version is {version}; only 1 is accepted")
    codec, pos = _varint(raw, pos, "codec")
    if codec != RAW_CODEC:
        raise CidError(f"CID codec is 0x{codec:x}; only raw (0x55) is accepted")
    hash_code, pos = _varint(raw, pos, "multihash code")
    if hash_code != SHA2_256:
        raise CidError(f"CID hash is 0x{hash_code:x}; only sha2-256 (0x12) is accepted")
    length, pos = _varint(raw, pos, "digest length")
    if length != DIGEST_LEN:
        raise CidError(f"CID digest length is {length}; sha2-256 needs {DIGEST_LEN}")
    digest = raw[pos:]
    if len(digest) != DIGEST_LEN:
        raise CidError(f"CID digest has {len(digest)} bytes; expected {DIGEST_LEN}")
    cid = ContentId(digest)
    if str(cid) != text:
        raise CidError("CID is not in canonical form (trailing bits set in the last base32 character)")
    return cid


def verify(text: str, data: bytes) -> None:
    """Raise unless `data` is the block `text` names."""
    cid = parse(text)
    if not hmac.compare_digest(cid.digest, hashlib.sha256(data).digest()):
        raise CidMismatch(f"data does not match CID {text}")
