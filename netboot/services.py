"""The Pi's boot services for one HPC link, started and stopped together.

`NetbootServices` wires one `ApprovedStore` (approval + digest gate) to the TFTP and HTTP servers and,
when a link interface is given, to dnsmasq for DHCP. With `stop_after_boot` (seed Task 3: "stop the
container after boot successfully completed") the services shut down once the HPC reports it booted
(`/trustcap/booted`): nothing listens on the link afterwards that could serve a second, different boot.
Running this in a container is the same process with host networking on the link interface.
"""

from __future__ import annotations

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
            if self.cfg.dhcp is not None:
                state = self.cfg.state_dir or self.cfg.root.parent / "netboot-state"
                self.dnsmasq = Dnsmasq(self.cfg.dhcp, state).start()
        except Exception:
            self.stop()
            raise
        return self

    def _booted(self, signal: BootSignal) -> None:
        self.booted.append(signal)
        for hook in self._booted_hooks:
            hook(signal)
        if self.cfg.stop_after_boot:
            log.info("boot completed by %s; stopping the boot services (stop_after_boot)", signal["client"])
            threading.Thread(target=self.stop, name="trustcap-netboot-stop", daemon=True).start()

    def stop(self) -> None:
        """Stop every service; one that fails to stop does not keep the others running."""
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
