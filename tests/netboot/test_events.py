"""Refusals become Warning events on the HPCNode, rate-limited per (file, reason), never blocking."""

from __future__ import annotations

from typing import Any

from trustcap.netboot.events import KubeEventReporter
from trustcap.netboot.store import Refusal


def _refusal(name: str = "initrd.img", reason: str = "digest-mismatch") -> Refusal:
    return Refusal(protocol="http", name=name, reason=reason, client="10.77.0.100:5000", detail="sha256 differs")


def test_event_names_node_reason_and_file() -> None:
    posted: list[tuple[str, dict[str, Any]]] = []
    rep = KubeEventReporter("hpc-1", create=lambda ns, body: posted.append((ns, body)))
    rep(_refusal())
    rep.flush()
    [(ns, body)] = posted
    assert ns == "default" and body["type"] == "Warning" and body["reason"] == "BootFileTampered"
    assert body["involvedObject"] == {"apiVersion": "trustcap.io/v1alpha1", "kind": "HPCNode", "name": "hpc-1"}
    assert "initrd.img" in body["message"] and "10.77.0.100" in body["message"]


def test_flood_is_rate_limited_per_file_and_reason() -> None:
    now = [0.0]
    posted: list[dict[str, Any]] = []
    rep = KubeEventReporter("hpc-1", create=lambda ns, body: posted.append(body), min_interval=60,
                            clock=lambda: now[0])
    for _ in range(100):
        rep(_refusal())
    rep(_refusal(reason="not-approved", name="x"))
    now[0] = 61.0
    rep(_refusal())
    rep.flush()
    assert [b["reason"] for b in posted] == ["BootFileTampered", "BootFileNotApproved", "BootFileTampered"]


def test_a_failing_api_is_logged_not_raised() -> None:
    def down(ns: str, body: dict[str, Any]) -> None:
        raise ConnectionError("API server unreachable")

    rep = KubeEventReporter("hpc-1", create=down)
    rep(_refusal())
    rep.flush()
    rep.close()
