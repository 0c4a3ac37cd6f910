"""The Pi's boot services for one HPC link, started and stopped together.

`NetbootServices` wires one `ApprovedStore` (approval + digest gate) to the TFTP and HTTP servers and,
when a link interface is given, to dnsmasq for DHCP. With `stop_after_boot` (seed Task 3: "stop the
container after boot successfully completed") the services shut down once the HPC reports it booted
(`/trustcap/booted`): nothing listens on the link afterwards that could serve a second, different boot.
Running this in a container is the same process with host networking on the link interface.

Per-boot tokens (`set_token`, fed by `TokenFileWatch` from the gateway's token file): DHCP answers the
HPC only while its gateway has armed a one-time enrolment token for the next boot, and hands out that
token. dnsmasq cannot re-read a forced option (`dhcp-option-force`) on SIGHUP, so a new token means a
regenerated config and a restarted dnsmasq (same lease file); no token means no dnsmasq at all: the HPC
is served only while it is meant to boot (docs/decisions/0049-*, Tinkerbell #951).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trustcap.netboot.approval import ApprovalSource
from trustcap.netboot.dhcp import DhcpConfig, Dnsmasq
from trustcap.netboot.http import BootSignal, HttpServer
from trustcap.netboot.store import ApprovedStore, Refusal
from trustcap.netboot.tftp import TftpServer

__all__ = ["NetbootConfig", "NetbootServices"]

log = logging.getLogger("trustcap.netboot")


@dataclass(frozen=True)
class NetbootConfig:
    root: Path
    bind: str
    tftp_port: int = 69
    http_port: int = 8080
    dhcp: DhcpConfig | None = None
    state_dir: Path | None = None
    stop_after_boot: bool = False


class NetbootServices:
    def __init__(self, cfg: NetbootConfig, approval: ApprovalSource) -> None:
        self.cfg = cfg
        self.store = ApprovedStore(cfg.root, approval)
        self.refusals: list[Refusal] = []
        self.booted: list[BootSignal] = []
        self.stopped = threading.Event()
        self._booted_hooks: list[Callable[[BootSignal], None]] = []
        self.store.on_refused(self.refusals.append)
        self.tftp: TftpServer | None = None
        self.http: HttpServer | None = None
        self.dnsmasq: Dnsmasq | None = None
        self._dhcp_lock = threading.Lock()
        self._dhcp_off = False
        self._started = False

    def on_refused(self, hook: Callable[[Refusal], None]) -> None:
        self.store.on_refused(hook)

    def on_booted(self, hook: Callable[[BootSignal], None]) -> None:
        self._booted_hooks.append(hook)

    def start(self) -> NetbootServices:
        try:
            self.tftp = TftpServer(self.store, self.cfg.bind, self.cfg.tftp_port).start()
            self.http = HttpServer(self.store, self.cfg.bind, self.cfg.http_port)
            self.http.on_booted(self._booted)
            self.http.start()
            self._started = True
            if self.cfg.dhcp is not None and not self._dhcp_off:
                self.dnsmasq = Dnsmasq(self.cfg.dhcp, self._dhcp_state()).start()
        except Exception:
            self.stop()
            raise
        return self

    def _dhcp_state(self) -> Path:
        return self.cfg.state_dir or self.cfg.root.parent / "netboot-state"

    def set_token(self, mac: str, token: str | None, gateway_address: str | None = None) -> None:
        """Serve `mac` with this one-time token from now on (restarting dnsmasq), or, with None, stop
        answering DHCP at all; `gateway_address`, when given, is the trust root the agent is told to pin.
        Before `start()` this only sets what `start()` will serve."""
        with self._dhcp_lock:
            if self.cfg.dhcp is None or self.stopped.is_set():
                return
            if self.dnsmasq is not None:
                self.dnsmasq.stop()
                self.dnsmasq = None
            self._dhcp_off = token is None
            if token is None:
                log.info("no enrolment token armed: DHCP stopped, %s is not served", mac)
                return
            dhcp = dataclasses.replace(self.cfg.dhcp, macs={mac: token})
            if gateway_address is not None:
                dhcp = dataclasses.replace(dhcp, gateway_address=gateway_address)
            dhcp.validate()
            self.cfg = dataclasses.replace(self.cfg, dhcp=dhcp)
            if self._started:
                self.dnsmasq = Dnsmasq(dhcp, self._dhcp_state()).start()
            log.info("enrolment token armed: DHCP serves %s for its next boot", mac)

    def _booted(self, signal: BootSignal) -> None:
        self.booted.append(signal)
        for hook in self._booted_hooks:
            hook(signal)
        if self.cfg.stop_after_boot:
            log.info("boot completed by %s; stopping the boot services (stop_after_boot)", signal["client"])
            threading.Thread(target=self.stop, name="trustcap-netboot-stop", daemon=True).start()

    def stop(self) -> None:
        """Stop every service; one that fails to stop does not keep the others running."""
        with self._dhcp_lock:
            self.stopped.set()  # no set_token after this point restarts dnsmasq
        for name in ("dnsmasq", "http", "tftp"):
            svc = getattr(self, name)
            if svc is None:
                continue
            try:
                svc.stop()
            except Exception:
                log.exception("stopping %s failed", name)
            setattr(self, name, None)
        self.stopped.set()
