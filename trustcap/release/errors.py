"""The errors of key release.

    TrustcapError
    └── ReleaseError              anything wrong with releasing an input's content key
        ├── ReleaseDenied         the broker's check refused a request; `field` names the request field
        ├── ReleaseRefused        (client side) the broker answered with an error, or not at all
        └── WrappedKeyError       a wrapped key does not open for this capsule, task, input and key
"""

from __future__ import annotations

from trustcap.errors import TrustcapError

__all__ = ["ReleaseDenied", "ReleaseError", "ReleaseRefused", "WrappedKeyError"]


class ReleaseError(TrustcapError):
    """A content key was not released, or does not open."""


class ReleaseDenied(ReleaseError):
    """The broker refuses: `field` is the request field at fault (dotted, with list indices)."""

    def __init__(self, field: str, message: str, *, status: int = 403) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message
        self.status = status


class ReleaseRefused(ReleaseError):
    """What the gateway sees: the broker's own message and field, or why it could not be reached."""

    def __init__(self, message: str, *, field: str = "", status: int = 0) -> None:
        super().__init__(message)
        self.field = field
        self.status = status


class WrappedKeyError(ReleaseError):
    """A wrapped key is malformed or was made for another capsule, task, input or executor key."""
