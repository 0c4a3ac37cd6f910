"""`serve`: the boot services in the foreground, from arguments. Shared by `trustcap netboot serve` and
`python -m trustcap.netboot serve` (the entry point of the boot container, which carries no CLI)."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import ipaddress
import json
import logging
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from trustcap.errors import ConfigError
from trustcap.netboot.approval import ApprovalSource, BootImageApproval, ManifestApproval, pin_directory
from trustcap.netboot.dhcp import DhcpConfig
from trustcap.netboot.services import NetbootConfig, NetbootServices

__all__ = ["add_serve_arguments", "run_serve"]

log = logging.getLogger("trustcap.netboot")


def add_serve_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--root", type=Path, required=True, help="folder holding the boot files")
    s.add_argument("--tftp-port", type=int, default=69)
    s.add_argument("--http-port", type=int, default=8080)
    s.add_argument("--bind", required=True, help="loopback or HPC-link address to listen on")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--manifest", type=Path, help='JSON {"path": "sha256:<hex>"} of approved files')
    src.add_argument("--bootimages", action="store_true", help="approve files of BootImages with phase Approved")
    s.add_argument("--kubeconfig", help="kubeconfig for --bootimages (default: the usual lookup)")
    s.add_argument("--dhcp-interface", help="run dnsmasq DHCP on this link interface")
    s.add_argument("--dhcp-range", help="START,END addresses for HPC leases")
    s.add_argument("--mac", action="append", default=[], metavar="MAC=TOKEN[@NODE]",
                   help="serve only this HPC, with its one-time enrolment token and HPCNode name; with "
                        "--token-file give MAC[@NODE] and the token comes from that file")
    s.add_argument("--token-file", type=Path,
                   help="the gateway's token file (its --token-file): serve the one --mac only while it holds "
                        "a token armed for the next boot, and hand out that token")
    s.add_argument("--agent-endpoint", default="", help="HOST:PORT of the attestation server (default BIND:7443)")
    s.add_argument("--gateway-address", default="", help="0x... address of this gateway's trust root")
    s.add_argument("--gateway-address-file", type=Path,
                   help="with --token-file: read that address from the gateway's --address-file with every "
                        "token armed (a token without a readable address is not served)")
    s.add_argument("--state-dir", type=Path, help="dnsmasq config, leases and log (default: ROOT/../netboot-state)")
    s.add_argument("--stop-after-boot", action="store_true", help="stop once the HPC reports it booted")
    s.add_argument("--events", type=Path, help="append refusals and boot reports here as JSON lines")
    s.add_argument("--report-node", metavar="HPCNODE",
                   help="post refusals as Warning events on this HPCNode (uses --kubeconfig)")
    s.add_argument("--metrics-port", type=int, default=0,
                   help="serve Prometheus metrics (trustcap_netboot_*) on --metrics-address:PORT (0: off)")
    s.add_argument("--metrics-address", default="127.0.0.1",
                   help="address the metrics listen on (default 127.0.0.1, the Pi's own Prometheus; the chart "
                        "gives the pod's address so a cluster Prometheus can scrape it). Never the HPC link: "
                        "--bind is refused here")
    s.add_argument("--wait-link", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to SECONDS for --bind to exist (the link is moved in after start)")


def _port(value: int, field: str) -> int:
    if not 0 <= value <= 65535:
        raise ConfigError(f"{field}: {value} is not a port number (0-65535)")
    return value


def _metrics_address(args: argparse.Namespace) -> str:
    """Where /metrics listens: never the HPC link (--bind) nor every address, since on a real network the
    HPC reaches only what the Pi serves on the link, and a /metrics there would tell a booting HPC what
    was refused and served."""
    addr = str(args.metrics_address or "").strip()
    if not addr:
        raise ConfigError("--metrics-address: empty; give the Pi's loopback (127.0.0.1) or its cluster address")
    if addr == args.bind and not _loopback(addr):  # a loopback --bind is a test's or a lab's, no HPC link
        raise ConfigError(f"--metrics-address {addr} is the HPC link (--bind): give the Pi's loopback or its "
                          "cluster address")
    if addr in ("0.0.0.0", "::", ""):  # noqa: S104 -- this is the refusal of it
        raise ConfigError(f"--metrics-address {addr} listens on every address, the HPC link too: give the Pi's "
                          "loopback or its cluster address")
    return addr


def _loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def _wait_for_address(addr: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((addr, 0))
                return
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL or time.monotonic() >= deadline:
                    raise ConfigError(f"--bind: {addr} is not an address of this host ({exc.strerror})") from exc
        time.sleep(0.2)


def build_config(args: argparse.Namespace) -> tuple[NetbootConfig, ApprovalSource]:
    root: Path = args.root
    if not root.is_dir():
        raise ConfigError(f"--root: {root} is not a directory")
    approval: ApprovalSource
    if args.manifest:
        approval = ManifestApproval.from_json(args.manifest)
    elif args.bootimages:
        approval = BootImageApproval(kubeconfig=args.kubeconfig)
    else:
        approval = pin_directory(root)
    dhcp = None
    if args.gateway_address_file and args.gateway_address:
        raise ConfigError("--gateway-address-file and --gateway-address: give one (the file is the gateway's own "
                          "--address-file, which the chart passes)")
    if args.gateway_address_file and not args.token_file:
        raise ConfigError("--gateway-address-file needs --token-file: the address is read with each armed token")
    if args.token_file and not args.dhcp_interface:
        raise ConfigError("--token-file needs --dhcp-interface: the token reaches the HPC by DHCP")
    if args.dhcp_interface:
        if not args.dhcp_range or args.dhcp_range.count(",") != 1:
            raise ConfigError("--dhcp-range: START,END is required with --dhcp-interface")
        macs, nodes = {}, {}
        if args.token_file and len(args.mac) != 1:
            raise ConfigError("--token-file: give exactly one --mac MAC[@NODE] (a gateway boots one HPC)")
        for item in args.mac:
            if args.token_file:
                if "=" in item:
                    raise ConfigError(f"--mac: {item!r}: with --token-file give MAC[@NODE], no token")
                mac, _, node = item.partition("@")
                token = "armed-from-token-file"  # noqa: S105 -- placeholder until the file is read, never served
            else:
                mac, sep, rest = item.partition("=")
                if not sep:
                    raise ConfigError(f"--mac: {item!r} must be MAC=TOKEN[@NODE]")
                token, _, node = rest.partition("@")
            macs[mac.lower()] = token
            if node:
                nodes[mac.lower()] = node
        start, end = args.dhcp_range.split(",")
        dhcp = DhcpConfig(interface=args.dhcp_interface, gateway_ip=args.bind, range_start=start,
                          range_end=end, macs=macs, nodes=nodes, agent_endpoint=args.agent_endpoint,
                          gateway_address=args.gateway_address)
    cfg = NetbootConfig(root=root, bind=args.bind, tftp_port=_port(args.tftp_port, "--tftp-port"),
                        http_port=_port(args.http_port, "--http-port"), dhcp=dhcp, state_dir=args.state_dir,
                        stop_after_boot=args.stop_after_boot)
    return cfg, approval


def run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT, or until the HPC booted with --stop-after-boot. Exit code 0."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg, approval = build_config(args)
    if args.wait_link:
        _wait_for_address(args.bind, args.wait_link)
    services = NetbootServices(cfg, approval)
    watch = None
    if args.token_file:
        from trustcap.netboot.tokens import TokenFileWatch

        assert cfg.dhcp is not None
        watch = TokenFileWatch(args.token_file, next(iter(cfg.dhcp.macs)), services,
                               address_path=args.gateway_address_file)
    if args.events:
        events: Path = args.events

        def record(kind: str, body: dict[str, Any]) -> None:
            with events.open("a") as fh:
                fh.write(json.dumps({"event": kind, **body}, sort_keys=True) + "\n")

        services.on_refused(lambda r: record("refused", dataclasses.asdict(r)))
        services.on_booted(lambda b: record("booted", b))
    if args.report_node:
        from trustcap.netboot.events import KubeEventReporter

        services.on_refused(KubeEventReporter(args.report_node, kubeconfig=args.kubeconfig))
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(_port(args.metrics_port, "--metrics-port"), addr=_metrics_address(args))
    services.start()
    if watch is not None:
        watch.start()
    assert services.tftp and services.http
    print(json.dumps({"tftp_port": services.tftp.port, "http_port": services.http.port, "bind": args.bind}),
          flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    while not done.is_set() and not services.stopped.is_set():
        done.wait(0.5)
    if watch is not None:
        watch.stop()
    services.stop()
    log.info("boot services stopped")
    return 0
