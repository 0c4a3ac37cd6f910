"""Attestation evidence: quotes, policies, verdicts and freshness (issue 3, item 5).

The public names are re-exported here one by one; the modules hold the why.
"""

from __future__ import annotations

from trustcap.evidence.challenge import (
    CHALLENGE_DOMAIN,
    Challenge,
    challenge_digest,
    sign_challenge,
    verify_challenge,
)
from trustcap.evidence.errors import (
    ChallengeFormatError,
    EvidenceError,
    EvidenceFormatError,
    ForgedSignature,
    IdentityMismatch,
    PolicyViolation,
    QuoteRejected,
    ReplayedNonce,
    SignatureError,
    StaleQuote,
    UnknownNonce,
    VerdictError,
)
from trustcap.evidence.failure import Failure, Report, Severity
from trustcap.evidence.freshness import NonceRegistry
from trustcap.evidence.policy import Policy, Rule, check_policy, load_policy, parse_policy, policy_digest
from trustcap.evidence.quote import (
    Quote,
    SignedQuote,
    agent_sign_quote,
    appraise_quote,
    countersign_quote,
    decode_signed_quote,
    encode_signed_quote,
    new_quote,
    quote_digest,
    raise_for_report,
    sign_quote,
    verify_quote,
)
from trustcap.evidence.signing import Signer, address_of, recover_address
from trustcap.evidence.verdict import (
    Domain,
    Phase,
    SignedVerdict,
    Verdict,
    decode_signed_verdict,
    encode_signed_verdict,
    sign_verdict,
    typed_data,
    verdict_digest,
    verdict_id,
    verify_verdict,
)
from trustcap.evidence.wipeproof import sign_wipe_proof, verify_wipe_proof, wipe_proof_digest

__all__ = [
    "CHALLENGE_DOMAIN",
    "Challenge",
    "ChallengeFormatError",
    "Domain",
    "EvidenceError",
    "EvidenceFormatError",
    "Failure",
    "ForgedSignature",
    "IdentityMismatch",
    "NonceRegistry",
    "Phase",
    "Policy",
    "PolicyViolation",
    "Quote",
    "QuoteRejected",
    "ReplayedNonce",
    "Report",
    "Rule",
    "Severity",
    "SignatureError",
    "SignedQuote",
    "SignedVerdict",
    "Signer",
    "StaleQuote",
    "UnknownNonce",
    "Verdict",
    "VerdictError",
    "address_of",
    "agent_sign_quote",
    "appraise_quote",
    "challenge_digest",
    "check_policy",
    "countersign_quote",
    "decode_signed_quote",
    "decode_signed_verdict",
    "encode_signed_quote",
    "encode_signed_verdict",
    "load_policy",
    "new_quote",
    "parse_policy",
    "policy_digest",
    "quote_digest",
    "raise_for_report",
    "recover_address",
    "sign_challenge",
    "sign_quote",
    "sign_verdict",
    "sign_wipe_proof",
    "typed_data",
    "verdict_digest",
    "verdict_id",
    "verify_challenge",
    "verify_quote",
    "verify_verdict",
    "verify_wipe_proof",
    "wipe_proof_digest",
]
