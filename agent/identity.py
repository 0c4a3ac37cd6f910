"""The agent's boot key and boot configuration.

The key pair is made in RAM at every boot and never written anywhere: a rebooted (re-netbooted) HPC is
a new identity that must enrol again with a fresh one-time token, so nothing a previous run could have
tampered with carries over. The boot configuration comes from the kernel command line the gateway's
netboot served (`trustcap.gateway=HOST:PORT trustcap.token=TOKEN trustcap.bootdigest=sha256:HEX
trustcap.gatewayaddr=0xADDR trustcap.node=NAME`), or from flags.
"""

from __future__ import annotations

import re
import secrets
import shlex
from dataclasses import dataclass
from pathlib import Path

from eth_keys import keys  # type: ignore[attr-defined]
from eth_utils.address import to_checksum_address

from trustcap.agent.errors import EnrolmentError

__all__ = ["BootConfig", "BootKey", "parse_cmdline"]

_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


class BootKey:
    """A secp256k1 key made at boot (the shared Signer shape: address, public_key, sign_digest)."""

    def __init__(self, secret: bytes | None = None) -> None:
        while secret is None:
            cand = secrets.token_bytes(32)
            if 0 < int.from_bytes(cand, "big") < _N:
                secret = cand
        self._key = keys.PrivateKey(secret)

    @property
    def address(self) -> str:
        return str(to_checksum_address(self._key.public_key.to_canonical_address()))

    def public_key(self) -> bytes:
        return bytes(self._key.public_key.to_compressed_bytes())

    def sign_digest(self, digest32: bytes) -> bytes:
        if len(digest32) != 32:
            raise ValueError("digest must be 32 bytes")
        sig = self._key.sign_msg_hash(bytes(digest32))  # RFC 6979, low s
        return int(sig.r).to_bytes(32, "big") + int(sig.s).to_bytes(32, "big") + bytes([27 + int(sig.v)])


@dataclass(frozen=True)
class BootConfig:
    gateway_host: str
    gateway_port: int
    token: str
    boot_digest: str      # 0x + 64 hex (the quote's boot_image_digest form)
    gateway_address: str  # EIP-55: the gateway trust root the agent pins
    node_id: str


_KEYS = {"trustcap.gateway": "gateway", "trustcap.token": "token", "trustcap.bootdigest": "bootdigest",
         "trustcap.gatewayaddr": "gatewayaddr", "trustcap.node": "node"}


def parse_cmdline(text: str, overrides: dict[str, str] | None = None) -> BootConfig:
    """Read our keys from a kernel command line; flags in `overrides` win. Names the missing/bad key."""
    found: dict[str, str] = {}
    for word in shlex.split(text):
        k, sep, v = word.partition("=")
        if sep and k in _KEYS:
            found[_KEYS[k]] = v
    found.update({k: v for k, v in (overrides or {}).items() if v})
    for cmd_key, name in _KEYS.items():
        if not found.get(name):
            raise EnrolmentError(f"boot configuration: {cmd_key}= is missing from the kernel command line "
                                 f"(or give --{name})")
    host, _, port = found["gateway"].rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EnrolmentError(f"boot configuration: trustcap.gateway={found['gateway']!r} is not HOST:PORT")
    m = re.fullmatch(r"sha256:([0-9a-fA-F]{64})", found["bootdigest"])
    if not m:
        raise EnrolmentError(f"boot configuration: trustcap.bootdigest={found['bootdigest']!r} is not sha256:<64 hex>")
    addr = found["gatewayaddr"]
    if not re.fullmatch(r"0x[0-9a-fA-F]{40}", addr):
        raise EnrolmentError(f"boot configuration: trustcap.gatewayaddr={addr!r} is not a 0x address")
    if not re.fullmatch(r"[A-Za-z0-9_-]{8,128}", found["token"]):
        raise EnrolmentError("boot configuration: trustcap.token is malformed (8..128 of [A-Za-z0-9_-])")
    return BootConfig(host.strip("[]"), int(port), found["token"], "0x" + m.group(1).lower(),
                      str(to_checksum_address(addr)), found["node"])


def read_boot_config(overrides: dict[str, str] | None = None, path: Path = Path("/proc/cmdline")) -> BootConfig:
    return parse_cmdline(path.read_text() if path.exists() else "", overrides)
