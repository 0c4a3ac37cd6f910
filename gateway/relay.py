"""The gateway's outward attestation service: committee challenges in, countersigned quotes out; and
the node's trust status, which expires.

A committee verifier never talks to an HPC: the HPC's only link is its Pi. The verifier sends its own
fresh nonce to the executor's gateway, which forwards it over the encrypted channel to its agent and
returns the agent's quote countersigned by its trust root. The relay does not appraise: the verifier
does (`trustcap.evidence.appraise_quote`), because only the verifier knows which nonce it sent and a
relay that "checked" on the verifier's behalf would be one more party to trust.

Only committee verifiers may ask (decision 0072): each is a Pi gateway whose trust root signs its request
(`trustcap.evidence.sign_challenge`), and the relay serves only an address its verifier directory holds
(`gateway/verifiers.py`: `--verifier` addresses and/or the cluster's Gateway objects). Every refusal is
answered by name and counted, and none reaches the agent.

A capsule round's challenge (decision 0090) carries a signed `capsule: {taskId, round, phase}`. The relay
answers it only for a member of that round's committee (`round_members`, e.g. `kube_round_members`: the
Attestation's `spec.committee.members[].address`), so a gateway that is in the directory but not on the
committee cannot learn the executor's capsule state. Before the first capsule quote the gateway's runner
prepares the task on the agent (`before_capsule_quote`, idempotent); then `server.challenge(nonce, capsule)`
asks the agent for a quote whose `capsule_state` binds the task, the round and the phase.

    verifier V (a Pi, trust root)       RelayService (executor's Pi)             AttestationServer -> agent
      | nonce = V.nonces.issue()            |                                         |
      | sig = V.root.sign(digest{domain,    |                                         |
      |   nonce, node, verifier, issuedAt}) |                                         |
      |-- POST /v1/challenge -------------->| 1 fields well-formed, none unknown   400 |
      |   {nonce,node,verifier,issuedAt,sig}| 2 |now - issuedAt| <= max_skew_s     401 |
      |                                     | 3 node == this relay's node          403 |
      |                                     | 4 signature recovers to `verifier`   401 |
      |                                     | 5 directory.allowed(verifier)        403 |
      |                                     | 5a capsule: the round is known       404 |
      |                                     | 5b capsule: verifier in its committee 403 |
      |                                     | 6 an in-flight slot is free          503 |
      |                                     | 7 digest unseen for 2 x max_skew_s   409 |
      |                                     | 7a capsule: before_capsule_quote ok  409 |
      |                                     |-- server.relay(nonce) ----------------->| REQ quote{nonce} (channel)
      |                                     |   or server.challenge(nonce, capsule) ->| REQ quote{nonce, capsule}
      |                                     |<-- SignedQuote (agent sig + gateway countersig) --|
      |<-- 200 canonical SignedQuote -------|
      | appraise: both signatures, V's nonce once, identity, age; V's policy -> verdict
      |

    operator                             RelayService
      |-- POST /v1/liveness {nonce} ------->| at most one signature per `liveness_interval_s`     503
      |<-- {gateway, nonce, signature} -----|   signed: digest{domain "trustcap.gateway-liveness.v1",
      | recovers to Gateway.spec.address?   |   nonce, gateway}; the operator then writes lastSeen
      |   -> Gateway.status.lastSeen        |   (operator/gateway.py)

What the relay does not serve (decision 0114): its port is the one every other gateway reaches, so
nothing on it may say whether this node executes. `GET /metrics` and `GET /v1/status` are not on the
relay: `MetricsService` serves them on their own listener (`--metrics-address`, loopback by default,
TLS with client certificates when it listens elsewhere), because `trustcap_gateway_relay_*` moves
exactly when this node is attested. An idle (non-round) challenge is refused outright on a gateway that
takes part in capsules (`serve_idle=False`): its quote's `containers` reading lists the running capsule,
and a refusal that depended on a run going would leak the same bit, so the refusal never depends on it.
Which relays a committee challenges is still visible on the wire (threat model row 10).

    MetricsService (--metrics-address, the Pi's operator only)
      GET /metrics    prometheus_client's default REGISTRY (trustcap_gateway_relay_*, _node_trusted, ...)
      GET /v1/status  {trusted, reason, ...}: trusted only if the latest monitor check passed AND is
                      younger than the freshness limit (CVE-2022-3500)

Bounds (docs/design.md: a gateway's verifier work is bounded and measured): at most `max_connections` open
HTTP connections (the next one is closed at once), at most `max_inflight` challenges at a time (the
next gets 503 + Retry-After), a 1 KiB request body, a per-connection read timeout, and the agent
channel's own per-request timeout; at most `max_recent` remembered challenge digests (when full of
unexpired ones, the next challenge gets 503 rather than forgetting one and opening a replay). All counted
in `stats`.

Trust expiry: the monitor's last passing check is only evidence for a while. When no passing check is
younger than `max_age_s` (a dead monitor thread, a wedged channel, a silent agent), the node is reported
untrusted with reason `attestation.expired`: silence never keeps a node trusted.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol, cast

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

from trustcap.api import ATTESTATIONS, GROUP, VERSION
from trustcap.evidence import (
    Challenge,
    ChallengeFormatError,
    SignedQuote,
    encode_signed_quote,
    verify_challenge,
)
from trustcap.evidence.errors import SignatureError
from trustcap.evidence.liveness import liveness_digest
from trustcap.evidence.signing import Signer
from trustcap.gateway.attest_errors import DirectoryError
from trustcap.gateway.errors import GatewayError, QuoteRejected
from trustcap.gateway.verifiers import VerifierDirectory
from trustcap.httpio import drain

__all__ = ["MAX_BODY", "MAX_COSIGN_BODY", "Cosign", "MetricsService", "RelayService",
           "RoundDirectory", "RoundMembers", "TrustState", "kube_round_members", "trust_state"]

log = logging.getLogger("trustcap.gateway")

MAX_BODY = 2048  # a capsule challenge with the longest node and round names fits
MAX_COSIGN_BODY = 1 << 20  # a batch of 1000 verdicts fits (gateway/cosign.py MAX_BODY)

CHALLENGES = Counter("trustcap_gateway_relay_challenges_total", "Committee challenges through the relay, by result.",
                     ["result"])
CHALLENGE_SECONDS = Histogram("trustcap_gateway_relay_challenge_seconds",
                              "Time from a served challenge's request to its countersigned quote.")
REFUSED_CONNECTIONS = Counter("trustcap_gateway_relay_refused_connections_total",
                              "Relay connections closed at once because every connection slot was taken.")
_RESULT = {"challenges": "served", "refused_bad_request": "bad_request", "refused_busy": "busy",
           "agent_failures": "agent_failure", "refused_bad_signature": "bad_signature", "refused_stale": "stale",
           "refused_unknown_verifier": "unknown_verifier", "refused_wrong_node": "wrong_node",
           "refused_replay": "replay", "refused_unknown_round": "unknown_round",
           "refused_not_member": "not_member", "refused_round_unavailable": "round_unavailable",
           "refused_not_prepared": "not_prepared", "refused_idle": "idle_refused"}  # bounded label values
NODE_TRUSTED = Gauge("trustcap_gateway_node_trusted",
                     "1 if the node's latest check passed and is fresh, else 0 (evaluated at scrape).", ["node"])


_NONCE_HEX = frozenset("0123456789abcdef")


class _Record(Protocol):
    at: float
    ok: bool
    failed: list[dict[str, str]]


class _Challenger(Protocol):
    node_id: str

    def relay(self, nonce: bytes) -> SignedQuote: ...

    def challenge(self, nonce: bytes, capsule_state: dict[str, Any] | None = None) -> SignedQuote: ...


RoundMembers = Callable[[str], set[str] | None]  # round -> lowercase member addresses, None: no such round


class Cosign(Protocol):
    """`POST /v1/cosign` (gateway/cosign.py `CosignService`): a chain-writer batch, co-signed once checked."""

    def handle(self, body: bytes) -> tuple[int, bytes]: ...


@dataclass(frozen=True)
class TrustState:
    trusted: bool
    reason: str
    last_check_at: float | None
    last_ok_at: float | None

    def as_json(self) -> dict[str, Any]:
        return {"trusted": self.trusted, "reason": self.reason, "lastCheckAt": self.last_check_at,
                "lastOkAt": self.last_ok_at}


def trust_state(records: Iterable[_Record], *, now: float, max_age_s: float) -> TrustState:
    """Trusted only if the latest check passed and is younger than `max_age_s`; else the reason, named."""
    latest: _Record | None = None
    last_ok: _Record | None = None
    for r in records:
        if latest is None or r.at >= latest.at:
            latest = r
        if r.ok and (last_ok is None or r.at >= last_ok.at):
            last_ok = r
    last_ok_at = None if last_ok is None else last_ok.at
    if latest is None:
        return TrustState(False, "attestation.none: no check has run yet", None, None)
    if not latest.ok:
        ids = ", ".join(f.get("id", "?") for f in latest.failed) or "unnamed failure"
        return TrustState(False, f"attestation.failed: {ids}", latest.at, last_ok_at)
    age = now - latest.at
    if age > max_age_s:
        return TrustState(False, f"attestation.expired: last passing check {age:.1f} s ago (limit {max_age_s:g} s)",
                          latest.at, last_ok_at)
    return TrustState(True, "attestation.fresh", latest.at, last_ok_at)


class _BoundedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a hard cap on concurrent connections (one thread each)."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, addr: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self.refused_connections = 0
        # the listen backlog must hold a burst up to the bound, or the kernel resets connections that the
        # bound would have served or refused by name (socketserver's default backlog is 5)
        self.request_queue_size = max_connections
        super().__init__(addr, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused_connections += 1
            REFUSED_CONNECTIONS.inc()
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a connection that broke mid-request is the client's business: one log line, no traceback
        log.info("relay: connection from %s dropped", client_address[0] if client_address else "?")

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class RelayService:
    """HTTP service on the Pi's cluster side: `POST /v1/challenge`, with `liveness` (the trust root)
    `POST /v1/liveness`, and with `cosign` `POST /v1/cosign` (the chain-writer's batches, decision 0094;
    its body is bounded by MAX_COSIGN_BODY). `status()` is served by `MetricsService`, not here."""

    def __init__(self, server: _Challenger, *, verifiers: VerifierDirectory,
                 records: Callable[[], Iterable[_Record]] = lambda: (), max_age_s: float = 60.0,
                 host: str = "127.0.0.1", port: int = 0, max_inflight: int = 4, max_connections: int = 32,
                 read_timeout_s: float = 10.0, max_skew_s: float = 60.0, max_recent: int = 4096,
                 clock: Callable[[], float] = time.time, round_members: RoundMembers | None = None,
                 before_capsule_quote: Callable[[dict[str, str]], None] | None = None,
                 cosign: Cosign | None = None, serve_idle: bool = True, liveness: Signer | None = None,
                 liveness_interval_s: float = 0.2) -> None:
        if max_inflight < 1 or max_connections < 1 or max_age_s <= 0 or max_skew_s <= 0 or max_recent < 1:
            raise ValueError("max_inflight, max_connections, max_age_s, max_skew_s and max_recent must be positive")
        self.server = server
        self.serve_idle = serve_idle
        self.liveness = liveness
        self.liveness_interval_s = liveness_interval_s
        self._last_liveness = float("-inf")
        self.verifiers = verifiers
        self.round_members = round_members
        self.before_capsule_quote = before_capsule_quote
        self.cosign = cosign
        self.max_skew_s = max_skew_s
        self.max_recent = max_recent
        self._recent: OrderedDict[bytes, float] = OrderedDict()  # challenge digest -> forget-at (clock time)
        self.records = records
        self.max_age_s = max_age_s
        self.clock = clock
        self.stats = {key: 0 for key in _RESULT}
        self._inflight = threading.BoundedSemaphore(max_inflight)
        self._lock = threading.Lock()
        self._http = _BoundedHTTPServer((host, port), _handler(self, read_timeout_s), max_connections)
        self.address: tuple[str, int] = self._http.server_address[:2]  # type: ignore[assignment]
        NODE_TRUSTED.labels(server.node_id).set_function(lambda: float(self.status()["trusted"]))
        self._thread = threading.Thread(target=self._http.serve_forever, name="trustcap-relay", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    @property
    def refused_connections(self) -> int:
        return self._http.refused_connections

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1
        CHALLENGES.labels(_RESULT[key]).inc()

    def status(self) -> dict[str, Any]:
        state = trust_state(self.records(), now=self.clock(), max_age_s=self.max_age_s)
        return {"node": self.server.node_id, **state.as_json()}

    def challenge(self, body: bytes) -> tuple[int, bytes]:
        """One challenge: (HTTP status, response body). Never raises for a client's or agent's fault."""
        checked = self._authenticate(body)
        if isinstance(checked, tuple):
            return checked
        if not self._inflight.acquire(blocking=False):
            self._count("refused_busy")
            return _error(HTTPStatus.SERVICE_UNAVAILABLE, "relay busy: too many challenges in flight")
        try:
            refused = self._remember(checked)
            if refused is not None:
                return refused
            return self._forward(checked)
        finally:
            self._inflight.release()

    def _refuse(self, key: str, status: HTTPStatus, field: str, cause: str) -> tuple[int, bytes]:
        self._count(key)
        log.info("relay: challenge refused (%s): field %s: %s", _RESULT[key], field, cause)
        return _error(status, f"field {field!r}: {cause}", field)

    def _authenticate(self, body: bytes) -> Challenge | tuple[int, bytes]:
        """The verified challenge, or the refusal naming the field; the order is the module diagram's."""
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return self._refuse("refused_bad_request", HTTPStatus.BAD_REQUEST, "body", "request body is not JSON")
        try:
            challenge = verify_challenge(doc)
        except ChallengeFormatError as exc:
            return self._refuse("refused_bad_request", HTTPStatus.BAD_REQUEST, exc.field, exc.cause)
        except SignatureError as exc:
            return self._refuse("refused_bad_signature", HTTPStatus.UNAUTHORIZED, "signature", str(exc))
        skew = self.clock() - challenge.issued_at
        if abs(skew) > self.max_skew_s:
            when = "stale" if skew > 0 else "from the future"
            return self._refuse("refused_stale", HTTPStatus.UNAUTHORIZED, "issuedAt",
                                f"{when}: {abs(skew):.0f} s from this gateway's clock (limit {self.max_skew_s:g} s)")
        if challenge.node != self.server.node_id:
            return self._refuse("refused_wrong_node", HTTPStatus.FORBIDDEN, "node",
                                f"this relay serves node {self.server.node_id!r}, not {challenge.node[:64]!r}")
        if not self.verifiers.allowed(challenge.verifier):
            return self._refuse("refused_unknown_verifier", HTTPStatus.FORBIDDEN, "verifier",
                                f"{challenge.verifier} is not in this gateway's verifier directory")
        if challenge.capsule is None and not self.serve_idle:
            # Refused whatever the node is doing: an idle quote lists the running capsule's container, and
            # a refusal only while one runs would say the same.
            return self._refuse("refused_idle", HTTPStatus.FORBIDDEN, "capsule",
                                "this gateway takes part in capsules and answers only a capsule round's challenge "
                                "from its committee; an idle quote would show whether a capsule runs here")
        if challenge.capsule is not None:
            refused = self._committee_check(challenge, challenge.capsule)
            if refused is not None:
                return refused
        return challenge

    def liveness_answer(self, body: bytes) -> tuple[int, bytes]:
        """`POST /v1/liveness` {nonce}: the trust root's signature over the caller's nonce, so the operator
        can record this gateway as seen from evidence it checks (operator/gateway.py). Anyone may ask:
        the answer says only that this key is up at this address, which the Gateway object says anyway.
        A trust root (a Zymkey) signs slowly, so at most one answer per `liveness_interval_s`."""
        if self.liveness is None:
            return _error(HTTPStatus.NOT_FOUND, "this relay has no trust root to answer liveness with")
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _error(HTTPStatus.BAD_REQUEST, "request body is not JSON", "body")
        raw = doc.get("nonce") if isinstance(doc, dict) and set(doc) == {"nonce"} else None
        if not isinstance(raw, str) or len(raw) != 66 or not raw.startswith("0x") or not set(raw[2:]) <= _NONCE_HEX:
            return _error(HTTPStatus.BAD_REQUEST, "the body must be exactly {\"nonce\": \"0x<64 lowercase hex>\"}",
                          "nonce")
        with self._lock:
            now = time.monotonic()
            if now - self._last_liveness < self.liveness_interval_s:
                return _error(HTTPStatus.SERVICE_UNAVAILABLE, "relay busy: liveness answered just now, retry shortly")
            self._last_liveness = now
        nonce = bytes.fromhex(raw[2:])
        address = self.liveness.address
        signature = self.liveness.sign_digest(liveness_digest(nonce, address))
        answer = {"gateway": address, "nonce": raw, "signature": "0x" + signature.hex()}
        return HTTPStatus.OK, json.dumps(answer).encode()

    def _committee_check(self, challenge: Challenge, capsule: dict[str, str]) -> tuple[int, bytes] | None:
        """A capsule challenge is served only to a member of the committee of the round it names."""
        rnd = capsule["round"]
        if self.round_members is None:
            return self._refuse("refused_unknown_round", HTTPStatus.NOT_FOUND, "capsule.round",
                                "this relay has no round directory, so it serves no capsule challenge")
        try:
            members = self.round_members(rnd)
        except Exception as exc:  # an API-server outage: the verifier retries, nothing reaches the agent
            log.warning("relay: round directory failed for %s: %s", rnd[:64], exc)
            self._count("refused_round_unavailable")
            return _error(HTTPStatus.SERVICE_UNAVAILABLE, f"round directory unavailable: {str(exc)[:200]}",
                          "capsule.round")
        if members is None:
            return self._refuse("refused_unknown_round", HTTPStatus.NOT_FOUND, "capsule.round",
                                f"no attestation round {rnd[:64]!r} is known to this gateway")
        if challenge.verifier.lower() not in {m.lower() for m in members}:
            return self._refuse("refused_not_member", HTTPStatus.FORBIDDEN, "verifier",
                                f"{challenge.verifier} is not in the committee of round {rnd[:64]!r}")
        return None

    def _remember(self, challenge: Challenge) -> tuple[int, bytes] | None:
        """Record the signed statement's digest for 2 x max_skew_s (a request accepted at the edge of the
        window is still refused as a replay until its `issuedAt` is stale); a refusal if it was seen, or
        503 if memory is full of unexpired digests (forgetting one would reopen its replay)."""
        now = self.clock()
        with self._lock:
            while self._recent and next(iter(self._recent.values())) <= now:
                self._recent.popitem(last=False)  # insertion order is forget-at order (one clock, one window)
            seen = challenge.digest in self._recent
            full = not seen and len(self._recent) >= self.max_recent
            if not seen and not full:
                self._recent[challenge.digest] = now + 2 * self.max_skew_s
                return None
        if seen:
            return self._refuse("refused_replay", HTTPStatus.CONFLICT, "signature",
                                "replay: this signed challenge was already served")
        self._count("refused_busy")
        return _error(HTTPStatus.SERVICE_UNAVAILABLE, "relay busy: replay memory full, retry shortly")

    def _forward(self, challenge: Challenge) -> tuple[int, bytes]:
        started = time.perf_counter()
        capsule = challenge.capsule
        if capsule is not None and self.before_capsule_quote is not None:
            try:
                self.before_capsule_quote(dict(capsule))
            except Exception as exc:  # the runner's cause, by name; the agent is not asked for a quote
                return self._refuse("refused_not_prepared", HTTPStatus.CONFLICT, "capsule",
                                    f"task {capsule['taskId'][:18]}.. is not prepared on this node: "
                                    f"{type(exc).__name__}: {str(exc)[:200]}")
        try:
            signed = (self.server.relay(challenge.nonce) if capsule is None
                      else self.server.challenge(challenge.nonce, dict(capsule)))
        except QuoteRejected as exc:
            self._count("agent_failures")
            log.warning("relay: agent's answer refused by the gateway: %s", exc)
            return _error(HTTPStatus.BAD_GATEWAY, f"agent's answer refused: {exc}")
        except GatewayError as exc:
            self._count("agent_failures")
            log.warning("relay: agent unreachable: %s", exc)
            return _error(HTTPStatus.SERVICE_UNAVAILABLE, f"agent unreachable: {exc}")
        CHALLENGE_SECONDS.observe(time.perf_counter() - started)
        self._count("challenges")
        return HTTPStatus.OK, encode_signed_quote(signed)

    def close(self) -> None:
        try:
            NODE_TRUSTED.remove(self.server.node_id)  # a closed relay must not keep reporting
        except KeyError:
            pass
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=5)


def _error(status: HTTPStatus, message: str, field: str | None = None) -> tuple[int, bytes]:
    doc = {"error": message} if field is None else {"error": message, "field": field}
    return status, json.dumps(doc).encode()


def _handler(relay: RelayService, read_timeout_s: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = read_timeout_s  # a client that stalls mid-request releases its slot
        protocol_version = "HTTP/1.1"
        server_version = "trustcap-relay/1"
        sys_version = ""

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("relay %s: " + fmt, self.client_address[0], *args)

        def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if status == HTTPStatus.SERVICE_UNAVAILABLE:
                self.send_header("Retry-After", "1")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            # Metrics and the trust status are the Pi operator's, on --metrics-address (decision 0114).
            self._send(*_error(HTTPStatus.NOT_FOUND, f"no such resource {self.path[:64]!r} on the relay (metrics "
                                                     "and status are served on the gateway's --metrics-address)"))

        def do_POST(self) -> None:
            cosign = relay.cosign if self.path == "/v1/cosign" else None
            if self.path not in ("/v1/challenge", "/v1/liveness") and cosign is None:
                self._send(*_error(HTTPStatus.NOT_FOUND, f"no such resource {self.path[:64]!r}"))
                return
            limit = MAX_BODY if cosign is None else MAX_COSIGN_BODY
            length = self.headers.get("Content-Length", "")
            if not length.isdigit():
                self.close_connection = True
                self._send(*_error(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required"))
                return
            if int(length) > limit:
                self.close_connection = True
                drain(self.rfile, int(length), cap=4 * limit, timeout_s=read_timeout_s)
                self._send(*_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over {limit} bytes"))
                return
            try:
                body = self.rfile.read(int(length))
            except OSError:  # the client stalled past the read timeout, or went away: drop it
                self.close_connection = True
                return
            if len(body) < int(length):
                self.close_connection = True
                return
            if cosign is not None:
                self._send(*cosign.handle(body))
            elif self.path == "/v1/liveness":
                self._send(*relay.liveness_answer(body))
            else:
                self._send(*relay.challenge(body))

    return Handler


# --- metrics and status, for the Pi's operator only ---------------------------------------------------
def is_loopback_host(host: str) -> bool:
    """Whether a listen address stays on this machine (a literal loopback IP, or localhost)."""
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class MetricsService:
    """`GET /metrics` (prometheus_client's default REGISTRY, whoever registered on it) and `GET /v1/status`
    on a listener of their own (decision 0114). On a loopback address it is plain HTTP; anywhere else the
    counters would tell the Pi network who executes, so it needs TLS and a client CA (`certfile`, `keyfile`,
    `client_ca`): only a scraper holding a certificate from that CA is answered."""

    def __init__(self, status: Callable[[], dict[str, Any]], *, host: str = "127.0.0.1", port: int = 0,
                 certfile: str | None = None, keyfile: str | None = None, client_ca: str | None = None,
                 max_connections: int = 8, read_timeout_s: float = 10.0) -> None:
        from trustcap.errors import ConfigError

        if not is_loopback_host(host) and not (certfile and keyfile and client_ca):
            raise ConfigError(f"--metrics-address {host}:{port} is not a loopback address: give --metrics-tls-cert, "
                              "--metrics-tls-key and --metrics-client-ca (only a scraper with a client certificate "
                              "is answered), or listen on 127.0.0.1, or turn metrics off")
        if bool(certfile) != bool(keyfile) or (client_ca and not certfile):
            raise ConfigError("--metrics-tls-cert and --metrics-tls-key go together, and --metrics-client-ca "
                              "needs both")
        self.status = status
        self._http = _BoundedHTTPServer((host, port), _metrics_handler(self, read_timeout_s), max_connections)
        self.scheme = "http"
        if certfile:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                ctx.load_cert_chain(certfile, keyfile)
                if client_ca:
                    ctx.load_verify_locations(cafile=client_ca)
                    ctx.verify_mode = ssl.CERT_REQUIRED
            except (OSError, ssl.SSLError) as exc:
                self._http.server_close()
                raise ConfigError(f"metrics TLS: cannot load {certfile}, {keyfile} or {client_ca}: {exc}") from exc
            # The handshake runs in the connection's thread, under its read timeout: done at accept, one
            # silent client would hold the accept loop.
            self._http.socket = ctx.wrap_socket(self._http.socket, server_side=True, do_handshake_on_connect=False)
            self.scheme = "https"
        self.address: tuple[str, int] = self._http.server_address[:2]  # type: ignore[assignment]
        self._thread = threading.Thread(target=self._http.serve_forever, name="trustcap-metrics", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self.address
        return f"{self.scheme}://{host}:{port}"

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=5)


def _metrics_handler(service: MetricsService, read_timeout_s: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = read_timeout_s
        protocol_version = "HTTP/1.1"
        server_version = "trustcap-gateway-metrics/1"
        sys_version = ""

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("metrics %s: " + fmt, self.client_address[0], *args)

        def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(HTTPStatus.OK, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
            elif path == "/v1/status":
                self._send(HTTPStatus.OK, json.dumps(service.status()).encode())
            else:
                self._send(*_error(HTTPStatus.NOT_FOUND, f"no such resource {self.path[:64]!r}"))

    return Handler


# --- the committee of a round, from the cluster ------------------------------------------------------
class RoundDirectory:
    """`round_members` over a lister of Attestation objects: a round is found by its name or by its id
    (`spec.nonce`, what a quote's `capsule_state.round` carries), its members are
    `spec.committee.members[].address`, lowercase. The list is cached for `ttl_s`; a round not in the
    cache lists again, at most once per `miss_s` (a new round is served within a second, and a flood of
    unknown rounds is not a flood of API calls). A failed list keeps the last good rounds and raises only
    for a round it has never seen (the relay answers 503; the verifier retries)."""

    def __init__(self, lister: Callable[[], list[dict[str, Any]]], *, ttl_s: float = 10.0, miss_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._list = lister
        self.ttl_s = ttl_s
        self.miss_s = miss_s
        self.clock = clock
        self._rounds: dict[str, set[str]] = {}
        self._listed_at = float("-inf")
        self._lock = threading.Lock()

    def refresh(self) -> None:
        rounds: dict[str, set[str]] = {}
        for item in self._list():
            spec = (item or {}).get("spec") or {}
            members = {str(m.get("address", "")).lower() for m in (spec.get("committee") or {}).get("members") or []
                       if isinstance(m, dict) and m.get("address")}
            for key in (((item or {}).get("metadata") or {}).get("name"), spec.get("nonce")):
                if isinstance(key, str) and key:
                    rounds[key.lower()] = members
        self._rounds = rounds
        self._listed_at = self.clock()

    def __call__(self, round_ref: str) -> set[str] | None:
        key = round_ref.lower()
        with self._lock:
            age = self.clock() - self._listed_at
            if age >= self.ttl_s or (key not in self._rounds and age >= self.miss_s):
                try:
                    self.refresh()
                except Exception:
                    # keep the last good rounds (a committee is immutable once opened), list again no
                    # sooner than miss_s, and fail the lookup only for a round never seen
                    self._listed_at = self.clock() - self.ttl_s + self.miss_s
                    if key not in self._rounds:
                        raise
            found = self._rounds.get(key)
            return None if found is None else set(found)


def kube_round_members(kubeconfig: str | None, namespace: str, *, ttl_s: float = 10.0,
                       timeout_s: float = 5.0) -> RoundDirectory:
    """The relay's `round_members` from the Attestation objects of `namespace` (the system namespace)."""
    from kubernetes import client

    from trustcap.kubeclient import api_client

    api = client.CustomObjectsApi(api_client(kubeconfig, error=DirectoryError))

    def list_rounds() -> list[dict[str, Any]]:
        doc = cast(dict[str, Any], api.list_namespaced_custom_object(GROUP, VERSION, namespace,
                                                                     ATTESTATIONS, _request_timeout=timeout_s))
        return cast(list[dict[str, Any]], doc.get("items") or [])

    return RoundDirectory(list_rounds, ttl_s=ttl_s)
