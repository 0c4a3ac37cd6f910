"""The wire forms every component reads and writes, each parsed or formatted in one place.

    0x-hex bytes      "0x" + lowercase or uppercase hex, of a fixed length where the field has one
    RFC 3339 time     "2026-01-02T03:04:05Z": UTC, whole seconds (the CRDs' `date-time`)
    sha256 digest     "sha256:<64 hex>" in Kubernetes objects and OCI, "0x<64 hex>" in quotes and on chain
    a bad document    pydantic's first error as (where, what): the dotted field path and its message

A parser returns None for a malformed value rather than raising: each caller knows the field and the
error type its readers expect, and names both.
"""

from __future__ import annotations

import math
import os
import re
from datetime import UTC, datetime
from typing import Any, Final

from trustcap.errors import ConfigError

__all__ = ["field_error", "hex_bytes", "hex_digest", "parse_rfc3339", "positive_seconds", "rfc3339", "sha256_digest"]

_HEX_DIGEST: Final = re.compile(r"^(?:sha256:|0x)?([0-9a-fA-F]{64})$")


def hex_bytes(value: Any, n: int | None = None) -> bytes | None:
    """The bytes of a `0x`-hex string (exactly `n` of them when given), else None."""
    if not isinstance(value, str) or not value.startswith("0x"):
        return None
    if n is not None and len(value) != 2 + 2 * n:
        return None
    try:
        return bytes.fromhex(value[2:])
    except ValueError:
        return None


def rfc3339(ts: float) -> str:
    """A unix time as RFC 3339 in UTC, whole seconds: the form the CRDs' `date-time` fields carry."""
    return datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(value: Any) -> float | None:
    """The unix time of an RFC 3339 string (`Z` or an offset); None when it is not one, or names no zone."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.timestamp() if moment.tzinfo is not None else None


def hex_digest(value: Any) -> str | None:
    """A sha256 digest given as `sha256:HEX`, `0xHEX` or bare HEX, as the quotes' `0x<64 lowercase hex>`;
    None when it is not 32 bytes of hex."""
    m = _HEX_DIGEST.match(value) if isinstance(value, str) else None
    return "0x" + m.group(1).lower() if m else None


def sha256_digest(value: Any) -> str | None:
    """The same digest as the Kubernetes objects' `sha256:<64 lowercase hex>`; None when malformed."""
    h = hex_digest(value)
    return "sha256:" + h[2:] if h else None


def positive_seconds(name: str, default: float, *, hint: str = "") -> float:
    """The setting `name` from the environment: a positive, finite number of seconds, or `default` when
    unset. Anything else is a ConfigError naming the setting, the default and `hint` (how to choose)."""
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{name}={raw!r} is not a positive number of seconds; unset it for the default of "
                          f"{default:g}{f' ({hint})' if hint else ''}")
    return value



def field_error(exc: Any, root: str = "(document)") -> tuple[str, str]:
    """(where, what) of a pydantic ValidationError's first error: the dotted path of the field (`root` when
    it is the document itself) and pydantic's message, never the input (it may be a secret)."""
    err = exc.errors(include_url=False, include_input=False)[0]
    return ".".join(str(p) for p in err.get("loc", ())) or root, str(err.get("msg", "invalid"))
