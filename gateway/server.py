"""The gateway's attestation server for its HPC: accepts the agent's channel, enrols it, asks for quotes.

    agent                       AttestationServer (Pi)                 committee verifier (via relay)
      |-- TCP connect, HELLO --> | handshake thread (trustcap.channel): enrol or look up key
      |<-- WELCOME -------------|   (fresh gateway nonce nG, signed by the trust root)
      |== FINISHED sig_A(nG) ==>| first record under the new keys: only now does the session
      |                          |   replace the live one (a replayed HELLO never gets this far)
      |                          |<-- relay(nonce) ------------------------ | nonce from V's registry
      |<== REQ quote{nonce} =====|                                          |
      |=== RESP quote, sig_A ===>| countersign with the trust root          |
      |                          |-- SignedQuote --------------------------> | appraise + policy -> verdict
      |                          | monitor.py asks the same way, at random times, with its own nonces

One agent per gateway (the Pi's one HPC). Requests are serialized (one outstanding at a time): the
gateway is the only requester on the channel, which is what makes key rotation race-free.

Availability (issue 4): a handshake that has not proven the agent's boot key *and* its ephemeral key
(FINISHED, bound to this connection's fresh nonce) never disturbs the established session, so a HELLO
replayed from the link cannot disconnect the genuine agent. Each handshake runs in its own thread with a
hard total deadline (`handshake_seconds`, enforced by shutting the socket down, so a byte-a-second
sender cannot stretch it), at most `max_handshakes` at once (the next connection is closed at once and
counted in `refusals`): one silent connection never holds off the agent's reconnect. The accept loop
waits on a selector with a wake-up socket, and `close()` also shuts every pending handshake down, so
close returns at once instead of waiting out a join timeout.

The handshake's messages and the record layer are `trustcap.channel` (the protocol's diagram is there);
this module decides who may enrol and keeps the session. A channel failure reaches the gateway's callers
(monitor, relay, runner) as the gateway's ChannelError, a GatewayError.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trustcap import channel
from trustcap.evidence import Quote, SignedQuote, Signer, countersign_quote
from trustcap.evidence.errors import SignatureError
from trustcap.gateway.enrol import Enrolment, TokenBook
from trustcap.gateway.errors import ChannelError, EnrolmentRefused, GatewayError, QuoteRejected

__all__ = ["AgentSession", "AttestationServer", "Rotation"]

log = logging.getLogger("trustcap.gateway")


@dataclass(frozen=True)
class Rotation:
    """When the gateway rotates the channel's keys: after `requests` requests or `seconds`, whichever comes
    first. The agent closes a channel that runs twice its own limit on one key, so rotation cannot lapse."""

    requests: int = 16
    seconds: float = 300.0

    def due(self, chan: channel.SecureChannel) -> bool:
        # a request is two records (ours and the answer)
        return (chan.records_in_epoch >= 2 * self.requests
                or chan.clock() - chan.epoch_started >= self.seconds)


class AgentSession:
    """The live channel to the enrolled agent; rotates its keys as `rotation` says."""

    def __init__(self, chan: channel.SecureChannel, enrolment: Enrolment, rotation: Rotation) -> None:
        self.chan = chan
        self.enrolment = enrolment
        self.rotation = rotation
        self.rotations = 0
        self._lock = threading.Lock()

    def call(self, op: str, **params: Any) -> dict[str, Any]:
        with self._lock:
            try:
                if self.rotation.due(self.chan):
                    self._rekey()
                self.chan.send({"op": op, **params})
                resp: dict[str, Any] = self.chan.recv()
            except channel.ChannelError as exc:  # the gateway's callers handle GatewayError
                raise ChannelError(str(exc)) from exc
        # A finished run's `result` answer names its error beside `state`: that is the run's outcome, not a
        # refused request, and its wipe report and reason must reach the runner.
        if resp.get("error") and "state" not in resp:
            raise GatewayError(f"agent refused {op!r}: {resp['error']}")
        return resp

    def _rekey(self) -> None:
        priv, pub = channel.new_ephemeral()
        self.chan.send({"op": "rekey", "eph": "0x" + pub.hex()})
        resp = self.chan.recv()
        peer = channel.hex_field(resp, "eph", 32)
        self.chan.switch_keys(priv, peer)
        self.rotations += 1
        log.info("channel to %s rotated to key epoch %s", self.enrolment.node_id, self.chan.epoch)

    def close(self) -> None:
        self.chan.close()


class AttestationServer:
    """Listens for its agent, enrols it, and answers quote requests (monitor, relay) countersigned."""

    def __init__(self, trust_root: Signer, node_id: str, tokens: TokenBook, *, host: str = "127.0.0.1",
                 port: int = 0, rekey_after: int = 16, rekey_seconds: float = 300.0,
                 handshake_seconds: float = 5.0, max_handshakes: int = 8,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root = trust_root
        self.node_id = node_id
        self.tokens = tokens
        if not 1 <= rekey_after <= channel.MAX_RECORDS_PER_EPOCH // 2:
            raise GatewayError(f"rekey_after {rekey_after}: rotate the channel's keys every 1.."
                               f"{channel.MAX_RECORDS_PER_EPOCH // 2} requests; the agent closes a channel that "
                               f"carries more than {channel.MAX_RECORDS_PER_EPOCH} records on one key")
        self.rotation = Rotation(rekey_after, rekey_seconds)
        self.clock = clock
        self.session: AgentSession | None = None
        self.refusals: list[str] = []
        # Optional hook, called with each new session (e.g. publish.EnrolmentPublisher.on_session); must not block.
        self.on_session: Callable[[AgentSession], None] | None = None
        self.handshake_seconds = handshake_seconds
        self.max_handshakes = max_handshakes
        self._connected = threading.Event()
        self._session_lock = threading.Lock()
        self._pending: dict[socket.socket, threading.Thread] = {}
        self._pending_lock = threading.Lock()
        self._sock = socket.create_server((host, port), backlog=max(16, 2 * max_handshakes))
        self.address = self._sock.getsockname()[:2]
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._accept_loop, name="trustcap-gateway-accept", daemon=True)
        self._thread.start()

    # -- handshake -------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stop.is_set():
                ready = {key.fileobj for key, _ in sel.select()}
                if self._wake_r in ready or self._stop.is_set():
                    return
                try:
                    conn, _ = self._sock.accept()
                except OSError:
                    if self._stop.is_set():
                        return
                    continue  # the peer gave up between select and accept
                self._start_handshake(conn)

    def _start_handshake(self, conn: socket.socket) -> None:
        with self._pending_lock:
            if len(self._pending) >= self.max_handshakes:
                busy = True
            else:
                busy = False
                t = threading.Thread(target=self._handshake_thread, args=(conn,), daemon=True,
                                     name="trustcap-gateway-handshake")
                self._pending[conn] = t
        if busy:
            self._refuse(conn, f"too many handshakes in progress ({self.max_handshakes}); connection closed")
            return
        t.start()

    def _refuse(self, conn: socket.socket, why: str) -> None:
        log.warning("agent connection refused: %s", why)
        self.refusals.append(why)
        if len(self.refusals) > 1000:  # bounded: a flood of bad handshakes must not grow memory
            del self.refusals[:-500]
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
        conn.close()

    def _handshake_thread(self, conn: socket.socket) -> None:
        """One handshake under a hard total deadline; only a confirmed one replaces the live session."""
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes the blocked recv: the deadline is total

        timer = threading.Timer(self.handshake_seconds, expire)
        timer.daemon = True
        timer.start()
        session: AgentSession | None = None
        try:
            conn.settimeout(self.handshake_seconds)
            session = self._handshake(conn)
            conn.settimeout(None)
        except (channel.ChannelError, EnrolmentRefused) as exc:
            why = (f"handshake not completed within {self.handshake_seconds:g} s" if expired.is_set()
                   else str(exc))
            self._refuse(conn, why)
        except Exception as exc:  # a bug in one handshake must not leak the socket or stop the gateway
            log.exception("handshake failed unexpectedly")
            self._refuse(conn, f"handshake failed: {type(exc).__name__}")
        finally:
            timer.cancel()
            with self._pending_lock:
                self._pending.pop(conn, None)
        if session is None:
            return
        if expired.is_set() or self._stop.is_set():  # confirmed just as the deadline or close hit
            session.close()
            return
        self._install(session)

    def _install(self, session: AgentSession) -> None:
        with self._session_lock:
            old, self.session = self.session, session
        if old is not None:
            old.close()
        self._connected.set()
        if self.on_session is not None:
            try:
                self.on_session(session)
            except Exception:  # a broken hook must never stop the gateway from serving its agent
                log.exception("on_session hook failed")

    def _handshake(self, conn: socket.socket) -> AgentSession:
        hello = channel.read_hello(channel.read_frame(conn))
        if hello.node_id != self.node_id:
            raise EnrolmentRefused(f"agent claims node {hello.node_id!r}; this gateway serves {self.node_id!r}")
        key_hex = "0x" + hello.agent_key.hex()
        enrolment = self.tokens.lookup(key_hex, hello.node_id)
        token = ""
        if enrolment is None:
            if hello.token is None:
                raise EnrolmentRefused("agent key is not enrolled and no enrolment token was presented")
            token = hello.token
            self.tokens.check(token, hello.node_id, hello.boot_digest)  # refused now, but burnt only after FINISHED
        elif enrolment.boot_digest != hello.boot_digest.lower():
            raise EnrolmentRefused("agent reconnects with another boot-image digest than it enrolled with")
        priv, eph = channel.new_ephemeral()
        welcome = channel.make_welcome(self.root, eph, hello)
        channel.write_frame(conn, welcome.raw)
        chan = channel.open_session(conn, priv, hello, welcome, role="gateway", clock=self.clock)
        # FINISHED: decrypting it proves the agent's ephemeral secret, its signature over this WELCOME (which
        # holds our fresh nonce) proves the boot key is live now: a replayed HELLO can produce neither.
        channel.await_finished(chan, welcome, hello.agent_key)
        if enrolment is None:
            # Only now, with the key proven live over this handshake, is the token burnt and the node's
            # earlier boot key forgotten: a HELLO that never finishes (a replay, a probe with a stolen
            # token) changes nothing (issue 12 item 16).
            enrolment = self.tokens.enrol(token, hello.node_id, key_hex, hello.boot_digest)
            log.info("enrolled agent key %s for node %s", key_hex[:12], hello.node_id)
        return AgentSession(chan, enrolment, self.rotation)

    # -- requests --------------------------------------------------------------------------------------
    def wait_for_agent(self, timeout: float = 30) -> AgentSession:
        if not self._connected.wait(timeout) or self.session is None:
            raise GatewayError(f"no agent connected within {timeout:g} s")
        return self.session

    def drop_session(self) -> AgentSession | None:
        """End the live session (its boot is being thrown away); the dropped session, if any."""
        with self._session_lock:
            old, self.session = self.session, None
            self._connected.clear()
        if old is not None:
            old.close()
        return old

    def wait_for_new_session(self, old_key: str | None, timeout: float, poll_s: float = 0.5) -> AgentSession:
        """Block until an agent whose key is not `old_key` holds the session (a fresh boot enrolled)."""
        deadline = time.monotonic() + timeout
        while True:
            session = self.session
            if session is not None and session.enrolment.agent_key != old_key:
                return session
            if time.monotonic() >= deadline or self._stop.is_set():
                raise GatewayError(f"no newly enrolled agent within {timeout:g} s")
            time.sleep(poll_s)

    def challenge(self, nonce: bytes, capsule: dict[str, Any] | None = None) -> SignedQuote:
        """Ask the agent for a quote bound to `nonce` (and, for a capsule round, `capsule` = {taskId, round,
        phase}, which the agent answers with that task's capsule_state); countersign it with the trust root."""
        session = self.wait_for_agent(0)
        extra = {"capsule": dict(capsule)} if capsule is not None else {}
        resp = session.call("quote", nonce="0x" + bytes(nonce).hex(), **extra)
        try:
            quote = Quote.model_validate(resp["quote"])
            agent_sig = channel.hex_field(resp, "agent_signature", 65)
        except (KeyError, ValueError, channel.ChannelError) as exc:
            raise QuoteRejected(f"agent sent a malformed quote: {exc}") from exc
        if quote.nonce != "0x" + bytes(nonce).hex():
            raise QuoteRejected("agent answered another nonce than the one relayed")
        if quote.agent_key != session.enrolment.agent_key:
            raise QuoteRejected("quote names another agent key than the enrolled one")
        if capsule is not None and any(str(quote.capsule_state.get(k, "")).lower() != str(capsule[k]).lower()
                                       for k in ("taskId", "round", "phase") if k in capsule):
            raise QuoteRejected("agent answered another capsule round than the one relayed")
        try:
            return countersign_quote(quote, agent_sig, self.root)
        except SignatureError as exc:
            raise QuoteRejected(f"agent quote signature does not match its enrolled key: {exc}") from exc

    def relay(self, nonce: bytes) -> SignedQuote:
        """A committee verifier's challenge, forwarded unchanged to the agent and countersigned."""
        return self.challenge(nonce)

    def command(self, op: str, **params: Any) -> dict[str, Any]:
        """stop/wipe/status requests to the agent (the monitor's actions use these)."""
        return self.wait_for_agent(0).call(op, **params)

    def close(self) -> None:
        """Stop accepting, end pending handshakes and the session; returns once every thread is done."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")  # wakes the selector the accept loop waits on
        self._thread.join(timeout=5)
        self._sock.close()
        with self._pending_lock:
            pending = list(self._pending.items())
        for conn, _ in pending:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for _, t in pending:
            t.join(timeout=5)
        with self._session_lock:
            session = self.session
        if session is not None:
            session.close()
        self._wake_r.close()
        self._wake_w.close()
