"""`trustcap netboot ...`: the Pi's boot services for its HPC link, and the boot-image recipe.

    trustcap netboot serve --root DIR --tftp-port PORT --http-port PORT --bind ADDR
        [--manifest approved.json | --bootimages [--kubeconfig FILE]]
        [--dhcp-interface IFACE --dhcp-range START,END [--mac MAC=TOKEN ...]] [--stop-after-boot]
    trustcap netboot build-image --gateway-url URL [--out DIR] [--no-cache]

Without --manifest or --bootimages, `serve` pins the digests of the folder's files at start: anything
changed afterwards is refused and reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from trustcap.errors import ConfigError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("netboot", help="boot services (DHCP, TFTP, HTTP) and the HPC boot image")
    sub = p.add_subparsers(dest="netboot_command", metavar="ACTION", required=True)

    s = sub.add_parser("serve", help="serve a folder of approved boot files until stopped")
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
    s.add_argument("--mac", action="append", default=[], metavar="MAC=TOKEN", help="serve only this HPC")
    s.add_argument("--state-dir", type=Path, help="dnsmasq config, leases and log (default: ROOT/../netboot-state)")
    s.add_argument("--stop-after-boot", action="store_true", help="stop once the HPC reports it booted")
    s.add_argument("--events", type=Path, help="append refusals and boot reports here as JSON lines")
    s.set_defaults(func=_serve)

    b = sub.add_parser("build-image", help="build the HPC boot image reproducibly from Debian packages")
    b.add_argument("--gateway-url", required=True, help="HTTP root of the gateway on the HPC link")
    b.add_argument("--out", type=Path)
    b.add_argument("--no-cache", action="store_true")
    b.set_defaults(func=_build)


def _port(value: int, field: str) -> int:
    if not 0 <= value <= 65535:
        raise ConfigError(f"{field}: {value} is not a port number (0-65535)")
    return value


def _serve(args: argparse.Namespace) -> int:
    from trustcap.netboot.approval import ApprovalSource, BootImageApproval, ManifestApproval, pin_directory
    from trustcap.netboot.dhcp import DhcpConfig
    from trustcap.netboot.services import NetbootConfig, NetbootServices

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
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
    if args.dhcp_interface:
        if not args.dhcp_range or args.dhcp_range.count(",") != 1:
            raise ConfigError("--dhcp-range: START,END is required with --dhcp-interface")
        macs = {}
        for item in args.mac:
            mac, sep, token = item.partition("=")
            if not sep:
                raise ConfigError(f"--mac: {item!r} must be MAC=TOKEN")
            macs[mac.lower()] = token
        start, end = args.dhcp_range.split(",")
        dhcp = DhcpConfig(interface=args.dhcp_interface, gateway_ip=args.bind, range_start=start,
                          range_end=end, macs=macs)
    cfg = NetbootConfig(root=root, bind=args.bind, tftp_port=_port(args.tftp_port, "--tftp-port"),
                        http_port=_port(args.http_port, "--http-port"), dhcp=dhcp, state_dir=args.state_dir,
                        stop_after_boot=args.stop_after_boot)
    services = NetbootServices(cfg, approval)
    if args.events:
        events: Path = args.events

        def record(kind: str, body: dict[str, str]) -> None:
            with events.open("a") as fh:
                fh.write(json.dumps({"event": kind, **body}, sort_keys=True) + "\n")

        services.on_refused(lambda r: record("refused", dataclasses.asdict(r)))
        services.on_booted(lambda b: record("booted", b))
    services.start()
    assert services.tftp and services.http
    print(json.dumps({"tftp_port": services.tftp.port, "http_port": services.http.port, "bind": args.bind}),
          flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    while not done.is_set() and not services.stopped.is_set():
        done.wait(0.5)
    services.stop()
    return 0


def _build(args: argparse.Namespace) -> int:
    from trustcap.netboot.image.builder import BuildInputs, build_image

    img = build_image(BuildInputs(gateway_url=args.gateway_url), args.out, use_cache=not args.no_cache)
    print(json.dumps({"dir": str(img.out_dir), "digests": img.digests, "bootdigest": img.bootdigest}, indent=2))
    return 0
