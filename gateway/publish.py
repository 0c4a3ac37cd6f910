"""Publish a fresh enrolment into the HPC's `HPCNode` status, for the operator to verify.

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
      |                                 |   challenge moved (bounded tries)  |  quote, quoteDigest, time},
      |                                 |                                    |  phase Booting
The phase goes to Booting (never out of Quarantined: only a person clears a quarantine); Enrolled is the
operator's word alone. The gateway still works without Kubernetes: the publisher is an optional hook
(`AttestationServer.on_session`), wired by `python3 -m trustcap.gateway --kubeconfig`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

from trustcap.gateway.errors import GatewayError
from trustcap.gateway.server import AgentSession, AttestationServer

from trustcap.evidence import SignedQuote, encode_signed_quote, quote_digest
from trustcap.forms import hex_bytes, rfc3339, sha256_digest

__all__ = ["EnrolmentPublisher", "HPCNodeStore", "KubeHPCNodes", "PublishConflict", "PublishError",
           "enrolment_status"]

log = logging.getLogger("trustcap.gateway")
GROUP, VERSION, PLURAL = "trustcap.io", "v1alpha1", "hpcnodes"


class PublishError(GatewayError):  # type: ignore[misc]  # mypy sees trustcap.gateway.* as Any (package-dir)
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
        except OSError as exc:
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
        except OSError as exc:
            raise PublishError(f"cannot patch HPCNode {name!r} status: {exc}") from exc


status_time = rfc3339  # the CRDs' `date-time`; the gateway's other modules import it from here


def enrolment_status(signed: SignedQuote, gateway_address: str, now: float) -> dict[str, Any]:
    """`status.enrolment` for one countersigned quote (the CRD's shape; see crds/hpcnode.yaml)."""
    quote = signed.quote
    return {
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
    """After each new enrolment, quote the agent on the operator's challenge and publish the evidence."""

    def __init__(self, server: AttestationServer, node: str, store: HPCNodeStore, *,
                 wait_s: float = 60.0, poll_s: float = 1.0, attempts: int = 3,
                 wall: Callable[[], float] = time.time) -> None:
        self.server = server
        self.node = node
        self.store = store
        self.wait_s = wait_s
        self.poll_s = poll_s
        self.attempts = attempts
        self.wall = wall
        self.published: dict[str, dict[str, Any]] = {}  # agent key -> the enrolment it published
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._claimed: set[str] = set()  # keys published or being published; a failure frees its key

    def on_session(self, session: AgentSession) -> None:
        """The server's hook: publish once per enrolled agent key, off the accept loop's thread."""
        key = session.enrolment.agent_key
        with self._lock:
            if key in self._claimed:
                return  # a reconnect of an agent already published (or being published)
            self._claimed.add(key)
            t = threading.Thread(target=self._run, args=(key,), name=f"trustcap-publish-{key[:18]}", daemon=True)
            self._threads.append(t)
        t.start()

    def _run(self, key: str) -> None:
        try:
            self.publish(key)
        except (GatewayError, OSError) as exc:
            log.warning("enrolment of node %s not published: %s", self.node, exc)
            self.errors.append(str(exc))
            with self._lock:
                self._claimed.discard(key)  # the agent's next reconnect tries again

    def join(self, timeout: float) -> None:
        for t in list(self._threads):
            t.join(timeout)

    def publish(self, agent_key: str) -> dict[str, Any]:
        """Blocking: wait (bounded) for the challenge, quote, patch with optimistic concurrency."""
        for _ in range(self.attempts):
            node, nonce = self._wait_for_challenge()
            signed = self.server.challenge(nonce)
            if signed.quote.agent_key != agent_key:
                raise PublishError("the connected agent is not the one that enrolled; not publishing")
            enrolment = enrolment_status(signed, self.server.root.address, self.wall())
            status: dict[str, Any] = {"enrolment": enrolment}
            if (node.get("status") or {}).get("phase") != "Quarantined":
                status["phase"] = "Booting"
            body = {"metadata": {"resourceVersion": node["metadata"]["resourceVersion"]}, "status": status}
            try:
                self.store.patch_status(self.node, body)
            except PublishConflict:
                log.info("HPCNode %s changed while publishing; reading it again", self.node)
                continue
            with self._lock:
                self.published[agent_key] = enrolment
            log.info("published enrolment of node %s (agent key %s, boot %s)", self.node, agent_key[:12],
                     enrolment["bootImageDigest"])
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
