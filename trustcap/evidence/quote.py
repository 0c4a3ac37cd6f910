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

import hmac
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from eth_utils.address import to_checksum_address
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from trustcap import canonical
from trustcap.evidence import failure as fid
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
from trustcap.evidence.signing import Signer, recovers_address, recovers_key
from trustcap.forms import field_error

__all__ = [
    "Quote",
    "SignedQuote",
    "agent_sign_quote",
    "appraise_quote",
    "countersign_quote",
    "decode_signed_quote",
    "decode_wire",
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


def agent_sign_quote(quote: Quote, agent: Signer) -> bytes:
    """Step one, on the HPC: the agent's boot key signs the quote (its key never leaves the agent)."""
    return agent.sign_digest(_agent_digest(quote_digest(quote)))


def countersign_quote(quote: Quote, agent_signature: bytes, gateway: Signer) -> SignedQuote:
    """Step two, on the Pi: the gateway countersigns the quote and the agent's signature, after checking
    that signature is the quote's own agent key's (`SignatureError` otherwise, malformed or another
    key's), so a gateway never vouches for a quote its agent did not sign."""
    qd = quote_digest(quote)
    try:
        ok = recovers_key(_agent_digest(qd), agent_signature, bytes.fromhex(quote.agent_key[2:]))
    except SignatureError as exc:
        raise SignatureError(f"the agent's quote signature is malformed: {exc}") from None
    if not ok:
        raise SignatureError("the agent's quote signature is not by the quote's agent key")
    return _countersigned(quote, qd, agent_signature, gateway)


def sign_quote(quote: Quote, agent: Signer, gateway: Signer) -> SignedQuote:
    """Both steps where both keys are at hand (tests and labs). It checks nothing, so a lab can also build
    the forgeries appraisal must refuse; the gateway's own path is `countersign_quote`."""
    qd = quote_digest(quote)
    return _countersigned(quote, qd, agent.sign_digest(_agent_digest(qd)), gateway)


def _countersigned(quote: Quote, qd: bytes, agent_signature: bytes, gateway: Signer) -> SignedQuote:
    gateway_sig = gateway.sign_digest(_gateway_digest(qd, agent_signature))
    return SignedQuote(quote=quote, agent_signature="0x" + agent_signature.hex(),
                       gateway_signature="0x" + gateway_sig.hex())


def encode_signed_quote(signed: SignedQuote) -> bytes:
    return canonical.encode(signed.model_dump())


M = TypeVar("M", bound=BaseModel)


def decode_wire(model: type[M], data: bytes, *, what: str, limit: int) -> M:
    """A signed document from its wire form (JSON bytes, at most `limit`); EvidenceFormatError names the
    first bad field. The quote's and the verdict's decoders both use it."""
    if not isinstance(data, (bytes, bytearray)):
        raise EvidenceFormatError(f"a {what} must be bytes")
    if len(data) > limit:
        raise EvidenceFormatError(f"a {what} must be at most {limit} bytes")
    try:
        return model.model_validate_json(bytes(data))
    except ValidationError as exc:
        raise EvidenceFormatError(f"not a {what}: {_first_error(exc)}") from None


def decode_signed_quote(data: bytes) -> SignedQuote:
    """Parse a signed quote from its wire form; EvidenceFormatError names the first bad field."""
    return decode_wire(SignedQuote, data, what="signed quote", limit=MAX_QUOTE_BYTES)


def _first_error(exc: ValidationError) -> str:
    return "{}: {}".format(*field_error(exc))


def appraise_quote(
    signed: SignedQuote,
    *,
    expected_nonce: bytes,
    node_id: str,
    agent_key: bytes,
    gateway_address: str,
    now: float,
    max_age_seconds: float | None,
    max_skew_seconds: float = 5.0,
    nonces: NonceRegistry | None = None,
    not_before: float | None = None,
) -> Report:
    """Check every claim that does not depend on policy, and collect every failure.

    `expected_nonce` is the nonce this verifier sent for this request, and there is no way to leave it
    out: a registry's issued-and-unused check alone accepts a quote that answers another of the same
    verifier's open requests (issue 12 item 15). With `nonces`, the nonce must also be one the registry
    issued and unused, and is consumed only if both signatures hold (a forged quote must not burn the
    nonce that the genuine answer will carry); a verifier that re-appraises stored evidence (the operator
    judging an enrolment on every pass) gives none. `not_before` is when the challenge was issued: a
    quote dated earlier (beyond the skew) answers nothing fresh. `max_age_seconds` None: the caller
    judges the evidence's age itself.
    """
    if not isinstance(expected_nonce, (bytes, bytearray)) or not expected_nonce:
        raise TypeError("appraise_quote: expected_nonce must be the nonce this verifier sent for this request "
                        f"(non-empty bytes), got {type(expected_nonce).__name__}")
    report = Report()
    quote = signed.quote
    qd = quote_digest(quote)
    agent_sig = bytes.fromhex(signed.agent_signature[2:])
    gateway_sig = bytes.fromhex(signed.gateway_signature[2:])

    if quote.agent_key != "0x" + bytes(agent_key).hex():
        report.add("quote", fid.QUOTE_IDENTITY_AGENT_KEY, Severity.CRITICAL,
                   "quote names another agent key than the enrolled one")
    if quote.node_id != node_id:
        report.add("quote", fid.QUOTE_IDENTITY_NODE, Severity.CRITICAL, f"quote is about node {quote.node_id!r}",
                   expected=node_id, got=quote.node_id)
    if quote.gateway != gateway_address:
        report.add("quote", fid.QUOTE_IDENTITY_GATEWAY, Severity.CRITICAL, "quote names another gateway",
                   expected=gateway_address, got=quote.gateway)

    signatures_ok = True
    try:
        if not recovers_key(_agent_digest(qd), agent_sig, agent_key):  # a malformed enrolled key raises
            raise SignatureError("signer is not the enrolled agent key")
    except SignatureError as exc:
        signatures_ok = False
        report.add("quote", fid.QUOTE_SIGNATURE_AGENT, Severity.CRITICAL, f"agent signature is not valid: {exc}")
    try:
        if not recovers_address(_gateway_digest(qd, agent_sig), gateway_sig, gateway_address):
            raise SignatureError("signer is not the node's gateway")
    except SignatureError as exc:
        signatures_ok = False
        report.add("quote", fid.QUOTE_SIGNATURE_GATEWAY, Severity.CRITICAL,
                   f"gateway countersignature is not valid: {exc}")

    nonce = bytes.fromhex(quote.nonce[2:])
    if not hmac.compare_digest(nonce, bytes(expected_nonce)):
        report.add("nonce", fid.NONCE_MISMATCH, Severity.CRITICAL, "quote answers another nonce than the one sent")
    if nonces is not None:
        failure = nonces.consume(nonce) if signatures_ok and not report.failures else nonces.check(nonce)
        if failure is not None:
            report.failures.append(failure)

    if not_before is not None and quote.issued_at < not_before - max_skew_seconds:
        report.add("quote", fid.QUOTE_PREDATES_CHALLENGE, Severity.CRITICAL,
                   f"the quote is dated {not_before - quote.issued_at:.0f} s before its challenge was issued "
                   "(it answers nothing fresh)")
    age = now - quote.issued_at
    if max_age_seconds is not None and age > max_age_seconds:
        report.add("quote", fid.QUOTE_EXPIRED, Severity.MEDIUM,
                   f"quote is {age:.0f} s old (limit {max_age_seconds:g} s)")
    if -age > max_skew_seconds:
        report.add("quote", fid.QUOTE_FUTURE, Severity.MEDIUM, f"quote is dated {-age:.0f} s in the future")
    return report


# Which exception a failed report raises: the first class whose failure ids appear, in order of gravity.
_PRECEDENCE: list[tuple[type[QuoteRejected], tuple[str, ...]]] = [
    (ForgedSignature, ("quote.signature.",)),
    (ReplayedNonce, (fid.NONCE_REPLAYED,)),
    (UnknownNonce, (fid.NONCE_UNKNOWN, fid.NONCE_MISMATCH)),
    (IdentityMismatch, ("quote.identity.",)),
    (StaleQuote, (fid.QUOTE_EXPIRED, fid.QUOTE_FUTURE, fid.NONCE_EXPIRED)),
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
