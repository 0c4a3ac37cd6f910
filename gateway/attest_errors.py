"""The errors of the gateway's outward attestation service (the committee relay and trust status).

    TrustcapError                      (trustcap.errors)
    └── GatewayError                   (trustcap.gateway.errors) anything the gateway raises on purpose
        ├── RelayError                 a relay request failed: unreachable gateway, refused request
        │   │                          (HTTP status and the gateway's one-line reason named), bad answer
        │   └── RelayBusy              the executor's gateway is at its bound of concurrent challenges
        └── DirectoryError             the verifier directory is misconfigured (bad address, no source,
                                       unreadable kubeconfig); a failed refresh is logged, not raised

The rest of the gateway's errors stay in `trustcap.gateway.errors`; this branch hangs under the same
`GatewayError`, so a caller catching that still catches these.
"""

from __future__ import annotations

from trustcap.gateway.errors import GatewayError

__all__ = ["DirectoryError", "RelayBusy", "RelayError"]


# mypy cannot follow `trustcap.gateway` to this folder (setuptools package-dir editable installs use an
# import hook mypy does not run), so it sees GatewayError as Any; the runtime class is the real one.
class RelayError(GatewayError):
    """A challenge through a gateway's relay failed; the message names the gateway and the cause."""


class RelayBusy(RelayError):
    """The gateway refused for load (HTTP 503 with Retry-After); retrying later can help."""


class DirectoryError(GatewayError):
    """The relay's verifier directory cannot be built; the message names the address or source."""
