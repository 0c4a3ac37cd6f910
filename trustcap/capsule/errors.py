"""The errors of capsules: manifests and sealed envelopes.

    TrustcapError
    └── CapsuleError                 anything wrong with a capsule or its sealed data
        ├── ManifestError            the manifest is invalid; the message names the field(s)
        └── EnvelopeError            the envelope cannot be parsed: bad magic, version, length, header field
            ├── EnvelopeTruncated    the envelope ends early (or has bytes after its end)
            ├── EnvelopeTampered     a signature or authentication tag does not verify: bytes were changed
            ├── NotARecipient        the key given opens none of the envelope's recipient slots
            └── EnvelopeReplayed     the envelope is intact but bound to another capsule or manifest,
                                     or signed by someone other than the expected owner

One class per cause, so a caller (and a test) can tell a wrong key from a forgery from a replay.
"""

from __future__ import annotations

from trustcap.errors import TrustcapError

__all__ = [
    "CapsuleError",
    "EnvelopeError",
    "EnvelopeReplayed",
    "EnvelopeTampered",
    "EnvelopeTruncated",
    "ManifestError",
    "NotARecipient",
]


class CapsuleError(TrustcapError):
    """A capsule, its manifest or its sealed data was refused."""


class ManifestError(CapsuleError):
    """The manifest does not validate; the message names each bad field."""


class EnvelopeError(CapsuleError):
    """The envelope is malformed."""


class EnvelopeTruncated(EnvelopeError):
    """The envelope is shorter (or longer) than its header says."""


class EnvelopeTampered(EnvelopeError):
    """Authentication failed: the header, a chunk or the signature was altered."""


class NotARecipient(EnvelopeError):
    """The key is not one the envelope was sealed to."""


class EnvelopeReplayed(EnvelopeError):
    """The envelope is authentic but belongs to another capsule, manifest or owner."""
