r"""Canonical encoding for everything trustcap hashes or signs: RFC 8785 JSON (JCS).

Two parties that hash "the same" manifest, quote or verdict must hash the same bytes, whatever their
JSON library's key order or float formatting. JCS fixes both. Bytes values are not JSON: callers encode
them first (hex with a `0x` prefix, as Ethereum tooling does), so the rule lives in one place: `encode`.

Two encoders, one output (decision 0120). `rfc8785` (pure Python) is the reference and encodes
anything. The standard library's C JSON encoder writes the same bytes for "plain" values: strings,
booleans, null, integers inside I-JSON's range, lists, and objects whose keys are ASCII. For those JCS
and `json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)` agree: both escape exactly
`"`, `\`, and U+0000-U+001F (the five short forms, the rest as lowercase `\u00xx`), and for ASCII keys
UTF-16 order is code-point order. Anything else (a float, a big integer, a non-ASCII key, a string that
is not valid UTF-8) goes to `rfc8785`, which encodes or refuses it. The quote appraisal spent 40% of its
time in the pure-Python encoder; tests/core/test_canonical_fast.py checks the two agree on random values.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import rfc8785

from trustcap.errors import TrustcapError

__all__ = ["CanonicalError", "digest", "encode"]


class CanonicalError(TrustcapError):
    """A value cannot be canonically encoded (NaN, an integer beyond I-JSON's range, a non-JSON type)."""


_INT_MAX = 2**53 - 1  # I-JSON: integers a double holds exactly (rfc8785 refuses the rest)
# Nesting deeper than this is refused on both paths, the same way whatever the caller's stack: no
# document trustcap signs comes near it, and without a bound the refusal depended on which path ran and
# how deep the caller's stack already was (a RecursionError at a depth that varied).
MAX_DEPTH = 64


class _NotPlain(Exception):
    """The value needs the reference encoder (or its refusal)."""


def _too_deep() -> CanonicalError:
    return CanonicalError(f"cannot canonically encode value: nested deeper than {MAX_DEPTH} levels")


def _prepare(value: Any, depth: int = 0) -> Any:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, (dict, list, tuple)) and depth >= MAX_DEPTH:
        raise _too_deep()
    if isinstance(value, dict):
        return {str(k): _prepare(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_prepare(v, depth + 1) for v in value]
    return value


def _plain(value: Any, depth: int = 0) -> Any:
    """`_prepare`, for values the C encoder writes as JCS does; _NotPlain for anything else."""
    t = type(value)
    if t is str or value is None or t is bool:
        return value
    if t is dict:
        if depth >= MAX_DEPTH:
            raise _too_deep()
        out = {}
        for k, v in value.items():
            key = str(k)
            if type(key) is not str or not key.isascii():  # a str subclass may sort its own way
                raise _NotPlain
            out[key] = _plain(v, depth + 1)
        return out
    if t is int:
        if -_INT_MAX <= value <= _INT_MAX:
            return value
        raise _NotPlain
    if t is bytes:
        return "0x" + value.hex()
    if t is list or t is tuple:
        if depth >= MAX_DEPTH:
            raise _too_deep()
        return [_plain(v, depth + 1) for v in value]
    raise _NotPlain  # floats, subclasses (enums), other types: the reference decides


def encode(value: Any) -> bytes:
    """The RFC 8785 bytes of `value`; bytes become `0x`-prefixed lowercase hex strings."""
    try:
        text = json.dumps(_plain(value), ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return text.encode("utf-8")
    except (_NotPlain, UnicodeEncodeError, RecursionError):
        pass
    try:
        return rfc8785.dumps(_prepare(value))
    except (rfc8785.CanonicalizationError, TypeError, ValueError, RecursionError) as exc:
        raise CanonicalError(f"cannot canonically encode value: {exc}") from exc


def digest(value: Any) -> bytes:
    """sha256 of the canonical encoding: the identity of a manifest, quote or policy."""
    return hashlib.sha256(encode(value)).digest()
