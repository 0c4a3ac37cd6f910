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
     "link": {"iface", "carrierChangesBefore", "carrierChangesAtEnrolment"}   the Pi's own count, if watched
     "checks": {name: true | false | null}, "clean": bool, "error": str,
     "notCovered": [str, ...]}                               what this wipe does not clean, stated

`clean` is true only when every check that could be made passed and none failed, and a reboot's clean also
needs `checks.linkCycled` true: a null there (no carrier watched) is not a pass, because a new key from an
approved image alone is what HPC software that never rebooted can produce (decision 0119). A proof whose
`clean` claims more than its checks show is refused by the signer and by the verifier. `clean` is about what
the wipe does, and `notCovered` says what it does not (issue 12 item 19): a recipient must not read a clean
reboot as "nothing of the run is left anywhere". The signer adds the level's standing gaps
(`NOT_COVERED`) to whatever the caller lists, so no proof of a known level leaves them out, and a proof of
another level must list its own. The signature is over the canonical digest of {"domain": DOMAIN,
"proof": proof}, `notCovered` included: a proof cannot be replayed as another kind of signed statement,
nor shorn of what it does not cover. Verification needs only the gateway's address (Gateway.spec.address,
on chain), and refuses a proof that states nothing it does not cover.
"""

from __future__ import annotations

from typing import Any, Final

from trustcap import canonical
from trustcap.evidence.errors import EvidenceFormatError, SignatureError
from trustcap.evidence.signing import Signer, recover_address

__all__ = ["DOMAIN", "NOT_COVERED", "REQUIRED_FOR_CLEAN", "sign_wipe_proof", "verify_wipe_proof", "wipe_proof_digest"]

DOMAIN: Final = "trustcap.wipe-proof.v1"
_REQUIRED: Final = ("version", "level", "node", "gateway", "checks", "clean", "notCovered")

#: What a wipe of each level never cleans, whatever its checks say (docs/threat-model.md, leftover data).
NOT_COVERED: Final[dict[str, tuple[str, ...]]] = {
    "reboot": (
        "the HPC's RAM: a power cycle is not an overwrite, memory can keep its contents for a while after "
        "power is cut, and the fresh boot is not asked to clear it",
        "the HPC's local disks: the fresh image boots from the network and neither wipes nor reads them",
        "that the HPC really lost power: the gateway sees its link's carrier drop and return after the power "
        "command (checks.linkCycled) and a new boot key enrol from an approved image, which HPC software that "
        "never rebooted can also produce by taking its own link down and up and asking DHCP for the token",
    ),
}


def wipe_proof_digest(proof: dict[str, Any]) -> bytes:
    return canonical.digest({"domain": DOMAIN, "proof": proof})


def _not_covered(proof: dict[str, Any]) -> list[str]:
    """The caller's `notCovered` with the level's standing gaps added (first, in their order)."""
    given = proof.get("notCovered", [])
    if not isinstance(given, list) or not all(isinstance(g, str) and g for g in given):
        raise EvidenceFormatError("a wipe proof's notCovered is a list of non-empty strings")
    out = list(NOT_COVERED.get(str(proof.get("level")), ()))
    out += [g for g in given if g not in out]
    if not out:
        raise EvidenceFormatError(f"a wipe proof of level {proof.get('level')!r} must state what it does not cover "
                                  "(notCovered): no wipe cleans everything")
    return out


#: Per level, the checks a clean proof must show true (null is not enough).
REQUIRED_FOR_CLEAN: Final[dict[str, tuple[str, ...]]] = {
    "reboot": ("powerCycled", "newBootKey", "approvedImage", "linkCycled")}


def _check_clean_claim(proof: dict[str, Any]) -> None:
    """EvidenceFormatError when `clean` is true but a check failed or a required one is not true; also
    for the shapes that would slip past that: a `clean` or a check that is not a JSON boolean or null
    (1, 0, "true"), and a known level spelled another way ("Reboot" escaping the reboot's rules)."""
    checks, level, clean = proof.get("checks"), str(proof.get("level")), proof.get("clean")
    if not isinstance(checks, dict) or not all(v is None or isinstance(v, bool) for v in checks.values()):
        raise EvidenceFormatError("a wipe proof's checks is an object of name -> true | false | null")
    if not isinstance(clean, bool):
        raise EvidenceFormatError(f"a wipe proof's clean is true or false, not {clean!r}")
    if level not in NOT_COVERED and level.lower() in NOT_COVERED:
        raise EvidenceFormatError(f"a wipe proof's level is {level.lower()!r}, not {level!r}")
    if not clean:
        return
    failed = sorted(k for k, v in checks.items() if v is False)
    missing = [k for k in REQUIRED_FOR_CLEAN.get(str(proof.get("level")), ()) if checks.get(k) is not True]
    if failed or missing:
        raise EvidenceFormatError(f"a {proof.get('level')} wipe proof claims clean, but its checks show "
                                  f"{', '.join(f'{k} false' for k in failed) or ''}"
                                  f"{'; ' if failed and missing else ''}"
                                  f"{', '.join(f'{k} not true' for k in missing)}: its clean claims more than "
                                  "it saw")


def sign_wipe_proof(proof: dict[str, Any], signer: Signer) -> dict[str, Any]:
    """`{"proof": proof, "signature": "0x..."}`, signed by the gateway's trust root; the signed proof is a
    copy of `proof` whose `notCovered` includes the level's standing gaps."""
    if proof.get("gateway") != signer.address:
        raise EvidenceFormatError("a wipe proof names its signer as gateway")
    _check_clean_claim(proof)
    proof = {**proof, "notCovered": _not_covered(proof)}
    return {"proof": proof, "signature": "0x" + signer.sign_digest(wipe_proof_digest(proof)).hex()}


def verify_wipe_proof(signed: dict[str, Any], gateway_address: str) -> dict[str, Any]:
    """The proof if `gateway_address` signed it; SignatureError / EvidenceFormatError name what is wrong."""
    proof, sig = signed.get("proof"), signed.get("signature")
    if not isinstance(proof, dict) or any(k not in proof for k in _REQUIRED):
        raise EvidenceFormatError(f"a wipe proof needs the fields {', '.join(_REQUIRED)}")
    gaps = proof["notCovered"]
    if not isinstance(gaps, list) or not gaps or not all(isinstance(g, str) and g for g in gaps):
        raise EvidenceFormatError("a wipe proof's notCovered must list, as non-empty strings, what the wipe does "
                                  "not cover: a proof that states no limit claims more than any wipe does")
    if not isinstance(sig, str) or not sig.startswith("0x") or len(sig) != 132:
        raise EvidenceFormatError("wipe proof signature must be 0x + 65 bytes hex")
    try:
        raw = bytes.fromhex(sig[2:])
    except ValueError as exc:
        raise EvidenceFormatError("wipe proof signature is not hex") from exc
    signer = recover_address(wipe_proof_digest(proof), raw)
    if signer != gateway_address or proof["gateway"] != gateway_address:
        raise SignatureError(f"wipe proof is signed by {signer}, not by gateway {gateway_address}")
    _check_clean_claim(proof)
    return proof
