"""Canonical encoding for everything trustcap hashes or signs: RFC 8785 JSON (JCS).

Two parties that hash "the same" manifest, quote or verdict must hash the same bytes, whatever their
JSON library's key order or float formatting. JCS fixes both. Bytes values are not JSON: callers encode
them first (hex with a `0x` prefix, as Ethereum tooling does), so the rule lives in one place: `encode`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import rfc8785

from trustcap.errors import TrustcapError

__all__ = ["CanonicalError", "digest", "encode"]


class CanonicalError(TrustcapError):
    """A value cannot be canonically encoded (NaN, an integer beyond I-JSON's range, a non-JSON type)."""


def _prepare(value: Any) -> Any:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, dict):
        return {str(k): _prepare(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_prepare(v) for v in value]
    return value


def encode(value: Any) -> bytes:
    """The RFC 8785 bytes of `value`; bytes become `0x`-prefixed lowercase hex strings."""
    try:
        return rfc8785.dumps(_prepare(value))
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise CanonicalError(f"cannot canonically encode value: {exc}") from exc


def digest(value: Any) -> bytes:
    """sha256 of the canonical encoding: the identity of a manifest, quote or policy."""
    return hashlib.sha256(encode(value)).digest()
