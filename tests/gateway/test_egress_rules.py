"""The egress ruleset as text (the kernel side is proven in e2e/node/test_hostile.py)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from trustcap.gateway.egress import EgressGuard, _attempt
from trustcap.gateway.errors import EgressError


@dataclass
class E:
    host: str
    port: int


def test_ruleset_allows_only_declared_and_records_the_rest() -> None:
    g = EgressGuard("tcgabc", [E("198.18.1.1", 8080), E("198.18.1.1", 8080)], tag="abc", hpc_addr="169.254.1.2")
    rs = g.ruleset()
    assert "elements = { 198.18.1.1 . tcp . 8080 }" in rs  # deduplicated
    assert 'iifname "tcgabc" ip daddr . meta l4proto . th dport @declared counter name allowed accept' in rs
    assert 'log prefix "trustcap-egress-deny "' in rs and "counter name denied drop" in rs
    assert "counter name denied_gateway drop" in rs and "ip saddr 169.254.1.2 masquerade" in rs
    assert g.ruleset() == rs  # deterministic: measurable


def test_no_endpoints_means_an_empty_allow_set() -> None:
    assert "elements" not in EgressGuard("tcgx", []).ruleset()


@pytest.mark.parametrize(("iface", "eps", "why"), [
    pytest.param("", [], "interface name", id="no-iface"),
    pytest.param("x" * 16, [], "interface name", id="long-iface"),
    pytest.param("tcg1", [E("2001:db8::1", 80)], "only IPv4", id="ipv6"),
])
def test_bad_guard_input(iface: str, eps: list[E], why: str) -> None:
    with pytest.raises(EgressError, match=why):
        EgressGuard(iface, eps)


def test_attempt_elements_parse() -> None:
    el = {"elem": {"val": {"concat": ["198.18.1.2", "tcp", 9090]}, "counter": {"packets": 3, "bytes": 180}}}
    assert _attempt(el) == {"host": "198.18.1.2", "proto": "tcp", "port": 9090, "packets": 3}
    assert _attempt({"concat": ["198.18.1.53", 17, 53]})["proto"] == "udp"
