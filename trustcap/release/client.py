"""The executor gateway's side of key release: one POST to an owner's broker."""

from __future__ import annotations

import base64
import binascii
import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from trustcap.release.errors import ReleaseRefused

__all__ = ["MAX_ANSWER", "request_release"]

MAX_ANSWER = 64 * 1024


def request_release(url: str, body: Mapping[str, Any], timeout: float = 30.0) -> tuple[bytes, bytes]:
    """POST `body` to `<url>/v1/release`; returns (wrapped key, executor key). ReleaseRefused carries the
    broker's message and field, or says why the broker could not be asked."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ReleaseRefused(f"broker URL {url!r} is not http(s)")
    data = json.dumps(body, separators=(",", ":")).encode()
    req = urllib.request.Request(url.rstrip("/") + "/v1/release", data=data, method="POST",  # noqa: S310 - http(s)
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the URL is the manifest's
            raw = resp.read(MAX_ANSWER + 1)
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(MAX_ANSWER + 1), exc.code
        doc = _json(raw)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            raise ReleaseRefused(f"broker {url} refused: {doc['error']}", field=str(doc.get("field", "")),
                                 status=status) from None
        raise ReleaseRefused(f"broker {url} answered HTTP {status}", status=status) from None
    except (urllib.error.URLError, OSError) as exc:
        raise ReleaseRefused(f"cannot reach broker {url}: {getattr(exc, 'reason', exc)}") from None
    if len(raw) > MAX_ANSWER:
        raise ReleaseRefused(f"broker {url} answered more than {MAX_ANSWER} bytes", status=status)
    doc = _json(raw)
    try:
        wrapped = base64.b64decode(doc["wrappedKey"], validate=True)
        key_hex = doc["executorKey"]
        if not isinstance(key_hex, str) or not key_hex.startswith("0x"):
            raise ValueError("executorKey is not 0x-hex")
        executor_key = bytes.fromhex(key_hex[2:])
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise ReleaseRefused(f"broker {url} answered without a valid wrappedKey and executorKey: {exc}",
                             status=status) from None
    return wrapped, executor_key


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None
