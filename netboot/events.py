"""Refusals as Kubernetes Warning events, so `kubectl describe hpcnode NAME` shows a tampered boot file.

A hook for `ApprovedStore.on_refused`. Events go on the HPC's `HPCNode` (cluster-scoped, so the event
lives in the `default` namespace, as Kubernetes does for cluster-scoped objects). A flood of refusals
(a prober on the link) makes at most one event per (file, reason) per `min_interval` seconds; the
Prometheus counter still counts every one. Posting never blocks the boot server: it runs on a worker
thread and a failure is logged, not raised.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from trustcap.forms import rfc3339
from trustcap.kubeclient import local_api_client
from trustcap.netboot.store import Refusal

__all__ = ["REASONS", "KubeEventReporter"]

log = logging.getLogger("trustcap.netboot")

# Event reasons (CamelCase, as Kubernetes reasons are), one per refusal kind.
REASONS = {
    "digest-mismatch": "BootFileTampered",
    "not-approved": "BootFileNotApproved",
    "path": "BootPathRejected",
    "approval-unavailable": "BootApprovalUnavailable",
    "missing": "BootFileMissing",
}

CreateEvent = Callable[[str, dict[str, Any]], None]


def _kubernetes_creator(kubeconfig: str | None) -> CreateEvent:
    from kubernetes import client

    api = client.CoreV1Api(local_api_client(kubeconfig))

    def create(namespace: str, body: dict[str, Any]) -> None:
        api.create_namespaced_event(namespace, body, _request_timeout=10)  # type: ignore[arg-type]  # dict bodies are accepted

    return create


class KubeEventReporter:
    def __init__(self, node: str, *, kubeconfig: str | None = None, create: CreateEvent | None = None,
                 min_interval: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.node = node
        self._create = create or _kubernetes_creator(kubeconfig)
        self.min_interval = min_interval
        self.clock = clock
        self._last: dict[tuple[str, str], float] = {}
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=256)
        self._worker = threading.Thread(target=self._run, name="trustcap-netboot-events", daemon=True)
        self._worker.start()

    def __call__(self, refusal: Refusal) -> None:
        key = (refusal.name, refusal.reason)
        now = self.clock()
        if now - self._last.get(key, -1e18) < self.min_interval:
            return
        self._last[key] = now
        stamp = rfc3339(time.time())
        body = {
            "apiVersion": "v1", "kind": "Event", "type": "Warning",
            "metadata": {"generateName": f"{self.node}.netboot.", "namespace": "default"},
            "involvedObject": {"apiVersion": "trustcap.io/v1alpha1", "kind": "HPCNode", "name": self.node},
            "reason": REASONS.get(refusal.reason, "BootFileRefused"),
            "message": f"{refusal.protocol} request for {refusal.name!r} from {refusal.client} refused: "
                       f"{refusal.detail}"[:1024],
            "source": {"component": "trustcap-netboot"},
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        }
        try:
            self._queue.put_nowait(body)
        except queue.Full:
            log.warning("event queue full; dropping event for %s", refusal.name)

    def _run(self) -> None:
        while True:
            body = self._queue.get()
            if body is None:
                return
            try:
                self._create("default", body)
            except Exception as exc:  # reporting must never take the boot server down
                log.warning("cannot post refusal event for HPCNode %s: %s", self.node, exc)
            finally:
                self._queue.task_done()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until queued events are posted (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
