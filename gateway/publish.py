"""Publish a fresh enrolment into the HPC's `HPCNode` status, for the operator to verify, and keep it fresh.

The gateway is the only party that can reach the agent, but the cluster must not take its word: it
publishes *evidence* (a quote the agent signed with its boot key, countersigned by the trust root, bound
to a nonce the operator chose) and the operator checks every claim itself (operator/hpcnode.py).

    gateway (AttestationServer)        EnrolmentPublisher (this module)      kube-apiserver (HPCNode)
      | agent enrolled, session up -->  | (own thread; accept loop not held) |
      |                                 |-- GET hpcnode/<node> ------------->| status.enrolmentChallenge
      |                                 |   (poll until the operator set it, bounded)
      |<-- challenge(nonce) ------------|                                    |
      |--- SignedQuote (countersigned)->|                                    |
      |                                 |-- PATCH status (resourceVersion) ->| enrolment{agentKey,
      |                                 |   409: re-read, re-quote if the    |  bootImageDigest, gateway,
      |                                 |   challenge moved (bounded tries)  |  quote, quoteDigest,
      |                                 |                                    |  policyDigest, time}
      |            ... every `refresh_s` (TRUSTCAP_ENROLMENT_REFRESH_SECONDS, default 600 s) ...
      |                                 |-- the same GET, quote on the operator's *new* challenge, PATCH

The gateway never writes `status.phase` (decision 0113): Booting, Enrolled, Quarantined are the operator's
word, derived from the evidence and reports the gateways write into their own sub-fields. The periodic
refresh is what keeps an idle, healthy node Enrolled: the operator takes an enrolment back after
`TRUSTCAP_ENROLMENT_MAX_AGE_SECONDS` (1800 s, decision 0097) without fresh verified evidence, and the
operator issues a new challenge after deciding each one, so every refresh is a fresh quote on a fresh
nonce. Writes are bounded: one read and one status patch per period (more only on a 409, at most
`attempts`), and a failed refresh is retried after `retry_s`, not in a loop. A quarantined node is not
refreshed (only a person clears a quarantine; its evidence would change nothing). Each enrolment carries
`policyDigest`, the digest of the policy this gateway applies, which the operator compares with the
node's declared `spec.policy.digest`.

The gateway still works without Kubernetes: the publisher is an optional hook
(`AttestationServer.on_session`), wired by `python3 -m trustcap.gateway --kubeconfig`; the refresh loop
starts with the first session (or `start()`), in a daemon thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

from trustcap.api import GROUP, HPCNODES, VERSION, HPCNodePhase
from trustcap.errors import ConfigError
from trustcap.evidence import SignedQuote, encode_signed_quote, quote_digest
from trustcap.forms import hex_bytes, positive_seconds, rfc3339, sha256_digest
from trustcap.gateway.errors import GatewayError
from trustcap.gateway.server import AgentSession, AttestationServer
from trustcap.kubeclient import TRANSPORT_ERRORS

__all__ = ["REFRESH_ENV", "REFRESH_S", "EnrolmentPublisher", "HPCNodeStore", "KubeHPCNodes", "PublishConflict",
           "PublishError", "enrolment_status", "refresh_setting"]

log = logging.getLogger("trustcap.gateway")
PLURAL = HPCNODES
REFRESH_ENV = "TRUSTCAP_ENROLMENT_REFRESH_SECONDS"
#: A third of the operator's default maximum enrolment age (1800 s): two refreshes may fail in a row
#: (API outage, agent busy) before the node drops to Registered, and it is 2 API calls per 10 minutes.
REFRESH_S = 600.0


class PublishError(GatewayError):
    """The enrolment evidence could not be published (no HPCNode, no challenge, API unreachable)."""


class PublishConflict(PublishError):
    """The HPCNode changed between read and write (optimistic concurrency); read again."""


class HPCNodeStore(Protocol):
    """The two calls the publisher makes on the Kubernetes API (a fake in unit tests)."""

    def get(self, name: str) -> dict[str, Any]: ...

    def patch_status(self, name: str, body: dict[str, Any]) -> None: ...


class KubeHPCNodes:
    """HPCNode reads and status patches through the real API server; errors become PublishError."""

    def __init__(self, kubeconfig: str | None = None, *, timeout_s: float = 10.0) -> None:
        from kubernetes import client

        from trustcap.kubeclient import api_client as kube_api_client

        api_client = kube_api_client(kubeconfig)
        self._api = client.CustomObjectsApi(api_client)
        self._timeout = timeout_s

    def get(self, name: str) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            return cast(dict[str, Any], self._api.get_cluster_custom_object(
                GROUP, VERSION, PLURAL, name, _request_timeout=self._timeout))
        except ApiException as exc:
            raise PublishError(f"cannot read HPCNode {name!r}: {exc.status} {exc.reason}") from exc
        except TRANSPORT_ERRORS as exc:
            raise PublishError(f"cannot read HPCNode {name!r}: {exc}") from exc

    def patch_status(self, name: str, body: dict[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self._api.patch_cluster_custom_object_status(GROUP, VERSION, PLURAL, name, body,
                                                         _request_timeout=self._timeout)
        except ApiException as exc:
            if exc.status == 409:
                raise PublishConflict(f"HPCNode {name!r} changed while publishing") from exc
            raise PublishError(f"cannot patch HPCNode {name!r} status: {exc.status} {exc.reason}") from exc
        except TRANSPORT_ERRORS as exc:
            raise PublishError(f"cannot patch HPCNode {name!r} status: {exc}") from exc


status_time = rfc3339  # the CRDs' `date-time`; the gateway's other modules import it from here


def refresh_setting(default: float = REFRESH_S) -> float:
    """TRUSTCAP_ENROLMENT_REFRESH_SECONDS: seconds between enrolment refreshes (a positive number)."""
    return positive_seconds(REFRESH_ENV, default,
                            hint="keep it well under the operator's TRUSTCAP_ENROLMENT_MAX_AGE_SECONDS")


def enrolment_status(signed: SignedQuote, gateway_address: str, now: float,
                     policy_digest: str | None = None) -> dict[str, Any]:
    """`status.enrolment` for one countersigned quote (the CRD's shape; see crds/hpcnode.yaml), with the
    digest of the policy the gateway applies when it is given (`0x` or `sha256:` form)."""
    quote = signed.quote
    extra: dict[str, str] = {}
    if policy_digest is not None:
        digest = sha256_digest(policy_digest)
        if digest is None:
            raise PublishError(f"policy digest {policy_digest[:80]!r} is not a sha256 digest")
        extra["policyDigest"] = digest
    return {**extra,
        "agentKey": quote.agent_key,
        "bootImageDigest": sha256_digest(quote.boot_image_digest),
        "gateway": gateway_address,
        "quote": encode_signed_quote(signed).decode(),
        "quoteDigest": "sha256:" + quote_digest(quote).hex(),
        "time": status_time(now),
    }


def _challenge_nonce(node: dict[str, Any]) -> bytes | None:
    return hex_bytes((node.get("status") or {}).get("enrolmentChallenge", {}).get("nonce"), 32)


class EnrolmentPublisher:
    """After each new enrolment, quote the agent on the operator's challenge and publish the evidence;
    then refresh it every `refresh_s` while that agent stays enrolled.

    `clock` (monotonic seconds) and `wall` (epoch seconds) are injectable so the schedule is tested with
    a fake clock: `tick()` is one look at the schedule, the refresh thread only calls it."""

    def __init__(self, server: AttestationServer, node: str, store: HPCNodeStore, *,
                 policy_digest: str | None = None, refresh_s: float | None = None, retry_s: float | None = None,
                 wait_s: float = 60.0, poll_s: float = 1.0, attempts: int = 3,
                 wall: Callable[[], float] = time.time, clock: Callable[[], float] = time.monotonic) -> None:
        self.server = server
        self.node = node
        self.store = store
        self.policy_digest = policy_digest
        self.refresh_s = refresh_setting() if refresh_s is None else refresh_s
        if not self.refresh_s > 0:
            raise ConfigError(f"enrolment refresh period {self.refresh_s!r} is not a positive number of seconds")
        # a failed refresh is tried again sooner than a full period, but never in a tight loop
        self.retry_s = min(self.refresh_s, 60.0) if retry_s is None else retry_s
        self.wait_s = wait_s
        self.poll_s = poll_s
        self.attempts = attempts
        self.wall = wall
        self.clock = clock
        self.published: dict[str, dict[str, Any]] = {}  # agent key -> the enrolment it last published
        self.errors: list[str] = []
        self.refreshes = 0  # refreshes published (a re-publish of the agent already published)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._claimed: set[str] = set()  # keys published or being published; a failure frees its key
        self._current: str | None = None  # the latest enrolled agent key: the one refreshed
        self._due: float | None = None  # clock() at which the next refresh is due (None: nothing to refresh)
        self._busy = 0  # publishes in flight; a refresh never overlaps one
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None

    def on_session(self, session: AgentSession) -> None:
        """The server's hook: publish once per enrolled agent key, off the accept loop's thread."""
        key = session.enrolment.agent_key
        with self._lock:
            self._current = key
            if key in self._claimed:
                return  # a reconnect of an agent already published (or being published)
            self._claimed.add(key)
            self._due = None  # the new key's first publish sets the schedule
            t = threading.Thread(target=self._run, args=(key,), name=f"trustcap-publish-{key[:18]}", daemon=True)
            self._threads.append(t)
        t.start()
        self.start()

    def start(self) -> EnrolmentPublisher:
        """Start the refresh thread (idempotent); it wakes every few seconds and calls `tick()`."""
        with self._lock:
            if self._loop is not None:
                return self
            self._loop = threading.Thread(target=self._refresh_loop, name="trustcap-publish-refresh", daemon=True)
        self._loop.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._loop is not None:
            self._loop.join(5)

    def _refresh_loop(self) -> None:
        # a cheap wake-up: tick() makes no API call until a refresh is due. tick() turns the failures it
        # knows into "failed"; anything else is a bug, but it must not end the refreshes for the life of the
        # gateway (the enrolment would age out and the node leave scheduling): log it with its traceback,
        # keep it in `errors`, and try again after retry_s.
        while not self._stop.wait(min(self.retry_s, 5.0)):
            try:
                self.tick()
            except Exception as exc:  # the thread's last line of defence, logged in full
                log.exception("enrolment refresh of node %s failed unexpectedly; next try in %g s",
                              self.node, self.retry_s)
                self.errors.append(f"{type(exc).__name__}: {exc}")
                self._schedule(self.retry_s)

    def _run(self, key: str) -> None:
        with self._lock:
            self._busy += 1
        try:
            self.publish(key)
        except (GatewayError, OSError) as exc:
            log.warning("enrolment of node %s not published: %s", self.node, exc)
            self.errors.append(str(exc))
            with self._lock:
                self._claimed.discard(key)  # the agent's next reconnect tries again...
                if key == self._current:
                    self._due = self.clock() + self.retry_s  # ...and so does the refresh, if it stays connected
        finally:
            with self._lock:
                self._busy -= 1

    def tick(self) -> str | None:
        """Refresh the current agent's enrolment if it is due: "refreshed", "quarantined" (skipped),
        "failed", or None when nothing was due. Blocking; one refresh at a time."""
        with self._lock:
            key, due = self._current, self._due
            if key is None or due is None or self._busy or self.clock() < due:
                return None
            self._busy += 1
        try:
            if ((self.store.get(self.node).get("status") or {}).get("phase")) == HPCNodePhase.QUARANTINED:
                self._schedule(self.refresh_s)
                log.info("HPCNode %s is quarantined; enrolment not refreshed", self.node)
                return "quarantined"
            self.publish(key)
        except (GatewayError, OSError) as exc:
            self._schedule(self.retry_s)
            log.warning("enrolment of node %s not refreshed (next try in %g s): %s", self.node, self.retry_s, exc)
            self.errors.append(str(exc))
            return "failed"
        finally:
            with self._lock:
                self._busy -= 1
        with self._lock:
            self.refreshes += 1
        return "refreshed"

    def _schedule(self, after_s: float) -> None:
        with self._lock:
            self._due = self.clock() + after_s

    def join(self, timeout: float) -> None:
        for t in list(self._threads):
            t.join(timeout)

    def publish(self, agent_key: str) -> dict[str, Any]:
        """Blocking: wait (bounded) for the challenge, quote, patch with optimistic concurrency. Writes only
        `status.enrolment`: the phase is the operator's to derive."""
        for _ in range(self.attempts):
            node, nonce = self._wait_for_challenge()
            signed = self.server.challenge(nonce)
            if signed.quote.agent_key != agent_key:
                raise PublishError("the connected agent is not the one that enrolled; not publishing")
            enrolment = enrolment_status(signed, self.server.root.address, self.wall(), self.policy_digest)
            body = {"metadata": {"resourceVersion": node["metadata"]["resourceVersion"]},
                    "status": {"enrolment": enrolment}}
            try:
                self.store.patch_status(self.node, body)
            except PublishConflict:
                log.info("HPCNode %s changed while publishing; reading it again", self.node)
                continue
            with self._lock:
                self.published[agent_key] = enrolment
                if agent_key == self._current:
                    self._due = self.clock() + self.refresh_s
            log.info("published enrolment of node %s (agent key %s, boot %s, policy %s)", self.node,
                     agent_key[:12], enrolment["bootImageDigest"], enrolment.get("policyDigest", "unreported"))
            return enrolment
        raise PublishError(f"HPCNode {self.node!r} kept changing; gave up after {self.attempts} attempts")

    def _wait_for_challenge(self) -> tuple[dict[str, Any], bytes]:
        deadline = time.monotonic() + self.wait_s
        while True:
            node = self.store.get(self.node)
            nonce = _challenge_nonce(node)
            if nonce is not None:
                return node, nonce
            if time.monotonic() >= deadline:
                raise PublishError(f"HPCNode {self.node!r} has no enrolmentChallenge after {self.wait_s:g} s "
                                   "(is the operator running?)")
            time.sleep(self.poll_s)
