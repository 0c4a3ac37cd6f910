"""The egress guard: during a run the HPC link may reach only the capsule's declared endpoints.

Seed: "Any unexpected trial to connect outside internet will be log and banned by RPI." The gateway owns
the HPC's only link, so it is the place to enforce and to witness. Per run, one nftables table:

    table inet trustcap_eg_<tag>
      counters  allowed, denied, denied_gateway          (read back into the run report)
      set declared    ipv4_addr . inet_proto . inet_service   (the capsule's endpoints, TCP)
      set attempts    ipv4_addr . inet_proto . inet_service   (dynamic, per-element counter: who was tried)
      chain forward (hook forward, before Docker's):   HPC -> declared: accept; HPC -> anything else:
                     add to @attempts, log "trustcap-egress-deny", count, drop
      chain input   (hook input):   per run only, HPC -> a declared endpoint on this host: accept;
                     on the Pi (LinkServices), the agent channel and netboot, and never a declared endpoint;
                     anything else: add @attempts, log, count, drop
      chain postrouting (nat):      masquerade the HPC link so replies route back

    Executor                LinkAttacher (gateway side)            nft / ip
      | attach(run, pid) --> | veth pair; far end into the run's netns  |
      |                      | addresses 169.254.x/30, default route    |
      |                      | EgressGuard.apply() --------------------> | nft -f - (table above)
      | violations() ------> | EgressGuard.read() ---------------------> | nft -j list table
      | detach() ----------> | read, delete table, delete veth           |

Traffic never leaves the machine in tests: the gateway side is a network namespace the test made.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import logging
import os
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from trustcap.gateway.errors import EgressError
from trustcap.violations import Violation

__all__ = ["EgressGuard", "LinkAttacher", "LinkServices", "LocalGatewayAttacher", "check_endpoints", "deny_networks"]

log = logging.getLogger("trustcap.gateway")
_PROTO = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}


class _EndpointLike(Protocol):
    """A declared endpoint, read-only (the agent's frozen `Endpoint` is one; the gateway never imports it)."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...


def _run(cmd: Sequence[str], what: str, *, stdin: str | None = None, netns: str | None = None) -> str:
    full = ["ip", "netns", "exec", netns, *cmd] if netns else list(cmd)
    try:
        proc = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EgressError(f"{what}: {full[0]} could not run: {exc}") from exc
    if proc.returncode != 0:
        raise EgressError(f"{what}: `{' '.join(full)}` failed (exit {proc.returncode}): {proc.stderr.strip()[:400]}")
    return proc.stdout


@dataclass(frozen=True)
class LinkServices:
    """What the Pi itself serves on its HPC link, and so what the link guard lets in besides declared
    endpoints: the agent channel, and netboot (DHCP, TFTP, the HTTP boot files) while the HPC boots; and
    the networks (`deny`) that no declared endpoint may be in."""

    gateway_addr: str
    agent_port: int
    tftp_port: int | None = 69
    http_port: int | None = None
    dhcp: bool = True
    # IPv4 networks the HPC never reaches, whatever a manifest declares: the cluster's own (its pod,
    # service and node networks), which beyond the Pi no address check can tell from the internet.
    deny: tuple[str, ...] = ()


class EgressGuard:
    """One nftables table that confines one HPC link and records every other try.

    Two uses, one ruleset. Per run (`LinkAttacher`, `trustcap exec --egress`): the table lives for the run
    and `declared` holds its endpoints. On the Pi (`services` given, `python3 -m trustcap.gateway
    --hpc-link`): the table lives as long as the gateway, lets in only the agent channel and netboot, and
    `allow()` swaps in a run's declared endpoints (from the attested manifest) and `clear()` takes them out.
    """

    def __init__(self, hpc_iface: str, endpoints: Sequence[_EndpointLike], *, netns: str | None = None,
                 tag: str | None = None, hpc_addr: str | None = None,
                 services: LinkServices | None = None) -> None:
        if not hpc_iface or len(hpc_iface) > 15:
            raise EgressError(f"egress guard: interface name {hpc_iface!r} must be 1..15 characters")
        self.iface = hpc_iface
        self.netns = netns
        self.table = f"trustcap_{'link' if services else 'eg'}_{tag or hpc_iface}".replace("-", "_")
        self.hpc_addr = hpc_addr
        self.services = services
        if services is not None:
            if ipaddress.ip_address(services.gateway_addr).version != 4:
                raise EgressError(f"link guard: gateway address {services.gateway_addr!r} must be IPv4")
            for name in ("agent_port", "tftp_port", "http_port"):
                port = getattr(services, name)
                if port is not None and not 0 < port < 65536:
                    raise EgressError(f"link guard: {name} {port} is not a port (1..65535)")
        self.deny = deny_networks(services.deny if services else ())
        self.v4 = self._check(endpoints)

    def _check(self, endpoints: Sequence[_EndpointLike]) -> list[tuple[str, int]]:
        return check_endpoints(endpoints, self.services.gateway_addr if self.services else None, deny=self.deny)

    def _service_rules(self) -> str:
        """The Pi's own services, accepted on input before anything is recorded as an attempt."""
        svc = self.services
        if svc is None:
            return ""
        i, gw = json.dumps(self.iface), svc.gateway_addr
        rules = [f"iifname {i} ip daddr {gw} tcp dport {svc.agent_port} counter name channel accept"]
        if svc.dhcp:  # a booting HPC has no address yet: DISCOVER goes from 0.0.0.0 to the broadcast address
            rules.append(f"iifname {i} ip daddr {{ {gw}, 255.255.255.255 }} udp sport 68 udp dport 67 "
                         "counter name netboot accept")
        if svc.tftp_port:  # the transfer itself runs from the server's ephemeral port: established
            rules.append(f"iifname {i} ip daddr {gw} udp dport {svc.tftp_port} counter name netboot accept")
        if svc.http_port:
            rules.append(f"iifname {i} ip daddr {gw} tcp dport {svc.http_port} counter name netboot accept")
        return "".join(f"        {r}\n" for r in rules)

    def _declared_on_host(self) -> str:
        """Per run (`trustcap exec --egress` on a workstation), a declared endpoint may be a service of this
        host, and the input chain admits it. On the Pi it never does: a manifest's egress is the capsule
        author's word, and it must not open the Pi's own services (on any of its addresses) to the HPC; a
        declared endpoint is only ever forwarded beyond the Pi, and never into the `deny` networks (the
        cluster's pods, services and nodes), which the gateway is told since no address check can tell
        them from the internet."""
        if self.services is not None:
            return ""
        return f"        iifname {json.dumps(self.iface)} ip daddr . meta l4proto . th dport @declared counter name " \
               "allowed accept\n"

    def ruleset(self) -> str:
        """The nft script for this link (deterministic, so it can be measured and compared)."""
        i = json.dumps(self.iface)
        elems = ", ".join(f"{a} . tcp . {p}" for a, p in sorted(set(self.v4)))
        declared = f"elements = {{ {elems} }}" if elems else ""
        masq = f"        ip saddr {self.hpc_addr} masquerade\n" if self.hpc_addr else ""
        service_counters = "    counter channel { }\n    counter netboot { }\n" if self.services else ""
        # On the Pi, only flows to its link address (the channel, the TFTP transfer) are established ones
        # it admitted; per run, the workstation's declared services may be anywhere on the host.
        established_to = f"ip daddr {self.services.gateway_addr} " if self.services else ""
        record = (f"        iifname {i} meta l4proto {{ tcp, udp }} add @attempts "
                  "{ ip daddr . meta l4proto . th dport }")
        # the cluster's networks: dropped before the declared set is even looked at, so an opening that
        # names one (no check lets it in; this is the kernel's own refusal) still carries nothing
        nets = ", ".join(str(n) for n in self.deny)
        deny_set = (f"    set deny {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {nets} }} }}\n"
                    if nets else "")
        deny_rules = (f"        iifname {i} ip daddr @deny meta l4proto {{ tcp, udp }} add @attempts "
                      "{ ip daddr . meta l4proto . th dport }\n"
                      f"        iifname {i} ip daddr @deny log prefix \"trustcap-egress-deny \" level warn "
                      "counter name denied drop\n") if nets else ""
        return f"""table inet {self.table} {{
    counter allowed {{ }}
    counter denied {{ }}
    counter denied_gateway {{ }}
{service_counters}    set declared {{ type ipv4_addr . inet_proto . inet_service; flags timeout; {declared} }}
{deny_set}    set attempts {{ type ipv4_addr . inet_proto . inet_service; flags dynamic; size 4096; counter; }}
    chain forward {{
        type filter hook forward priority filter - 10; policy accept;
{deny_rules}        iifname {i} ip daddr . meta l4proto . th dport @declared counter name allowed accept
        oifname {i} ct state established,related accept
        iifname {i} meta l4proto {{ tcp, udp }} add @attempts {{ ip daddr . meta l4proto . th dport }}
        iifname {i} log prefix "trustcap-egress-deny " level warn counter name denied drop
        oifname {i} counter name denied drop
    }}
    chain input {{
        type filter hook input priority filter - 10; policy accept;
        iifname {i} {established_to}ct state established,related accept
{self._service_rules()}{self._declared_on_host()}{record}
        iifname {i} log prefix "trustcap-gateway-deny " level warn counter name denied_gateway drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
{masq}    }}
}}
"""

    def apply(self) -> None:
        """Install the table, replacing an earlier one of the same name in the same transaction, so the
        link is never unguarded between the two (a restarted gateway re-applies over its old table)."""
        script = f"table inet {self.table}\ndelete table inet {self.table}\n{self.ruleset()}"
        _run(["nft", "-f", "-"], f"installing egress table {self.table}", stdin=script, netns=self.netns)
        log.info("egress guard %s: %d declared endpoint(s) on %s", self.table, len(self.v4), self.iface)

    def allow(self, endpoints: Sequence[_EndpointLike], ttl_s: int | None = None) -> None:
        """A run's declared endpoints replace the previous run's, and its attempts start from zero: one
        transaction, so no packet sees an empty or a mixed set. With `ttl_s` the kernel itself drops them
        after that many seconds (the run's timeout and margin), so a run's endpoints close even when no
        gateway is left to call clear(): the table outlives the gateway, its openings do not."""
        v4 = self._check(endpoints)
        if ttl_s is not None and not 0 < ttl_s < 2**31 // 1000:
            raise EgressError(f"link guard: a declared endpoint's timeout of {ttl_s} s is out of range")
        ttl = f" timeout {ttl_s}s" if ttl_s is not None else ""
        elems = ", ".join(f"{a} . tcp . {p}{ttl}" for a, p in sorted(set(v4)))
        script = f"flush set inet {self.table} declared\nflush set inet {self.table} attempts\n"
        if elems:
            script += f"add element inet {self.table} declared {{ {elems} }}\n"
        _run(["nft", "-f", "-"], f"declaring a run's endpoints in {self.table}", stdin=script, netns=self.netns)
        self.v4 = v4

    def clear(self) -> None:
        """After a run: nothing but the Pi's own services is reachable again."""
        self.allow([])

    def read(self) -> dict[str, Any]:
        """Counters and attempted destinations, read back from the kernel (not from our own bookkeeping)."""
        out = _run(["nft", "-j", "list", "table", "inet", self.table], f"reading egress table {self.table}",
                   netns=self.netns)
        counters: dict[str, dict[str, int]] = {}
        attempts: list[dict[str, Any]] = []
        for item in json.loads(out).get("nftables", []):
            if "counter" in item:
                c = item["counter"]
                counters[c["name"]] = {"packets": int(c.get("packets", 0)), "bytes": int(c.get("bytes", 0))}
            elif "set" in item and item["set"]["name"] == "attempts":
                for el in item["set"].get("elem", []):
                    attempts.append(_attempt(el))
        return {"table": self.table, "declared": [f"{a}:{p}" for a, p in self.v4], "counters": counters,
                "attempts": attempts}

    def dropped(self) -> int:
        """Packets from or to the HPC that the guard dropped since it was installed."""
        counters = self.read()["counters"]
        return sum(counters.get(name, {}).get("packets", 0) for name in ("denied", "denied_gateway"))

    def violations(self) -> list[Violation]:
        report = self.read()
        out = [Violation("egress", f"{a['proto']} {a['host']}:{a['port']}", "nftables", a["packets"] or 1)
               for a in report["attempts"]]
        seen = sum(a["packets"] for a in report["attempts"])
        other = report["counters"].get("denied", {}).get("packets", 0) + \
            report["counters"].get("denied_gateway", {}).get("packets", 0) - seen
        if other > 0:
            out.append(Violation("egress", "non-TCP/UDP packets (e.g. ICMP) from the HPC link", "nftables",
                                     other))
        return out

    def remove(self) -> None:
        _run(["nft", "delete", "table", "inet", self.table], f"removing egress table {self.table}", netns=self.netns)


def _special(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """Why an address can never be a capsule's declared endpoint, or "" when it can."""
    for what, hit in (("a loopback", addr.is_loopback), ("a link-local", addr.is_link_local),
                      ("a multicast", addr.is_multicast), ("the unspecified", addr.is_unspecified),
                      ("a reserved or broadcast", addr.is_reserved)):
        if hit:
            return what
    return ""


def deny_networks(cidrs: Sequence[str]) -> tuple[ipaddress.IPv4Network, ...]:
    """The deny list as IPv4 networks, or EgressError naming the first entry that is not one."""
    out = []
    for text in cidrs:
        try:
            net = ipaddress.ip_network(str(text).strip(), strict=True)
        except ValueError as exc:
            raise EgressError(f"link guard: deny network {text!r} is not a network in CIDR form ({exc})") from None
        if not isinstance(net, ipaddress.IPv4Network):
            raise EgressError(f"link guard: deny network {text!r}: the HPC link carries IPv4 only (IPv6 is "
                              "dropped whole)")
        out.append(net)
    return tuple(out)


def check_endpoints(endpoints: Sequence[_EndpointLike], gateway_addr: str | None = None, *,
                    deny: Sequence[ipaddress.IPv4Network] = ()) -> list[tuple[str, int]]:
    """The endpoints as (IPv4 address, port), or EgressError naming the first that no guard will open: an
    IPv6 address (the HPC link carries IPv4 only; IPv6 is dropped and counted), a port outside 1..65535,
    a loopback, link-local, multicast, unspecified, reserved or broadcast address (none is a destination
    beyond the Pi; link-local is the HPC link itself), the Pi's own address on the link, or an address in
    one of the `deny` networks (the cluster's own)."""
    v4: list[tuple[str, int]] = []
    for e in endpoints:
        try:
            addr = ipaddress.ip_address(e.host)
        except ValueError:
            raise EgressError(f"egress guard: endpoint {e.host}:{e.port}: the host must be an IP address") from None
        if addr.version != 4:
            raise EgressError(f"egress guard: endpoint {e.host}:{e.port}: only IPv4 endpoints are supported "
                              "on the HPC link (IPv6 is dropped and counted)")
        special = _special(addr)
        if special:
            raise EgressError(f"egress guard: endpoint {e.host}:{e.port} is {special} address: a capsule's "
                              "egress names a destination beyond the gateway")
        if gateway_addr is not None and addr == ipaddress.ip_address(gateway_addr):
            raise EgressError(f"egress guard: endpoint {e.host}:{e.port} is the gateway's own address on the HPC "
                              "link: a capsule's egress never opens the gateway's services")
        denied = next((n for n in deny if addr in n), None)
        if denied is not None:
            raise EgressError(f"egress guard: endpoint {e.host}:{e.port} is in {denied}, a network the HPC never "
                              "reaches (the gateway's --deny-network: the cluster's own machines)")
        if not 0 < int(e.port) < 65536:
            raise EgressError(f"egress guard: endpoint {e.host}:{e.port}: the port must be 1..65535")
        v4.append((str(addr), int(e.port)))
    return v4


def _attempt(el: Any) -> dict[str, Any]:
    """One element of the attempts set: {"elem": {"val": {"concat": [addr, proto, port]}, "counter": ...}}."""
    packets = 0
    val = el
    if isinstance(el, dict) and "elem" in el:
        val = el["elem"].get("val")
        packets = int(el["elem"].get("counter", {}).get("packets", 0))
    parts = val["concat"] if isinstance(val, dict) else [val, "?", "?"]
    proto = parts[1]
    proto = _PROTO.get(proto, str(proto)) if isinstance(proto, int) else str(proto)
    return {"host": str(parts[0]), "proto": proto, "port": parts[2], "packets": packets}


_link_ids = itertools.count(1)
_link_lock = threading.Lock()


class LinkAttacher:
    """Links a run's network namespace to the gateway (a named netns, or this host) and guards the link.

    Implements the executor's NetworkAttacher protocol by shape; the gateway never imports the agent.
    """

    def __init__(self, gateway_netns: str | None = None) -> None:
        self.gateway_netns = gateway_netns
        self.guard: EgressGuard | None = None
        self.gw_if = ""
        self.gw_addr = ""
        self.hpc_addr = ""

    def attach(self, run_id: str, pid: int, egress: Sequence[_EndpointLike]) -> None:
        with _link_lock:
            n = (os.getpid() * 7 + next(_link_ids)) % 16000
        tag = run_id[:8]
        self.gw_if, hpc_if = f"tcg{tag}", f"tch{tag}"
        base = int(ipaddress.IPv4Address("169.254.0.0")) + 4 * (n + 64)  # 169.254.1.0 .. : one /30 per link
        self.gw_addr, self.hpc_addr = str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2))
        _run(["ip", "link", "add", self.gw_if, "type", "veth", "peer", "name", hpc_if], "creating the HPC veth")
        try:
            _run(["ip", "link", "set", hpc_if, "netns", str(pid), "name", "eth0"], "moving the veth into the run")
            if self.gateway_netns:
                _run(["ip", "link", "set", self.gw_if, "netns", self.gateway_netns], "moving the veth to the gateway")
            ns = self.gateway_netns
            _run(["ip", "addr", "add", f"{self.gw_addr}/30", "dev", self.gw_if], "addressing the gateway side",
                 netns=ns)
            _run(["ip", "link", "set", self.gw_if, "up"], "raising the gateway side", netns=ns)
            fwd = _run(["sysctl", "-n", "net.ipv4.ip_forward"], "reading ip_forward", netns=ns).strip()
            if fwd != "1":
                if not ns:
                    raise EgressError("net.ipv4.ip_forward is 0 on this host: declared egress cannot be routed "
                                      "(enable it, or run without --egress)")
                _run(["sysctl", "-qw", "net.ipv4.ip_forward=1"], "enabling forwarding in the gateway", netns=ns)
            enter = ["nsenter", "-t", str(pid), "-n"]
            _run([*enter, "ip", "addr", "add", f"{self.hpc_addr}/30", "dev", "eth0"], "addressing the run side")
            _run([*enter, "ip", "link", "set", "lo", "up"], "raising the run's loopback")
            _run([*enter, "ip", "link", "set", "eth0", "up"], "raising the run side")
            _run([*enter, "ip", "route", "add", "default", "via", self.gw_addr], "routing the run via the gateway")
            self.guard = EgressGuard(self.gw_if, egress, netns=ns, tag=tag, hpc_addr=self.hpc_addr)
            self.guard.apply()
        except Exception:
            self._delete_link()
            raise

    def violations(self) -> list[Violation]:
        return self.guard.violations() if self.guard else []

    def detach(self) -> dict[str, Any]:
        report: dict[str, Any] = {}
        try:
            if self.guard:
                report = self.guard.read()
                report["gateway_addr"], report["hpc_addr"] = self.gw_addr, self.hpc_addr
                self.guard.remove()
        finally:
            self.guard = None
            self._delete_link()
        return report

    def _delete_link(self) -> None:
        if self.gw_if:
            # Deleting one end deletes the pair; the run's end may already be gone with its namespace.
            cmd = ["ip", "link", "del", self.gw_if]
            if self.gateway_netns:
                cmd = ["ip", "netns", "exec", self.gateway_netns, *cmd]
            subprocess.run(cmd, capture_output=True, timeout=30, check=False)


class LocalGatewayAttacher(LinkAttacher):
    """`trustcap exec --egress` on a workstation: this host plays the gateway for the run's link."""

    def __init__(self) -> None:
        super().__init__(gateway_netns=None)
