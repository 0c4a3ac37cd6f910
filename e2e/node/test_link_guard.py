"""The Pi's guard on its HPC link, in real namespaces with real nftables (issue 12 item 18).

    hpc ns  --veth--  pi ns (the gateway: agent channel, TFTP, another service)  --veth--  beyond ns
    169.254.9.2       169.254.9.1 | 198.18.9.1                                             198.18.9.2
                                                                      (a declared and an undeclared port)

Each attack has its positive control: the same connection succeeds before the guard is installed, so a
refusal below is the guard's doing and not a broken lab. No packet leaves the namespaces made here.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from netlab import in_netns, need_root, run

from trustcap.gateway.egress import EgressGuard, LinkServices

PI_HPC, HPC = "169.254.9.1", "169.254.9.2"
PI_OUT, BEYOND = "198.18.9.1", "198.18.9.2"
AGENT, OTHER, TFTP = 7000, 7022, 6969
DECLARED, UNDECLARED, ECHO = 8080, 9090, 8081
PI_OWN = 7443  # a service on the Pi's other address (its cluster side), which a manifest may try to name


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int


@dataclass
class Lab:
    pi: str
    hpc: str
    beyond: str
    link: str  # the Pi's end of the HPC link


def _serve(ns: str, addr: str, port: int, stop: threading.Event, handle: Callable[[socket.socket], None]) -> None:
    """A TCP listener in `ns` that hands each connection to `handle` until `stop` is set."""
    with in_netns(ns):
        srv = socket.create_server((addr, port))
    srv.settimeout(0.2)

    def serve() -> None:
        with srv:
            while not stop.is_set():
                try:
                    conn, _ = srv.accept()
                except TimeoutError:
                    continue
                handle(conn)

    threading.Thread(target=serve, daemon=True).start()


def _hello(conn: socket.socket) -> None:
    with conn:
        conn.sendall(b"hello")


def _echo(conn: socket.socket) -> None:
    """Echo on its own thread, so a kept connection does not hold the listener."""
    def echo() -> None:
        with conn:
            conn.settimeout(5)
            try:
                while data := conn.recv(64):
                    conn.sendall(data)
            except OSError:
                pass

    threading.Thread(target=echo, daemon=True).start()


def _tcp_server(ns: str, addr: str, port: int, stop: threading.Event) -> None:
    _serve(ns, addr, port, stop, _hello)


def _echo_server(ns: str, addr: str, port: int, stop: threading.Event) -> None:
    _serve(ns, addr, port, stop, _echo)


def _tftp_like_server(ns: str, addr: str, port: int, stop: threading.Event) -> None:
    """Answers each request from a fresh ephemeral port and waits for the ACK there, as TFTP does: the
    transfer is not on the port the guard opened, so it passes only as an established flow."""
    with in_netns(ns):
        srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        srv.bind((addr, port))
    srv.settimeout(0.2)

    def serve() -> None:
        with srv:
            while not stop.is_set():
                try:
                    _req, peer = srv.recvfrom(512)
                except TimeoutError:
                    continue
                with in_netns(ns):
                    data = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                data.bind((addr, 0))
                data.settimeout(2)
                with data:
                    data.sendto(b"DATA1", peer)
                    try:
                        ack, _ = data.recvfrom(512)
                    except TimeoutError:
                        continue
                    if ack == b"ACK1":
                        data.sendto(b"DONE", peer)

    threading.Thread(target=serve, daemon=True).start()


def _tcp_reaches(ns: str, addr: str, port: int) -> bool:
    with in_netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(1.0)
    with s:
        try:
            s.connect((addr, port))
            return s.recv(5) == b"hello"
        except OSError:  # dropped (timeout) or refused: either way, not reached
            return False


def _tftp_transfer(ns: str, addr: str, port: int) -> bool:
    with in_netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.5)
    with s:
        try:
            s.sendto(b"RRQ", (addr, port))
            data, server = s.recvfrom(512)
            if data != b"DATA1" or server[1] == port:
                return False
            s.sendto(b"ACK1", server)
            return s.recvfrom(512)[0] == b"DONE"
        except OSError:
            return False


@pytest.fixture
def lab() -> Iterator[Lab]:
    need_root("the link guard e2e")
    tag = uuid.uuid4().hex[:5]
    lab = Lab(pi=f"lgpi{tag}", hpc=f"lghpc{tag}", beyond=f"lgout{tag}", link=f"lgl{tag}")
    stop = threading.Event()
    try:
        for ns in (lab.pi, lab.hpc, lab.beyond):
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "link", "add", lab.link, "netns", lab.pi, "type", "veth", "peer", "name", "eth0", "netns", lab.hpc)
        run("ip", "link", "add", f"lgo{tag}", "netns", lab.pi, "type", "veth", "peer", "name", "eth0",
            "netns", lab.beyond)
        for ns, dev, addr in ((lab.pi, lab.link, PI_HPC), (lab.hpc, "eth0", HPC), (lab.pi, f"lgo{tag}", PI_OUT),
                              (lab.beyond, "eth0", BEYOND)):
            run("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
        run("ip", "-n", lab.hpc, "route", "add", "default", "via", PI_HPC)
        run("ip", "-n", lab.beyond, "route", "add", "169.254.9.0/30", "via", PI_OUT)
        run("ip", "netns", "exec", lab.pi, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        _tcp_server(lab.pi, PI_HPC, AGENT, stop)
        _tcp_server(lab.pi, PI_HPC, OTHER, stop)
        _tftp_like_server(lab.pi, PI_HPC, TFTP, stop)
        _tcp_server(lab.beyond, BEYOND, DECLARED, stop)
        _tcp_server(lab.beyond, BEYOND, UNDECLARED, stop)
        _echo_server(lab.beyond, BEYOND, ECHO, stop)
        _tcp_server(lab.pi, PI_OUT, PI_OWN, stop)
        yield lab
    finally:
        stop.set()
        for ns in (lab.hpc, lab.beyond, lab.pi):
            with contextlib.suppress(RuntimeError):
                run("ip", "netns", "del", ns)


def _guard(lab: Lab) -> EgressGuard:
    return EgressGuard(lab.link, [], netns=lab.pi, tag=lab.link,
                       services=LinkServices(gateway_addr=PI_HPC, agent_port=AGENT, tftp_port=TFTP))


def test_positive_control_without_the_guard_the_hpc_reaches_everything(lab: Lab) -> None:
    assert _tcp_reaches(lab.hpc, PI_HPC, AGENT)
    assert _tcp_reaches(lab.hpc, PI_HPC, OTHER)
    assert _tftp_transfer(lab.hpc, PI_HPC, TFTP)
    assert _tcp_reaches(lab.hpc, BEYOND, DECLARED) and _tcp_reaches(lab.hpc, BEYOND, UNDECLARED)
    assert _tcp_reaches(lab.hpc, PI_OUT, PI_OWN)


def test_the_guard_lets_the_hpc_reach_only_the_agent_channel_and_netboot(lab: Lab) -> None:
    guard = _guard(lab)
    guard.apply()
    assert _tcp_reaches(lab.hpc, PI_HPC, AGENT), "the agent channel must stay open"
    assert _tftp_transfer(lab.hpc, PI_HPC, TFTP), "netboot's TFTP, data from an ephemeral port, must pass"
    assert not _tcp_reaches(lab.hpc, PI_HPC, OTHER), "another service on the Pi was reachable"
    assert not _tcp_reaches(lab.hpc, BEYOND, DECLARED), "with no run, nothing beyond the Pi is reachable"
    report = guard.read()
    tried = {(a["host"], a["port"]) for a in report["attempts"]}
    assert (PI_HPC, OTHER) in tried and (BEYOND, DECLARED) in tried
    assert guard.dropped() >= 2
    assert report["counters"]["channel"]["packets"] >= 1 and report["counters"]["netboot"]["packets"] >= 1


def test_a_runs_declared_endpoint_opens_for_that_run_only(lab: Lab) -> None:
    guard = _guard(lab)
    guard.apply()
    guard.allow([Endpoint(BEYOND, DECLARED)])
    assert _tcp_reaches(lab.hpc, BEYOND, DECLARED)
    assert not _tcp_reaches(lab.hpc, BEYOND, UNDECLARED), "an undeclared port beyond the Pi was reachable"
    assert {(a["host"], a["port"]) for a in guard.read()["attempts"]} == {(BEYOND, UNDECLARED)}
    guard.clear()
    assert not _tcp_reaches(lab.hpc, BEYOND, DECLARED), "a finished run's endpoint stayed open"
    assert _tcp_reaches(lab.hpc, PI_HPC, AGENT)


def test_reapplying_replaces_the_table_and_keeps_the_link_guarded(lab: Lab) -> None:
    guard = _guard(lab)
    guard.apply()
    guard.allow([Endpoint(BEYOND, DECLARED)])
    _guard(lab).apply()  # a restarted gateway: the old run's endpoint must not survive
    assert not _tcp_reaches(lab.hpc, BEYOND, DECLARED)
    assert not _tcp_reaches(lab.hpc, PI_HPC, OTHER)
    assert _tcp_reaches(lab.hpc, PI_HPC, AGENT)
    guard.remove()
    assert _tcp_reaches(lab.hpc, PI_HPC, OTHER), "removing the guard must restore the unguarded link"


def test_a_manifest_that_names_the_pis_own_address_reaches_nothing_on_the_pi(lab: Lab) -> None:
    """Attack: the capsule's manifest declares a service of the Pi itself (its cluster-side address), which
    the address checks cannot know is the Pi's. The Pi's input chain never admits a declared endpoint, so
    it stays shut; the run's other endpoint, beyond the Pi, opens (positive control: the same allow)."""
    guard = _guard(lab)
    guard.apply()
    guard.allow([Endpoint(PI_OUT, PI_OWN), Endpoint(BEYOND, DECLARED)])
    assert _tcp_reaches(lab.hpc, BEYOND, DECLARED), "the declared endpoint beyond the Pi must open"
    assert not _tcp_reaches(lab.hpc, PI_OUT, PI_OWN), "a declared endpoint opened a service of the Pi itself"
    assert (PI_OUT, PI_OWN) in {(a["host"], a["port"]) for a in guard.read()["attempts"]}
    assert guard.read()["counters"]["denied_gateway"]["packets"] >= 1


def test_a_connection_opened_during_a_run_carries_nothing_after_the_run(lab: Lab) -> None:
    """Attack: the capsule opens a connection to its declared endpoint and keeps it, hoping the flow
    outlives the run (a wiped HPC that still talks out). HPC-to-beyond packets are matched against the
    declared set every time, established or not: after clear() the same socket is cut off."""
    guard = _guard(lab)
    guard.apply()
    guard.allow([Endpoint(BEYOND, ECHO)])
    with in_netns(lab.hpc):
        s = socket.create_connection((BEYOND, ECHO), timeout=2)
    with s:
        s.sendall(b"during")
        assert s.recv(64) == b"during", "positive control: the run's own flow is echoed"
        guard.clear()
        s.settimeout(1.5)
        s.sendall(b"after")
        try:
            got: bytes | None = s.recv(64)
        except TimeoutError:  # the segment and its retransmits are dropped
            got = None
        assert got is None, f"a finished run's flow still carried data: {got!r}"
    assert (BEYOND, ECHO) in {(a["host"], a["port"]) for a in guard.read()["attempts"]}


def test_a_runs_endpoints_close_in_the_kernel_at_their_timeout_without_any_gateway(lab: Lab) -> None:
    """The table outlives the gateway, its openings do not: a run's endpoints are added with the run's
    timeout, so a gateway that died mid-run (and never called clear()) still leaves the HPC confined."""
    guard = _guard(lab)
    guard.apply()
    guard.allow([Endpoint(BEYOND, DECLARED)], ttl_s=2)
    assert _tcp_reaches(lab.hpc, BEYOND, DECLARED), "positive control: open until its timeout"
    deadline = time.monotonic() + 10
    while _tcp_reaches(lab.hpc, BEYOND, DECLARED) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _tcp_reaches(lab.hpc, BEYOND, DECLARED), "the endpoint outlived its timeout"
    assert _tcp_reaches(lab.hpc, PI_HPC, AGENT), "the Pi's own services are not timed"


def test_the_clusters_networks_stay_shut_even_to_an_opening_that_names_them(lab: Lab) -> None:
    """Attack: a manifest declares a machine of the cluster (here the beyond namespace stands for a pod),
    which beyond the Pi no address check can tell from the internet. Told the cluster's networks, the
    guard refuses the endpoint, and the kernel drops traffic to them ahead of the declared set: an opening
    written straight into the set (as a guard without the check would) still reaches nothing. Positive
    control: the same direct opening on a guard without the deny list reaches the machine."""
    from trustcap.gateway.errors import EgressError

    def open_directly(guard: EgressGuard) -> None:
        run("ip", "netns", "exec", lab.pi, "nft", "add", "element", "inet", guard.table, "declared",
            f"{{ {BEYOND} . tcp . {DECLARED} }}")

    plain = _guard(lab)
    plain.apply()
    open_directly(plain)
    assert _tcp_reaches(lab.hpc, BEYOND, DECLARED), "positive control: the opening carries without a deny list"
    guard = EgressGuard(lab.link, [], netns=lab.pi, tag=lab.link,
                        services=LinkServices(gateway_addr=PI_HPC, agent_port=AGENT, tftp_port=TFTP,
                                              deny=("198.18.9.0/30",)))
    guard.apply()  # replaces the plain table, its opening included
    with pytest.raises(EgressError, match=r"is in 198\.18\.9\.0/30"):
        guard.allow([Endpoint(BEYOND, DECLARED)])
    open_directly(guard)
    assert not _tcp_reaches(lab.hpc, BEYOND, DECLARED), "a cluster machine was reached through an opening"
    assert (BEYOND, DECLARED) in {(a["host"], a["port"]) for a in guard.read()["attempts"]}
    assert _tcp_reaches(lab.hpc, PI_HPC, AGENT), "the agent channel stays open"
