"""The errors of attestation evidence.

    TrustcapError
    └── EvidenceError                 anything wrong with a quote, policy or verdict
        ├── EvidenceFormatError       bytes that do not parse as a quote, policy or verdict (names the field)
        │   └── ChallengeFormatError  a relay challenge request is malformed; `.field` names the field
        ├── SignatureError            a signature is malformed or its signer cannot be recovered
        ├── QuoteRejected             appraisal failed; `.report` names every failed claim
        │   ├── ForgedSignature       the agent's signature or the gateway's countersignature is not theirs
        │   ├── UnknownNonce          the quote answers a nonce this verifier did not send (or no longer holds)
        │   ├── ReplayedNonce         the nonce was already answered once
        │   ├── StaleQuote            the quote or its nonce is older than the window, or dated in the future
        │   ├── IdentityMismatch      the quote is about another node, agent key or gateway
        │   └── PolicyViolation       a measurement, boot image or capsule state breaks the policy
        └── VerdictError              a verdict's signature does not recover to the expected verifier

`QuoteRejected` carries the whole report: the class says what failed first in order of gravity, the
message lists every failed claim (Keylime failure.py: never stop at the first).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trustcap.errors import TrustcapError

if TYPE_CHECKING:
    from trustcap.evidence.failure import Report


class EvidenceError(TrustcapError):
    """Base of every attestation evidence error."""


class EvidenceFormatError(EvidenceError):
    """Input does not parse as the structure it claims to be; the message names the field."""


class ChallengeFormatError(EvidenceFormatError):
    """A signed relay challenge is malformed; `field` and `cause` name what, for a JSON error body."""

    def __init__(self, field: str, cause: str) -> None:
        super().__init__(f"field {field!r}: {cause}")
        self.field = field
        self.cause = cause


class SignatureError(EvidenceError):
    """A signature is malformed (length, v, r/s range, high s) or no key can be recovered from it."""


class QuoteRejected(EvidenceError):
    """An appraisal failed. `report` holds every failed claim, not only the first."""

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(message)
        self.report = report


class ForgedSignature(QuoteRejected):
    """A signature on the quote does not come from the key it must come from."""


class UnknownNonce(QuoteRejected):
    """The quote is bound to a nonce this verifier never sent, or one it sent for another request."""


class ReplayedNonce(QuoteRejected):
    """The nonce has been answered before: a replayed quote."""


class StaleQuote(QuoteRejected):
    """The quote or its nonce is outside the freshness window."""


class IdentityMismatch(QuoteRejected):
    """The quote is about a different node, gateway or agent key than the one asked."""


class PolicyViolation(QuoteRejected):
    """The quote's claims do not satisfy the policy."""


class VerdictError(EvidenceError):
    """A verdict is malformed or its signature does not recover to the expected verifier."""
