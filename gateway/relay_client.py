"""The verifier's side of the relay (gateway/relay.py): send a signed challenge to an executor's gateway
and read the countersigned quote; or read the node's advisory trust status from the gateway's metrics
listener.

Only http(s) URLs are opened, answers are read up to a bound, and every failure is a RelayError naming
the gateway (RelayBusy when it asked to be retried), so a committee member can tell a busy executor from
a refusing one.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from trustcap.evidence import SignedQuote, Signer, decode_signed_quote, sign_challenge
from trustcap.evidence.errors import EvidenceFormatError
from trustcap.gateway.attest_errors import RelayBusy, RelayError

__all__ = ["MAX_RESPONSE", "request_quote", "request_status"]

MAX_RESPONSE = 256 * 1024  # trustcap.evidence's own limit on a signed quote


def _endpoint(url: str, path: str) -> str:
    """Only http(s) URLs: a `file:` or custom scheme must never be opened on a gateway's behalf."""
    if not re.match(r"^https?://[^/\s]+", url):
        raise RelayError(f"gateway URL {url!r} must be http:// or https:// with a host")
    return url.rstrip("/") + path


def _call(req: urllib.request.Request, url: str, timeout: float, limit: int) -> bytes:
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - http(s) URL of a gateway
            data: bytes = resp.read(limit + 1)
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read(4096)).get("error", "")
        except (ValueError, AttributeError):
            reason = ""
        cls = RelayBusy if exc.code == HTTPStatus.SERVICE_UNAVAILABLE and "busy" in reason else RelayError
        raise cls(f"gateway {url} refused: HTTP {exc.code} {reason}".rstrip()) from None
    except (urllib.error.URLError, OSError) as exc:
        raise RelayError(f"gateway {url} unreachable: {getattr(exc, 'reason', exc)}") from None
    if len(data) > limit:
        raise RelayError(f"gateway {url} answered more than {limit} bytes")
    return data


def request_quote(url: str, nonce: bytes, *, signer: Signer, node: str, timeout: float = 30.0,
                  capsule: Mapping[str, str] | None = None) -> SignedQuote:
    """Send `nonce` through the gateway of executor `node` at `url`, signed by the verifier's trust root
    `signer` (with `capsule` {taskId, round, phase}: a capsule round's challenge); the signed quote it
    returns, parsed (not appraised: appraise it with your own nonce registry)."""
    if len(nonce) != 32:
        raise ValueError("a challenge nonce is 32 bytes")
    endpoint = _endpoint(url, "/v1/challenge")
    body = json.dumps(sign_challenge(nonce, node, signer, issued_at=int(time.time()), capsule=capsule)).encode()
    req = urllib.request.Request(endpoint, data=body, method="POST",  # noqa: S310
                                 headers={"Content-Type": "application/json"})
    data = _call(req, url, timeout, MAX_RESPONSE)
    try:
        return decode_signed_quote(data)
    except EvidenceFormatError as exc:
        raise RelayError(f"gateway {url} answered something that is not a signed quote: {exc}") from None


def request_status(url: str, *, timeout: float = 10.0) -> dict[str, Any]:
    """The gateway's view of its node's trust (advisory: a verifier trusts its own appraisal). `url` is the
    gateway's metrics listener (`--metrics-address`, the Pi operator's), not its relay: the relay does not
    say whether its node is attested (decision 0114)."""
    req = urllib.request.Request(_endpoint(url, "/v1/status"))  # noqa: S310 - scheme checked
    data = _call(req, url, timeout, 64 * 1024)
    try:
        doc = json.loads(data)
    except ValueError:
        raise RelayError(f"gateway {url} status is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("trusted"), bool):
        raise RelayError(f"gateway {url} status lacks a boolean 'trusted'")
    return doc
