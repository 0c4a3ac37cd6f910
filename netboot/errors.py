"""The errors of the netboot subsystem.

    TrustcapError
    └── NetbootError              anything the Pi's boot services refuse or cannot do
        ├── PathRejected          a requested name is not a plain relative path inside the boot root
        ├── NotApproved           the name is not part of any approved boot image
        ├── DigestMismatch        the file's bytes no longer match its approved digest (tampered)
        ├── ApprovalUnavailable   the approval source (BootImage status, chain) cannot be read
        ├── ServiceError          dnsmasq, the TFTP or HTTP server cannot start or answer
        └── ImageBuildError       the HPC boot image recipe failed (missing .deb, extraction, packing)

tftpy's own exceptions never leave `trustcap.netboot.tftp`: its packet decoder is wrapped there
(`TftpException` and the `struct`/`Unicode` errors a malformed datagram raises become a dropped packet).
"""

from __future__ import annotations

from trustcap.errors import TrustcapError

__all__ = [
    "ApprovalUnavailable",
    "DigestMismatch",
    "ImageBuildError",
    "NetbootError",
    "NotApproved",
    "PathRejected",
    "ServiceError",
]


class NetbootError(TrustcapError):
    """Base of every netboot error."""


class PathRejected(NetbootError):
    """A requested name is absolute, climbs out of the root, or holds characters no boot file has."""


class NotApproved(NetbootError):
    """The file is not part of an approved boot image, so it is never served."""


class DigestMismatch(NetbootError):
    """The file's bytes differ from the approved digest: tampered or replaced; refused and reported."""


class ApprovalUnavailable(NetbootError):
    """The approval source cannot be read; nothing is served while it is unknown what is approved."""


class ServiceError(NetbootError):
    """A boot service (dnsmasq, TFTP, HTTP) could not start or stopped unexpectedly."""


class ImageBuildError(NetbootError):
    """The boot image could not be built from its Debian inputs."""
