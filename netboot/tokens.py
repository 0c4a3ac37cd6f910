"""Follow the gateway's token file: the one-time enrolment token armed for the HPC's next boot.

The gateway (`trustcap.gateway`, `--token-file`) owns the tokens: it arms one when the HPC is meant to
boot (gateway start, a `reboot` wipe) and clears the file once that boot has enrolled. The boot services
may run as another process or in a container, so the file is the interface: one line holding the token,
or empty when no boot is armed. Written atomically (rename) by the gateway, mode 0600.

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

__all__ = ["TokenFileWatch", "read_token"]

log = logging.getLogger("trustcap.netboot")
_TOKEN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")  # what dhcp.DhcpConfig accepts


class _Services(Protocol):
    def set_token(self, mac: str, token: str | None) -> None: ...


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


class TokenFileWatch:
    """Poll `path` and hand every change of the armed token to `services` (first reading at once)."""

    def __init__(self, path: Path, mac: str, services: _Services, *, poll_s: float = 0.5) -> None:
        self.path = path
        self.mac = mac
        self.services = services
        self.poll_s = poll_s
        self.token: str | None = read_token(path)
        self.changes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        services.set_token(mac, self.token)

    def start(self) -> TokenFileWatch:
        self._thread = threading.Thread(target=self._loop, name="trustcap-netboot-token", daemon=True)
        self._thread.start()
        return self

    def poll(self) -> bool:
        """Read the file once; True when the armed token changed (and was handed on)."""
        token = read_token(self.path)
        if token == self.token:
            return False
        self.token = token
        self.changes += 1
        try:
            self.services.set_token(self.mac, token)
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
