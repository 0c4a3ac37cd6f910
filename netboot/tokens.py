"""Follow the gateway's token file: the one-time enrolment token armed for the HPC's next boot.

The gateway (`trustcap.gateway`, `--token-file`) owns the tokens: it arms one when the HPC is meant to
boot (gateway start, a `reboot` wipe) and clears the file once that boot has enrolled. The boot services
may run as another process or in a container, so the file is the interface: one line holding the token,
or empty when no boot is armed. Written atomically (rename) by the gateway, mode 0600.

The agent pins its gateway's trust-root address, which DHCP hands it with the token (option 226). On a
Pi that address is the gateway's own (its Zymkey's), so a chart cannot know it: the gateway writes it at
start (`--address-file`) and the watch reads it with every token it hands on (`--gateway-address-file`).
A token without a readable address is not served: the agent would refuse the boot anyway, and an HPC
that netboots and then cannot enrol is harder to read than one DHCP does not answer.

    gateway BootArming --(write/rename)--> token file --(poll)--> TokenFileWatch --> NetbootServices.set_token
                                                                                     (dnsmasq restarted with
                                                                                      the token, or stopped)
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import Protocol

__all__ = ["TokenFileWatch", "read_gateway_address", "read_token"]

log = logging.getLogger("trustcap.netboot")
_TOKEN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")  # what dhcp.DhcpConfig accepts
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")


class _Services(Protocol):
    def set_token(self, mac: str, token: str | None, gateway_address: str | None = None) -> None: ...


def read_token(path: Path) -> str | None:
    """The armed token, or None when the file is missing, empty or not a token (logged: never served)."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    if not text:
        return None
    if not _TOKEN.match(text):
        log.error("token file %s does not hold a token (1-128 of [A-Za-z0-9._-]); not serving the HPC", path)
        return None
    return text


def read_gateway_address(path: Path) -> str | None:
    """The gateway's trust-root address (0x + 40 hex) from its address file, or None when the file is
    missing or holds something else (logged)."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        log.error("gateway address file %s is missing: is the gateway running with --address-file %s?", path, path)
        return None
    if not _ADDRESS.match(text):
        log.error("gateway address file %s does not hold a 0x address (0x + 40 hex); not serving the HPC", path)
        return None
    return text


class TokenFileWatch:
    """Poll `path` and hand every change of the armed token to `services` (first reading at once); with
    `address_path`, the gateway's address goes with each token, and a token without one is not served."""

    def __init__(self, path: Path, mac: str, services: _Services, *, address_path: Path | None = None,
                 poll_s: float = 0.5) -> None:
        self.path = path
        self.mac = mac
        self.services = services
        self.address_path = address_path
        self.poll_s = poll_s
        self.changes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.token, self.gateway_address = self._read()
        services.set_token(mac, self.token, self.gateway_address)

    def _read(self) -> tuple[str | None, str | None]:
        token = read_token(self.path)
        if token is None or self.address_path is None:
            return token, None
        address = read_gateway_address(self.address_path)
        return (token, address) if address is not None else (None, None)

    def start(self) -> TokenFileWatch:
        self._thread = threading.Thread(target=self._loop, name="trustcap-netboot-token", daemon=True)
        self._thread.start()
        return self

    def poll(self) -> bool:
        """Read the file once; True when the armed token changed (and was handed on)."""
        token, address = self._read()
        if (token, address) == (self.token, self.gateway_address):
            return False
        self.token, self.gateway_address = token, address
        self.changes += 1
        try:
            self.services.set_token(self.mac, token, address)
        except Exception:  # a failed dnsmasq restart is logged; the next change tries again
            log.exception("could not apply the new enrolment token")
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
