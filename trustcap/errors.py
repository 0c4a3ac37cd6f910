"""The errors of the core library.

    TrustcapError                 every error trustcap raises on purpose; `str()` is one clear line
    ├── ConfigError               a setting or file is missing or wrong; the message names it and the fix
    ├── StackError                the local stack (API server, Docker, chain) cannot start or answer
    ├── InvalidProof              a VRF proof (or a Merkle proof handed to us) does not verify, for any reason
    ├── InvalidKey                a key's bytes are not a valid key for the scheme (length, range, encoding)
    └── ...                       subsystems add their own subclasses here, one branch each

Upstream errors (docker, web3, tftpy, zymkey) are translated where they are met,
`raise OurError(msg) from exc`, so a caller only ever needs to catch `TrustcapError`.
"""

from __future__ import annotations


class TrustcapError(Exception):
    """Base of every error raised on purpose; the CLI prints its message as one line and exits 1."""


class ConfigError(TrustcapError):
    """A setting, file or argument is missing or malformed."""


class StackError(TrustcapError):
    """A part of the local stack failed to build, start or answer."""


class InvalidProof(TrustcapError):
    """A proof failed to verify. One class for every cause (length, encoding, range, wrong key or input),
    so callers cannot treat "malformed" more kindly than "forged"; the message says which cause."""


class InvalidKey(TrustcapError):
    """A key's bytes are not a valid key for its scheme: wrong length, out of range, or not on the curve."""
