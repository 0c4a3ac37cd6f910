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


def test_the_link_guard_admits_the_agent_channel_and_netboot_before_recording_attempts() -> None:
    from trustcap.gateway.egress import LinkServices
    g = EgressGuard("tcg1", [], tag="tcg1",
                    services=LinkServices(gateway_addr="169.254.9.1", agent_port=7000, tftp_port=69, http_port=8081))
    rs = g.ruleset()
    assert g.table == "trustcap_link_tcg1"
    inp = rs[rs.index("chain input"):rs.index("chain postrouting")]
    accepts = ['ip daddr 169.254.9.1 tcp dport 7000 counter name channel accept',
               'udp sport 68 udp dport 67 counter name netboot accept',
               'ip daddr 169.254.9.1 udp dport 69 counter name netboot accept',
               'ip daddr 169.254.9.1 tcp dport 8081 counter name netboot accept']
    for rule in accepts:
        assert inp.index(rule) < inp.index("add @attempts"), rule
    assert inp.index("add @attempts") < inp.index("counter name denied_gateway drop")
    assert "counter channel { }" in rs and "counter netboot { }" in rs
    assert "counter name channel" not in EgressGuard("tcg1", []).ruleset()  # the per-run table serves nothing


@pytest.mark.parametrize(("kwargs", "why"), [
    pytest.param({"gateway_addr": "fe80::1", "agent_port": 7000}, "must be IPv4", id="ipv6-gateway"),
    pytest.param({"gateway_addr": "169.254.9.1", "agent_port": 0}, "agent_port 0 is not a port", id="port-0"),
    pytest.param({"gateway_addr": "169.254.9.1", "agent_port": 7000, "tftp_port": 70000}, "tftp_port",
                 id="tftp-port"),
])
def test_bad_link_services(kwargs: dict[str, object], why: str) -> None:
    from trustcap.gateway.egress import LinkServices
    with pytest.raises(EgressError, match=why):
        EgressGuard("tcg1", [], services=LinkServices(**kwargs))  # type: ignore[arg-type]


def test_an_endpoint_port_out_of_range_is_refused() -> None:
    with pytest.raises(EgressError, match=r"must be 1\.\.65535"):
        EgressGuard("tcg1", [E("198.18.1.1", 0)])


def test_on_the_pi_a_declared_endpoint_is_only_ever_forwarded_never_let_in() -> None:
    """The Pi's input chain has no @declared rule, so a manifest naming one of the Pi's own addresses
    reaches nothing on the Pi (e2e/node/test_link_guard.py proves it in the kernel); the per-run table of
    `trustcap exec --egress` keeps it, for an endpoint that is a service of the workstation itself."""
    from trustcap.gateway.egress import LinkServices
    declared = "ip daddr . meta l4proto . th dport @declared counter name allowed accept"
    pi = EgressGuard("tcg1", [], services=LinkServices(gateway_addr="10.0.0.1", agent_port=7000)).ruleset()
    fwd, inp = pi[pi.index("chain forward"):pi.index("chain input")], pi[pi.index("chain input"):]
    assert declared in fwd and declared not in inp
    run = EgressGuard("tcg1", []).ruleset()
    assert declared in run[run.index("chain input"):]


@pytest.mark.parametrize(("host", "why"), [
    pytest.param("127.0.0.1", "loopback", id="loopback"),
    pytest.param("169.254.9.1", "link-local", id="link-local"),
    pytest.param("224.0.0.251", "multicast", id="multicast"),
    pytest.param("0.0.0.0", "unspecified", id="unspecified"),  # noqa: S104 (an address refused, not bound)
    pytest.param("255.255.255.255", "broadcast", id="broadcast"),
    pytest.param("240.0.0.1", "reserved", id="reserved"),
    pytest.param("10.0.0.1", "gateway's own address", id="the-pi-itself"),
])
def test_an_address_that_is_no_destination_beyond_the_pi_is_refused(host: str, why: str) -> None:
    from trustcap.gateway.egress import LinkServices, check_endpoints
    with pytest.raises(EgressError, match=why):
        check_endpoints([E(host, 80)], "10.0.0.1")
    guard = EgressGuard("tcg1", [], services=LinkServices(gateway_addr="10.0.0.1", agent_port=7000))
    with pytest.raises(EgressError, match=why):
        guard.allow([E(host, 80)])  # refused before nft is run: nothing half-applied
    assert check_endpoints([E("10.0.0.2", 80), E("198.18.1.1", 443)], "10.0.0.1") == [("10.0.0.2", 80),
                                                                                       ("198.18.1.1", 443)]


def test_the_clusters_networks_are_refused_as_endpoints_and_dropped_in_the_kernel() -> None:
    """Beyond the Pi no address check tells a cluster machine from the internet, so the gateway is told
    the cluster's networks: an endpoint in one is refused before nft runs, and the forward chain drops
    them ahead of the declared set (e2e/node/test_link_guard.py shows the drop in the kernel)."""
    from trustcap.gateway.egress import LinkServices, check_endpoints, deny_networks
    services = LinkServices(gateway_addr="10.77.0.1", agent_port=7000, deny=("10.42.0.0/16", "10.43.0.0/16"))
    guard = EgressGuard("tcg1", [], services=services)
    with pytest.raises(EgressError, match=r"10\.42\.7\.9:443 is in 10\.42\.0\.0/16.*--deny-network"):
        guard.allow([E("198.18.1.1", 443), E("10.42.7.9", 443)])
    assert guard.v4 == []  # nothing of the refused run was taken
    # positive control: the same check passes what lies outside the networks
    assert check_endpoints([E("198.18.1.1", 443), E("10.44.0.1", 443)], "10.77.0.1", deny=guard.deny) == [
        ("198.18.1.1", 443), ("10.44.0.1", 443)]
    rs = guard.ruleset()
    fwd = rs[rs.index("chain forward"):rs.index("chain input")]
    assert "set deny { type ipv4_addr; flags interval; auto-merge; elements = { 10.42.0.0/16, 10.43.0.0/16 } }" in rs
    assert fwd.index("ip daddr @deny log") < fwd.index("@declared counter name allowed accept")
    assert "@deny" not in EgressGuard("tcg1", [], services=LinkServices(gateway_addr="10.77.0.1",
                                                                         agent_port=7000)).ruleset()
    assert check_endpoints([E("10.42.7.9", 443)], "10.77.0.1") == [("10.42.7.9", 443)]  # no list, no refusal
    assert deny_networks(["192.168.0.0/16"])[0].num_addresses == 65536


@pytest.mark.parametrize(("cidr", "why"), [
    pytest.param("10.42.0.1/16", "host bits set", id="host-bits"),
    pytest.param("cluster", "not a network in CIDR form", id="a-name"),
    pytest.param("fd00::/8", "IPv4 only", id="ipv6"),
])
def test_a_bad_deny_network_names_itself(cidr: str, why: str) -> None:
    from trustcap.gateway.egress import LinkServices
    with pytest.raises(EgressError, match=why):
        EgressGuard("tcg1", [], services=LinkServices(gateway_addr="10.77.0.1", agent_port=7000, deny=(cidr,)))
