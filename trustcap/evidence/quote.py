"""The attestation quote: what the HPC's agent claims, signed by the agent, countersigned by its gateway.

Each committee verifier sends its own nonce through its own gateway to the executor's gateway, which
relays it to the agent. The agent answers with a quote bound to that nonce and signs it with its
boot-enrolled key; the gateway countersigns it with its trust root, so a verifier knows both which
machine answered and that it answered through the Pi that owns it (the HPC's only network link).

    verifier V             V's gateway          executor's gateway (trust root)       agent (HPC)
       | nonce = nonces.issue()  |                        |                                |
       |--- nonce -------------->|--- nonce ------------->|--- nonce ---------------------->|
       |                         |                        |   quote{nonce, issued_at, node, boot digest,
       |                         |                        |         measurements, capsule state}
       |                         |                        |<-- quote, agent_sig ------------|
       |                         |                        | gateway_sig = sign(countersign digest)
       |<------------------------|<-- signed quote -------|                                |
       | appraise: signatures, nonce (once, in window), identity, age; then check_policy   |
       | -> Report naming every failed claim -> Verdict (EIP-712), signed by V             |

Digests (sha256 over RFC 8785 JSON, `trustcap.canonical`):
    quote_digest       = sha256(canonical(quote))            -> the Verdict's quoteDigest
    agent signs          sha256(canonical({domain: "trustcap/quote/agent/v1", quote: quote_digest}))
    gateway signs        sha256(canonical({domain: "trustcap/quote/gateway/v1", quote: quote_digest,
                                           agent_signature: agent_sig}))
The domains keep a quote signature from ever being valid as any other message the same key signs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from eth_utils.address import to_checksum_address
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from trustcap import canonical
from trustcap.evidence.errors import (
    EvidenceFormatError,
    ForgedSignature,
    IdentityMismatch,
    PolicyViolation,
    QuoteRejected,
    ReplayedNonce,
    SignatureError,
    StaleQuote,
    UnknownNonce,
)
from trustcap.evidence.failure import Report, Severity
from trustcap.evidence.freshness import NonceRegistry
from trustcap.evidence.signing import Signer, recover_address, recovers_key

__all__ = [
    "Quote",
    "SignedQuote",
    "appraise_quote",
    "decode_signed_quote",
    "encode_signed_quote",
    "new_quote",
    "quote_digest",
    "raise_for_report",
    "sign_quote",
    "verify_quote",
]

MAX_QUOTE_BYTES = 256 * 1024
_MAX_SAFE_INT = 2**53 - 1

Hex32 = Annotated[str, StringConstraints(pattern=r"^0x[0-9a-f]{64}$")]
Hex33 = Annotated[str, StringConstraints(pattern=r"^0x0[23][0-9a-f]{64}$")]
Hex65 = Annotated[str, StringConstraints(pattern=r"^0x[0-9a-f]{130}$")]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
NodeId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")]
SafeInt = Annotated[int, Field(ge=-_MAX_SAFE_INT, le=_MAX_SAFE_INT)]
Scalar = Annotated[str, StringConstraints(max_length=4096)] | SafeInt | bool | None


def _checksummed(value: str) -> str:
    if not re.fullmatch(r"0x[0-9a-fA-F]{40}", value) or to_checksum_address(value) != value:
        raise ValueError("must be an EIP-55 checksummed address")
    return value


Address = Annotated[str, AfterValidator(_checksummed)]


class Quote(BaseModel):
    """What the agent claims. One canonical form for every field (lowercase hex, EIP-55 address), so
    the digest a verifier computes is the digest the agent signed."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    version: Literal[1] = 1
    nonce: Hex32
    issued_at: Annotated[int, Field(ge=0, le=_MAX_SAFE_INT)]
    node_id: NodeId
    gateway: Address
    agent_key: Hex33
    boot_image_digest: Hex32
    measurements: Annotated[dict[Name, Annotated[str, StringConstraints(max_length=4096)]], Field(max_length=256)]
    capsule_state: Annotated[dict[Name, Scalar], Field(max_length=64)]


class SignedQuote(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    quote: Quote
    agent_signature: Hex65
    gateway_signature: Hex65


def quote_digest(quote: Quote) -> bytes:
    """sha256 of the canonical quote: the quote's identity, and the Verdict's quoteDigest."""
    return canonical.digest(quote.model_dump())


def _agent_digest(qd: bytes) -> bytes:
    return canonical.digest({"domain": "trustcap/quote/agent/v1", "quote": qd})


def _gateway_digest(qd: bytes, agent_signature: bytes) -> bytes:
    return canonical.digest({"domain": "trustcap/quote/gateway/v1", "quote": qd, "agent_signature": agent_signature})


def sign_quote(quote: Quote, agent: Signer, gateway: Signer) -> SignedQuote:
    """The agent signs, then the gateway countersigns both the quote and the agent's signature."""
    qd = quote_digest(quote)
    agent_sig = agent.sign_digest(_agent_digest(qd))
    gateway_sig = gateway.sign_digest(_gateway_digest(qd, agent_sig))
    return SignedQuote(quote=quote, agent_signature="0x" + agent_sig.hex(), gateway_signature="0x" + gateway_sig.hex())


def encode_signed_quote(signed: SignedQuote) -> bytes:
    return canonical.encode(signed.model_dump())


def decode_signed_quote(data: bytes) -> SignedQuote:
    """Parse a signed quote from its wire form; EvidenceFormatError names the first bad field."""
    if not isinstance(data, (bytes, bytearray)):
        raise EvidenceFormatError("a signed quote must be bytes")
    if len(data) > MAX_QUOTE_BYTES:
        raise EvidenceFormatError(f"a signed quote must be at most {MAX_QUOTE_BYTES} bytes")
    try:
        return SignedQuote.model_validate_json(bytes(data))
    except ValidationError as exc:
        raise EvidenceFormatError(f"not a signed quote: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "(document)"
    return f"{where}: {err.get('msg', 'invalid')}"


def appraise_quote(
    signed: SignedQuote,
    *,
    nonces: NonceRegistry,
    expected_nonce: bytes | None,
    node_id: str,
    agent_key: bytes,
    gateway_address: str,
    now: float,
    max_age_seconds: float,
    max_skew_seconds: float = 5.0,
) -> Report:
    """Check every claim that does not depend on policy, and collect every failure.

    The nonce is consumed only if both signatures hold: a forged quote must not burn the nonce that
    the genuine answer will carry.
    """
    report = Report()
    quote = signed.quote
    qd = quote_digest(quote)
    agent_sig = bytes.fromhex(signed.agent_signature[2:])
    gateway_sig = bytes.fromhex(signed.gateway_signature[2:])

    if quote.agent_key != "0x" + bytes(agent_key).hex():
        report.add("quote", "quote.identity.agent_key", Severity.CRITICAL,
                   "quote names another agent key than the enrolled one")
    if quote.node_id != node_id:
        report.add("quote", "quote.identity.node", Severity.CRITICAL, f"quote is about node {quote.node_id!r}",
                   expected=node_id, got=quote.node_id)
    if quote.gateway != gateway_address:
        report.add("quote", "quote.identity.gateway", Severity.CRITICAL, "quote names another gateway",
                   expected=gateway_address, got=quote.gateway)

    signatures_ok = True
    try:
        if not recovers_key(_agent_digest(qd), agent_sig, agent_key):  # a malformed enrolled key raises
            raise SignatureError("signer is not the enrolled agent key")
    except SignatureError as exc:
        signatures_ok = False
        report.add("quote", "quote.signature.agent", Severity.CRITICAL, f"agent signature is not valid: {exc}")
    try:
        if recover_address(_gateway_digest(qd, agent_sig), gateway_sig) != gateway_address:
            raise SignatureError("signer is not the node's gateway")
    except SignatureError as exc:
        signatures_ok = False
        report.add("quote", "quote.signature.gateway", Severity.CRITICAL,
                   f"gateway countersignature is not valid: {exc}")

    nonce = bytes.fromhex(quote.nonce[2:])
    if expected_nonce is not None and nonce != bytes(expected_nonce):
        report.add("nonce", "nonce.mismatch", Severity.CRITICAL, "quote answers another nonce than the one sent")
    failure = nonces.consume(nonce) if signatures_ok and not report.failures else nonces.check(nonce)
    if failure is not None:
        report.failures.append(failure)

    age = now - quote.issued_at
    if age > max_age_seconds:
        report.add("quote", "quote.expired", Severity.MEDIUM, f"quote is {age:.0f} s old (limit {max_age_seconds:g} s)")
    if -age > max_skew_seconds:
        report.add("quote", "quote.future", Severity.MEDIUM, f"quote is dated {-age:.0f} s in the future")
    return report


# Which exception a failed report raises: the first class whose failure ids appear, in order of gravity.
_PRECEDENCE: list[tuple[type[QuoteRejected], tuple[str, ...]]] = [
    (ForgedSignature, ("quote.signature.",)),
    (ReplayedNonce, ("nonce.replayed",)),
    (UnknownNonce, ("nonce.unknown", "nonce.mismatch")),
    (IdentityMismatch, ("quote.identity.",)),
    (StaleQuote, ("quote.expired", "quote.future", "nonce.expired")),
    (PolicyViolation, ("policy.",)),
]


def raise_for_report(report: Report) -> None:
    """Raise the QuoteRejected subclass of the gravest failure, with every failure in the message."""
    if report.ok:
        return
    ids = report.event_ids
    for cls, prefixes in _PRECEDENCE:
        if any(i.startswith(prefixes) for i in ids):
            raise cls(f"quote refused: {report.summary()}", report)
    raise QuoteRejected(f"quote refused: {report.summary()}", report)


def verify_quote(signed: SignedQuote, *, policy: Any = None, **kwargs: Any) -> Report:
    """appraise_quote, then check_policy when a policy is given; raise if any claim failed."""
    report = appraise_quote(signed, **kwargs)
    if policy is not None:
        from trustcap.evidence.policy import check_policy

        report.merge(check_policy(signed.quote, policy))
    raise_for_report(report)
    return report


def new_quote(
    *,
    nonce: bytes,
    issued_at: int,
    node_id: str,
    gateway: str,
    agent_key: bytes,
    boot_image_digest: bytes,
    measurements: Mapping[str, str],
    capsule_state: Mapping[str, Any],
) -> Quote:
    """Build a quote from native values (bytes become canonical lowercase hex)."""
    try:
        return Quote(
            nonce="0x" + bytes(nonce).hex(),
            issued_at=issued_at,
            node_id=node_id,
            gateway=gateway,
            agent_key="0x" + bytes(agent_key).hex(),
            boot_image_digest="0x" + bytes(boot_image_digest).hex(),
            measurements=dict(measurements),
            capsule_state=dict(capsule_state),
        )
    except ValidationError as exc:
        raise EvidenceFormatError(f"not a valid quote: {_first_error(exc)}") from None
