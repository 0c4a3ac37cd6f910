"""The errors of the gateway (attestation server, relay, egress guard, policy, channel).

    TrustcapError                      (trustcap.errors)
    └── GatewayError                   anything the gateway raises on purpose
        ├── EgressError                nftables/netns/veth setup or read-back failed (command named)
        ├── PolicyError                a policy file is malformed (file, rule and field named)
        ├── QuoteRejected              a quote failed a check (replayed nonce, bad signature, unenrolled key)
        ├── EnrolmentRefused           an enrolment token is unknown, used or expired
        └── ChannelError               the gateway<->agent channel failed (auth, decrypt, framing, rekey)
"""

from __future__ import annotations

from trustcap.channel import ChannelError as CoreChannelError
from trustcap.errors import TrustcapError

__all__ = ["ChannelError", "EgressError", "EnrolmentRefused", "GatewayError", "PolicyError", "QuoteRejected"]


class GatewayError(TrustcapError):
    """Base of every error the gateway raises on purpose."""


class EgressError(GatewayError):
    """The egress guard could not set up, read back or remove its rules or links."""


class PolicyError(GatewayError):
    """A policy document is malformed; the message names the rule and the field."""


class QuoteRejected(GatewayError):
    """A quote was refused: replayed or unknown nonce, bad signature, key not enrolled, wrong boot image."""


class EnrolmentRefused(GatewayError):
    """An enrolment request carried an unknown, reused or expired token, or a wrong boot-image digest."""


class ChannelError(GatewayError, CoreChannelError):
    """The channel to the agent failed: authentication, decryption, framing or key rotation.
    A subclass of the core's `trustcap.channel.ChannelError`, so one `except` catches every channel
    failure, whichever layer raised it."""
