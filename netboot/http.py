"""HTTP for the iPXE script, kernel and initrd (iPXE fetches large files far faster over HTTP than TFTP).

Only GET and HEAD of approved files, through the same `ApprovedStore.fetch` as TFTP; a refused file is
403 with no detail. One extra endpoint, `GET /trustcap/booted?token=T&bootdigest=sha256:H`, is the boot
image's "I am up" signal: the init calls it once userspace and the network are up, which lets the
services stop after the boot when so configured (seed Task 3) and lets tests and benches see the boot end.

    HPC (iPXE)            HttpServer                 ApprovedStore
      | GET /kernel ------->| fetch("kernel") ---------->| approved? open O_NOFOLLOW, sha256 == approved?
      |<-- 200 bytes -------|<-- verified bytes ---------|
      | GET /initrd ------->| ... DigestMismatch ------->| log + metric + hook
      |<-- 403 -------------|                            |
    HPC (init)
      | GET /trustcap/booted?token&bootdigest --> on_booted hooks (stop-after-boot, tests)
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from trustcap.netboot.errors import NetbootError, ServiceError
from trustcap.netboot.store import ApprovedStore

__all__ = ["BootSignal", "HttpServer"]

log = logging.getLogger("trustcap.netboot")

_TOKEN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")

BootSignal = dict[str, str]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    store: ApprovedStore
    booted_hooks: list[Callable[[BootSignal], None]]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "trustcap-netboot"
    sys_version = ""
    timeout = 30  # a stalled client holds only its own thread, and not for long

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s " + format, self.client_address[0], *args)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        parts = urlsplit(self.path)
        if parts.path == "/trustcap/booted":
            self._booted(parse_qs(parts.query))
            return
        client = f"{self.client_address[0]}:{self.client_address[1]}"
        try:
            data = self.server.store.fetch(parts.path, "http", client)
        except NetbootError:
            self._reply(403, b"forbidden\n", "text/plain", head)
            return
        self._reply(200, data, "application/octet-stream", head)

    def _booted(self, query: dict[str, list[str]]) -> None:
        token = (query.get("token") or [""])[0]
        digest = (query.get("bootdigest") or [""])[0]
        if not _TOKEN.match(token) or not _DIGEST.match(digest):
            self._reply(400, b"token and bootdigest=sha256:<hex> required\n", "text/plain", False)
            return
        signal = {"client": self.client_address[0], "token": token, "bootdigest": digest}
        log.info("HPC %s reports booted with bootdigest %s", signal["client"], digest)
        self._reply(200, b"hello\n", "text/plain", False)
        for hook in self.server.booted_hooks:
            try:
                hook(signal)
            except Exception:
                log.exception("booted hook %r failed", hook)

    def _reply(self, code: int, body: bytes, ctype: str, head: bool) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not head:
            self.wfile.write(body)


class HttpServer:
    """Serve `store` over HTTP on (bind, port) in a background thread until `stop()`."""

    def __init__(self, store: ApprovedStore, bind: str, port: int) -> None:
        try:
            self._httpd = _Server((bind, port), _Handler)
        except OSError as exc:
            raise ServiceError(f"HTTP cannot bind {bind}:{port}: {exc.strerror}") from exc
        self._httpd.store = store
        self._httpd.booted_hooks = []
        self.bind = bind
        self.port: int = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None

    def on_booted(self, hook: Callable[[BootSignal], None]) -> None:
        self._httpd.booted_hooks.append(hook)

    def start(self) -> HttpServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="trustcap-http", daemon=True)
        self._thread.start()
        log.info("HTTP serving on %s:%d", self.bind, self.port)
        return self

    def stop(self) -> None:
        if self._thread:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()
