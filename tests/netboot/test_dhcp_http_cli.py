"""Generated dnsmasq config, the HTTP server on loopback, and the CLI's errors."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path

import pytest
from nbtestkit import KERNEL, Root

from trustcap.cli import main
from trustcap.netboot.dhcp import DhcpConfig, render_config
from trustcap.netboot.errors import ServiceError
from trustcap.netboot.http import BootSignal, HttpServer


def _cfg(**kw: object) -> DhcpConfig:
    base: dict[str, object] = {"interface": "nbgw0", "gateway_ip": "10.77.0.1", "range_start": "10.77.0.100",
                               "range_end": "10.77.0.150"}
    base.update(kw)
    return DhcpConfig(**base)  # type: ignore[arg-type]


def test_config_is_link_only_without_dns_or_route(tmp_path: Path) -> None:
    text = render_config(_cfg(macs={"52:54:00:00:00:01": "tok"}), tmp_path)
    lines = text.splitlines()
    for required in ("port=0", "interface=nbgw0", "bind-interfaces", "no-resolv", "no-hosts",
                     "dhcp-option=option:router", "dhcp-option=option:dns-server", "dhcp-boot=boot.ipxe,,10.77.0.1",
                     "dhcp-host=52:54:00:00:00:01,10.77.0.100,set:hpc0", 'dhcp-option-force=tag:hpc0,224,"tok"',
                     "dhcp-range=10.77.0.100,static,255.255.255.0,600", 'dhcp-option-force=227,"10.77.0.1:7443"',
                     'dhcp-option-force=tag:hpc0,225,"hpc-525400000001"'):
        assert required in lines, required
    assert not any(ln.startswith(("server=", "enable-tftp", "resolv-file")) for ln in lines)


@pytest.mark.parametrize(("kw", "match"), [
    pytest.param({"interface": "eth0;rm -rf"}, "dhcp.interface", id="iface-injection"),
    pytest.param({"range_start": "192.168.1.5"}, "dhcp.range_start", id="range-outside"),
    pytest.param({"range_end": "nonsense"}, "bad address", id="range-garbage"),
    pytest.param({"macs": {"52:54:00:00:00:0G": "t"}}, "dhcp.macs", id="bad-mac"),
    pytest.param({"macs": {"52:54:00:00:00:01": 'x"\nserver=8.8.8.8'}}, "token", id="token-injection"),
    pytest.param({"boot_file": "a b"}, "dhcp.boot_file", id="bootfile"),
    pytest.param({"agent_endpoint": 'x",1'}, "dhcp.agent_endpoint", id="endpoint-injection"),
    pytest.param({"gateway_address": "0x12"}, "dhcp.gateway_address", id="short-address"),
    pytest.param({"macs": {"52:54:00:00:00:01": "t"}, "nodes": {"52:54:00:00:00:01": "Bad_Name"}}, "dhcp.nodes",
                 id="bad-node-name"),
])
def test_bad_dhcp_config_names_the_field(tmp_path: Path, kw: dict[str, object], match: str) -> None:
    with pytest.raises(ServiceError, match=match):
        render_config(_cfg(**kw), tmp_path)


@pytest.fixture
def web(boot_root: Root) -> Iterator[tuple[HttpServer, list[BootSignal]]]:
    server = HttpServer(boot_root.store, "127.0.0.1", 0)
    signals: list[BootSignal] = []
    server.on_booted(signals.append)
    server.start()
    try:
        yield server, signals
    finally:
        server.stop()


def _get(server: HttpServer, path: str, method: str = "GET") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize(("path", "status"), [
    pytest.param("/kernel", 200, id="approved"),
    pytest.param("/kernel?x=1", 200, id="query-ignored"),
    pytest.param("/unapproved", 403, id="not-approved"),
    pytest.param("/../secret", 403, id="dotdot"),
    pytest.param("/%2e%2e/secret", 403, id="encoded"),
    pytest.param("/escape", 403, id="symlink-out"),
    pytest.param("//etc/passwd", 403, id="double-slash"),
])
def test_http_serves_only_approved(web: tuple[HttpServer, list[BootSignal]], path: str, status: int) -> None:
    code, body = _get(web[0], path)
    assert code == status
    if status == 200:
        assert body == KERNEL
    else:
        assert b"outside the root" not in body


def test_http_head_and_tamper(web: tuple[HttpServer, list[BootSignal]], boot_root: Root) -> None:
    assert _get(web[0], "/kernel", "HEAD") == (200, b"")
    (boot_root.root / "kernel").write_bytes(b"evil")
    assert _get(web[0], "/kernel")[0] == 403
    assert boot_root.refusals[-1].reason == "digest-mismatch" and boot_root.refusals[-1].protocol == "http"


def test_booted_signal_validated_and_hooked(web: tuple[HttpServer, list[BootSignal]]) -> None:
    server, signals = web
    assert _get(server, "/trustcap/booted?token=t1&bootdigest=sha256:" + "a" * 64)[0] == 200
    assert _get(server, "/trustcap/booted?token=t1&bootdigest=md5:x")[0] == 400
    assert _get(server, "/trustcap/booted?token=a%20b&bootdigest=sha256:" + "a" * 64)[0] == 400
    assert signals == [{"client": "127.0.0.1", "token": "t1", "bootdigest": "sha256:" + "a" * 64}]


@pytest.mark.parametrize(("argv", "message"), [
    pytest.param(["--root", "/nonexistent", "--bind", "127.0.0.1"], "--root", id="missing-root"),
    pytest.param(["--root", ".", "--bind", "127.0.0.1", "--tftp-port", "70000"], "--tftp-port", id="bad-port"),
    pytest.param(["--root", ".", "--bind", "127.0.0.1", "--dhcp-interface", "x"], "--dhcp-range", id="no-range"),
])
def test_cli_errors_are_one_clear_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["netboot", "serve", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_stop_after_boot_closes_the_boot_services(boot_root: Root) -> None:
    """Seed Task 3: once the HPC reports it booted, nothing keeps listening on the link."""
    import socket
    import time

    from trustcap.netboot.approval import ManifestApproval
    from trustcap.netboot.services import NetbootConfig, NetbootServices

    cfg = NetbootConfig(root=boot_root.root, bind="127.0.0.1", tftp_port=0, http_port=0, stop_after_boot=True)
    services = NetbootServices(cfg, ManifestApproval({})).start()
    assert services.http is not None
    port = services.http.port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/trustcap/booted?token=t&bootdigest=sha256:" + "b" * 64)
    assert conn.getresponse().status == 200
    conn.close()
    assert services.stopped.wait(10)
    time.sleep(0.2)
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))
    assert [b["token"] for b in services.booted] == ["t"]


def test_serve_reports_refusals_in_its_metrics_and_events(boot_root: Root, tmp_path: Path) -> None:
    """The whole `serve` entry point on loopback: a refusal shows in the log, the events file and the
    Prometheus counter; SIGTERM stops it with exit 0."""
    import json
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        mport = s.getsockname()[1]
    events = tmp_path / "events.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "trustcap.netboot", "serve", "--root", str(boot_root.root), "--bind",
         "127.0.0.1", "--tftp-port", "0", "--http-port", "0", "--metrics-port", str(mport), "--events", str(events)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        ports = json.loads(proc.stdout.readline())
        conn = http.client.HTTPConnection("127.0.0.1", ports["http_port"], timeout=5)
        conn.request("GET", "/escape")  # a symlink out of the root; pin_directory never approved it
        assert conn.getresponse().status == 403
        conn.close()
        body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
        assert 'trustcap_netboot_refused_total{protocol="http",reason="not-approved"} 1.0' in body
        assert [json.loads(x)["reason"] for x in events.read_text().splitlines()] == ["not-approved"]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "refused '/escape'" in err
