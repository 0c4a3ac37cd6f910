"""Signed wipe proofs: what a gateway did to clean its HPC, in a form anyone can check.

The `reboot` wipe level (docs/design.md, verified wipe) is done by the gateway, not by the agent: the agent of
the dirty boot is the very thing being thrown away, so it cannot vouch for it. The gateway revokes that
boot's key, arms a fresh one-time token, power-cycles the HPC, and waits for a new boot key to enrol from
an approved image. Its proof says what it saw, and its trust root signs it:

    {"version": 1, "level": "reboot", "node", "gateway", "request", "reason",
     "requestedAt", "enrolledAt", "seconds",
     "before":   {"agentKey", "bootImageDigest"} | null      the boot that was thrown away
     "after":    {"agentKey", "bootImageDigest", "quoteDigest", "nonce"} | null   the fresh boot's first quote
     "baseline": {"agentKey", "quoteDigest"} | null          the thrown-away boot's own first quote
     "measurements": {"same": [...], "differ": [...]}        after vs baseline, by name
     "checks": {name: true | false | null}, "clean": bool, "error": str}

`clean` is true only when every check that could be made passed and none failed. The signature is over
the canonical digest of {"domain": DOMAIN, "proof": proof}: a proof cannot be replayed as another kind
of signed statement. Verification needs only the gateway's address (Gateway.spec.address, on chain).
"""

from __future__ import annotations

from typing import Any, Final

from trustcap import canonical
from trustcap.evidence.errors import EvidenceFormatError, SignatureError
from trustcap.evidence.signing import Signer, recover_address

__all__ = ["DOMAIN", "sign_wipe_proof", "verify_wipe_proof", "wipe_proof_digest"]

DOMAIN: Final = "trustcap.wipe-proof.v1"
_REQUIRED: Final = ("version", "level", "node", "gateway", "checks", "clean")


def wipe_proof_digest(proof: dict[str, Any]) -> bytes:
    return canonical.digest({"domain": DOMAIN, "proof": proof})


def sign_wipe_proof(proof: dict[str, Any], signer: Signer) -> dict[str, Any]:
    """`{"proof": proof, "signature": "0x..."}`, signed by the gateway's trust root."""
    if proof.get("gateway") != signer.address:
        raise EvidenceFormatError("a wipe proof names its signer as gateway")
    return {"proof": proof, "signature": "0x" + signer.sign_digest(wipe_proof_digest(proof)).hex()}


def verify_wipe_proof(signed: dict[str, Any], gateway_address: str) -> dict[str, Any]:
    """The proof if `gateway_address` signed it; SignatureError / EvidenceFormatError name what is wrong."""
    proof, sig = signed.get("proof"), signed.get("signature")
    if not isinstance(proof, dict) or any(k not in proof for k in _REQUIRED):
        raise EvidenceFormatError(f"a wipe proof needs the fields {', '.join(_REQUIRED)}")
    if not isinstance(sig, str) or not sig.startswith("0x") or len(sig) != 132:
        raise EvidenceFormatError("wipe proof signature must be 0x + 65 bytes hex")
    try:
        raw = bytes.fromhex(sig[2:])
    except ValueError as exc:
        raise EvidenceFormatError("wipe proof signature is not hex") from exc
    signer = recover_address(wipe_proof_digest(proof), raw)
    if signer != gateway_address or proof["gateway"] != gateway_address:
        raise SignatureError(f"wipe proof is signed by {signer}, not by gateway {gateway_address}")
    return proof
