"""The owner's broker over HTTP: `POST /v1/release` runs `check_release` and answers the wrapped key.

    executor gateway                      BrokerServer                         check_release
      | POST /v1/release (JSON, <= 1 MiB) ->| Content-Length, whole body read     |
      |                                     | within READ_TIMEOUT, strict JSON --->| every claim against the
      |                                     |                                      | chain and the signatures
      |<- 200 {wrappedKey, executorKey} ----|<- Release ---------------------------|
      |<- 4xx {error, field} ---------------|<- ReleaseDenied (its status, field) -|
      |                                     | one log line per decision: peer, capsule, input, executor,
      |                                     | granted (who counted) or refused (field, why)

Why this shape: the HTTP layer only bounds what a caller can make us do (body size, time to send it,
duplicate JSON keys that two parsers could read differently) and turns the check's answer into JSON;
every decision is the check's. A chain that cannot be read is 503 (retry later), never a release.
Checks run one at a time: a broker serves one owner's few inputs, and the chain view need not be
thread-safe. `GET /healthz` answers without touching the chain.
"""

from __future__ import annotations

import http.server
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from trustcap.capsule.keys import KeyPair
from trustcap.errors import ConfigError, TrustcapError
from trustcap.httpio import drain
from trustcap.release.binding import MAX_EVIDENCE_AGE_S
from trustcap.release.check import check_release
from trustcap.release.errors import ReleaseDenied

if TYPE_CHECKING:
    from trustcap.chain.escrow import ChainView

__all__ = ["MAX_BODY", "MAX_DEPTH", "READ_TIMEOUT", "BrokerServer"]

log = logging.getLogger("trustcap.broker")

MAX_BODY = 1 << 20
READ_TIMEOUT = 10.0
#: a release request nests about 6 deep; the cap is checked before parsing, because py_ecc (under web3)
#: raises the interpreter's recursion limit to 100000 for the whole process, and json's C decoder then
#: overflows a thread's stack (a segfault, not a RecursionError) on a body of some 100000 brackets
MAX_DEPTH = 32
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_LOG_VALUE = 80
_DRAIN = 4 * MAX_BODY


class _Refusal(Exception):
    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


def _short(value: Any) -> str:
    """A caller's value, safe for one log line (bounded, repr-quoted so it cannot forge a line)."""
    text = repr(value)
    return text if len(text) <= _LOG_VALUE else text[:_LOG_VALUE] + "..."


def _one_line(text: str) -> str:
    """A field name or reason for the log: the caller chose parts of it, so no line breaks, bounded."""
    flat = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return flat if len(flat) <= 4 * _LOG_VALUE else flat[:4 * _LOG_VALUE] + "..."


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise _Refusal(400, key, f"{key!r} appears twice in one JSON object")
        doc[key] = value
    return doc


def _too_deep(raw: bytes) -> bool:
    """Whether arrays and objects nest deeper than MAX_DEPTH (brackets inside strings do not count)."""
    depth = 0
    for ch in _STRING.sub(b"", raw).translate(None, delete=_NOT_BRACKETS):
        depth += 1 if ch in b"[{" else -1
        if depth > MAX_DEPTH:
            return True
    return False


_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _claims(body: Any) -> tuple[str, str, str]:
    """What the request claims, for the log only: capsule, input, executor."""
    if not isinstance(body, Mapping):
        return "-", "-", "-"
    cap, rnd = body.get("capsule"), body.get("round")
    capsule = (f"{cap.get('namespace')}/{cap.get('name')}" if isinstance(cap, Mapping) else "-")
    executor = rnd.get("executor") if isinstance(rnd, Mapping) else "-"
    return _short(capsule), _short(body.get("input", "-")), _short(executor)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    _declared = 0
    server_version = "trustcap-broker"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.read_timeout)  # per socket operation; the body has a deadline too

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _answer(self, status: int, doc: Mapping[str, Any]) -> None:
        payload = json.dumps(doc, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(payload)

    def _refuse(self, status: int, field: str, message: str) -> None:
        self.close_connection = True
        self._answer(status, {"error": message, "field": field})

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._answer(200, {"ok": True, "owner": "0x" + self.server.key.public_key().hex()})
        elif self.path == "/v1/release":
            self._refuse(405, "method", "use POST for /v1/release")
        else:
            self._refuse(404, "path", f"no such endpoint {self.path[:100]!r}; the broker serves POST /v1/release")

    def do_POST(self) -> None:
        if self.path != "/v1/release":
            self._refuse(404, "path", f"no such endpoint {self.path[:100]!r}; the broker serves POST /v1/release")
            return
        peer = self.client_address[0]
        try:
            body = self._body()
        except _Refusal as r:
            log.info("refused peer=%s field=%s status=%d reason=%s", peer, _one_line(r.field), r.status,
                     _one_line(r.message))
            self._refuse(r.status, r.field, r.message)
            if r.status == 413:
                self._drain()
            return
        capsule, input_name, executor = _claims(body)
        try:
            with self.server.lock:
                release = check_release(body, key=self.server.key, view=self.server.view, now=self.server.clock(),
                                        max_age_s=self.server.max_age_s)
        except ReleaseDenied as exc:
            log.info("refused peer=%s capsule=%s input=%s executor=%s field=%s status=%d reason=%s", peer, capsule,
                     input_name, executor, _one_line(exc.field), exc.status, _one_line(exc.reason))
            self._refuse(exc.status, exc.field, str(exc))
            return
        except TrustcapError as exc:
            log.warning("refused peer=%s capsule=%s input=%s executor=%s status=503 reason=cannot check: %s", peer,
                        capsule, input_name, executor, _one_line(str(exc)))
            self._refuse(503, "chain", f"the broker cannot check the request now: {exc}; retry later")
            return
        except Exception:
            log.exception("refused peer=%s capsule=%s input=%s status=500 reason=internal error", peer, capsule,
                          input_name)
            self._refuse(500, "", "internal error in the broker; its log says more")
            return
        log.info("granted peer=%s capsule=%s input=%s task=0x%s executor=%s executorKey=0x%s counted=%s", peer,
                 capsule, _short(release.input_name), release.task_id.hex(), release.executor,
                 release.executor_key.hex(), ",".join(release.counted))
        self._answer(200, release.answer())

    def _body(self) -> Any:
        if self.headers.get("Transfer-Encoding"):
            raise _Refusal(411, "body", "send the body with a Content-Length, not chunked")
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            raise _Refusal(411, "body", "a Content-Length is required")
        try:
            length = int(length_text)
        except ValueError:
            raise _Refusal(400, "body", "Content-Length is not a number") from None
        if length < 0:
            raise _Refusal(400, "body", "Content-Length is negative")
        self._declared = length
        if length > self.server.max_body:
            raise _Refusal(413, "body", f"the body is {length} bytes; at most {self.server.max_body}")
        ctype = self.headers.get("Content-Type", "application/json").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise _Refusal(415, "body", f"Content-Type is {ctype!r}; send application/json")
        raw = self._read(length)
        if _too_deep(raw):
            raise _Refusal(400, "body", f"nests deeper than {MAX_DEPTH} levels")
        try:
            return json.loads(raw, object_pairs_hook=_no_duplicates)
        except _Refusal:
            raise
        except (ValueError, RecursionError) as exc:
            raise _Refusal(400, "body", f"is not JSON: {exc}") from None

    def _drain(self) -> None:
        drain(self.rfile, self._declared, cap=_DRAIN, timeout_s=self.server.read_timeout)

    def _read(self, length: int) -> bytes:
        limit = self.server.read_timeout
        deadline = time.monotonic() + limit
        parts: list[bytes] = []
        left = length
        try:
            while left:
                if time.monotonic() > deadline:
                    raise _Refusal(408, "body", f"the body did not arrive within {limit:g} s")
                chunk = self.rfile.read1(min(left, 64 * 1024))
                if not chunk:
                    raise _Refusal(400, "body", f"the body ended after {length - left} of {length} bytes")
                parts.append(chunk)
                left -= len(chunk)
        except TimeoutError:
            raise _Refusal(408, "body", f"the body did not arrive within {limit:g} s") from None
        return b"".join(parts)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], key: KeyPair, view: ChainView, max_body: int,
                 read_timeout: float, clock: Callable[[], float], max_age_s: float) -> None:
        self.key, self.view, self.lock = key, view, threading.Lock()
        self.max_body, self.read_timeout = max_body, read_timeout
        self.clock, self.max_age_s = clock, max_age_s
        super().__init__(addr, _Handler)


class BrokerServer:
    """Serves `POST /v1/release` and `GET /healthz` on host:port (port 0: a free one) from construction
    until `close()`, in a background thread. Also a context manager. A body above `max_body` bytes is
    refused unread (413); one that takes longer than `read_timeout` seconds to arrive is dropped (408).
    Keys are released only on pre-round evidence at most `max_age_s` old by `clock` (decision 0095)."""

    def __init__(self, key: KeyPair, view: ChainView, *, host: str = "127.0.0.1", port: int = 0,
                 max_body: int = MAX_BODY, read_timeout: float = READ_TIMEOUT,
                 clock: Callable[[], float] = time.time, max_age_s: float = MAX_EVIDENCE_AGE_S) -> None:
        try:
            self._server = _Server((host, port), key, view, max_body, read_timeout, clock, max_age_s)
        except OSError as exc:
            raise ConfigError(f"the broker cannot listen on {host}:{port}: {exc.strerror or exc} (is another "
                              "process on that port? pick another --listen)") from exc
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,), name=f"broker-{self.port}",
                                        daemon=True)
        self._thread.start()
        log.info("broker listening url=%s owner=0x%s", self.url, key.public_key().hex())

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> BrokerServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
