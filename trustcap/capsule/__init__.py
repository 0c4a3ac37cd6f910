"""Digital capsules: the manifest (a Capsule spec and its digest), key files, and the sealed envelope
that carries an owner's data to the executor and a result to its recipients."""

from __future__ import annotations

from trustcap.capsule.envelope import (
    Header,
    open_bytes,
    open_stream,
    open_with_key,
    read_header,
    seal_bytes,
    seal_stream,
    unwrap_cek,
)
from trustcap.capsule.errors import (
    CapsuleError,
    EnvelopeError,
    EnvelopeReplayed,
    EnvelopeTampered,
    EnvelopeTruncated,
    ManifestError,
    NotARecipient,
)
from trustcap.capsule.keys import KeyPair, load_public_key, parse_public_key
from trustcap.capsule.manifest import Manifest, parse_manifest

__all__ = [
    "CapsuleError",
    "EnvelopeError",
    "EnvelopeReplayed",
    "EnvelopeTampered",
    "EnvelopeTruncated",
    "Header",
    "KeyPair",
    "Manifest",
    "ManifestError",
    "NotARecipient",
    "load_public_key",
    "open_bytes",
    "open_stream",
    "open_with_key",
    "parse_manifest",
    "parse_public_key",
    "read_header",
    "seal_bytes",
    "seal_stream",
    "unwrap_cek",
]
