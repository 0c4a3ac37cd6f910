"""The relay's verifier directory drops Gateways that are no longer verifiers (issue 12 item 13, decision
0097): slashed or not Active on chain by their status, offline (status not refreshed within the maximum
age), or not active and staked in the gateway's own chain view. Each refusal has its passing control;
the Kubernetes list and the chain are our own callables, scripted; the clocks are frozen."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from trustcap.gateway.verifiers import KubeGatewayDirectory, gateway_refusal

A = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
B = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
NOW = datetime(2026, 12, 3, 12, 0, 0, tzinfo=UTC)


def _at(seconds_ago: float) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def gw(name: str, address: str, **status: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"metadata": {"name": name}, "spec": {"address": address}}
    if status:
        item["status"] = status
    return item


class Cluster:
    """The Gateway list the directory sees, changeable between refreshes; a monotonic and a wall clock."""

    def __init__(self, *items: dict[str, Any]) -> None:
        self.items = list(items)
        self.mono = 0.0

    def lister(self) -> list[dict[str, Any]]:
        return [dict(i) for i in self.items]

    def directory(self, **kw: Any) -> KubeGatewayDirectory:
        return KubeGatewayDirectory(lister=self.lister, ttl_s=30, retry_s=5, clock=lambda: self.mono,
                                    wall=NOW.timestamp, max_age_s=120, **kw)


def test_an_active_fresh_gateway_is_a_verifier() -> None:  # the positive control
    d = Cluster(gw("a", A, phase="Active", lastSeen=_at(10))).directory(require_active=True, require_seen=True)
    assert d.allowed(A) and d.dropped == {}


@pytest.mark.parametrize("phase", ["Offline", "Slashed", "Pending", "Registered"])
def test_a_gateway_not_active_on_chain_is_no_verifier(phase: str) -> None:
    d = Cluster(gw("a", A, phase=phase), gw("b", B, phase="Active")).directory()
    assert not d.allowed(A) and d.allowed(B)
    assert d.dropped == {"a": f"its status says {phase} on chain, not Active"}


def test_a_verifier_slashed_later_leaves_at_the_next_refresh() -> None:
    c = Cluster(gw("a", A, phase="Active"))
    d = c.directory()
    assert d.allowed(A)
    c.items = [gw("a", A, phase="Offline")]  # the operator saw isActive false (slashed or exited)
    c.mono += 31
    assert not d.allowed(A)


def test_an_offline_gateway_whose_status_is_not_refreshed_is_no_verifier() -> None:
    d = Cluster(gw("stale", A, phase="Active", lastSeen=_at(121)), gw("fresh", B, phase="Active", lastSeen=_at(119))
                ).directory()
    assert not d.allowed(A) and d.allowed(B)
    assert "offline" in d.dropped["stale"] and "121 s ago" in d.dropped["stale"]


def test_an_unparseable_last_seen_is_no_proof_of_life() -> None:
    d = Cluster(gw("a", A, phase="Active", lastSeen="yesterday")).directory()
    assert not d.allowed(A) and "lastSeen" in d.dropped["a"]


def test_status_less_gateways_count_only_where_no_chain_judges_anyone() -> None:
    cluster = Cluster(gw("a", A))
    assert cluster.directory().allowed(A)  # no chain in this cluster: the object is all there is (control)
    strict = cluster.directory(require_active=True)
    assert not strict.allowed(A) and "not judged Active" in strict.dropped["a"]


def test_require_seen_refuses_a_gateway_nobody_has_seen() -> None:
    cluster = Cluster(gw("a", A, phase="Active"))
    assert cluster.directory().allowed(A)  # control
    assert not cluster.directory(require_seen=True).allowed(A)


def test_the_chain_view_has_the_last_word() -> None:
    """A Gateway whose status still says Active (the operator is behind) but the chain calls inactive."""
    active = {A: True, B: False}
    d = Cluster(gw("a", A, phase="Active"), gw("b", B, phase="Active")).directory(chain_active=lambda a: active[a])
    assert d.allowed(A) and not d.allowed(B)
    assert "NodeRegistry does not call it active" in d.dropped["b"]


def test_a_failing_chain_view_keeps_the_last_good_set() -> None:
    answers: list[Any] = [True, ConnectionError("rpc down")]

    def chain(_address: str) -> bool:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return bool(answer)

    c = Cluster(gw("a", A, phase="Active"))
    d = c.directory(chain_active=chain)
    assert d.allowed(A)
    c.mono += 31
    assert d.allowed(A) and d.failures == 1  # not locked out by an RPC hiccup, retried after retry_s


def test_gateway_refusal_is_none_for_a_live_active_gateway() -> None:
    item = gw("a", A, phase="Active", lastSeen=_at(0))
    assert gateway_refusal(item, now=NOW.timestamp(), max_age_s=120, require_active=True, require_seen=True) is None
