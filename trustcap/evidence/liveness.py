"""What a gateway signs to show the operator it is up (`POST /v1/liveness`, decision 0114).

The relay (gateway/relay.py) signs it with the gateway's trust root; the operator (operator/gateway.py)
recovers the signer and writes `Gateway.status.lastSeen` only for that Gateway's own key. Both sides take
the digest from here, so they cannot drift apart. Its own domain keeps the signature from standing for a
challenge, quote, verdict or wipe proof; the operator's fresh nonce keeps an old answer from standing for
now.
"""

from __future__ import annotations

from typing import Final

from trustcap import canonical

__all__ = ["LIVENESS_DOMAIN", "liveness_digest"]

LIVENESS_DOMAIN: Final = "trustcap.gateway-liveness.v1"


def liveness_digest(nonce: bytes, gateway: str) -> bytes:
    """The 32 bytes the gateway `gateway` (its address) signs to answer the operator's `nonce`."""
    return canonical.digest({"domain": LIVENESS_DOMAIN, "nonce": "0x" + bytes(nonce).hex(), "gateway": gateway})
