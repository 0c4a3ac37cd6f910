"""`trustcap netboot ...`: the Pi's boot services for its HPC link, and the boot-image recipe.

    trustcap netboot serve --root DIR --tftp-port PORT --http-port PORT --bind ADDR
        [--manifest approved.json | --bootimages [--kubeconfig FILE]]
        [--dhcp-interface IFACE --dhcp-range START,END [--mac MAC=TOKEN ...]] [--stop-after-boot]
    trustcap netboot build-image [--http-port 8080] [--out DIR] [--no-cache]

Without --manifest or --bootimages, `serve` pins the digests of the folder's files at start: anything
changed afterwards is refused and reported.
"""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path
from typing import Any

from trustcap.errors import ConfigError
from trustcap.netboot.serve import add_serve_arguments, run_serve


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("netboot", help="boot services (DHCP, TFTP, HTTP) and the HPC boot image")
    sub = p.add_subparsers(dest="netboot_command", metavar="ACTION", required=True)

    s = sub.add_parser("serve", help="serve a folder of approved boot files until stopped")
    add_serve_arguments(s)
    s.add_argument("--container", action="store_true",
                   help="run in a container that owns --dhcp-interface and exits after the boot (seed Task 3)")
    s.add_argument("--link-prefix", type=int, default=24, help="prefix length of --bind on the link (--container)")
    s.set_defaults(func=_serve)

    b = sub.add_parser("build-image", help="build the HPC boot image reproducibly from Debian packages")
    b.add_argument("--http-port", type=int, default=8080, help="the gateways' boot HTTP port")
    b.add_argument("--out", type=Path)
    b.add_argument("--no-cache", action="store_true")
    b.set_defaults(func=_build)


def _serve(args: argparse.Namespace) -> int:
    if not args.container:
        return int(run_serve(args))
    from trustcap.netboot.container import BootContainer

    if not args.dhcp_interface or not args.dhcp_range:
        raise ConfigError("--container: --dhcp-interface and --dhcp-range are required (the link it owns)")
    if args.bootimages or args.state_dir or args.wait_link or args.token_file:
        raise ConfigError("--container: --bootimages, --state-dir, --wait-link and --token-file are not available in "
                          "a container (it serves one boot and exits; give the token with --mac MAC=TOKEN@NODE)")
    if not args.root.is_dir():
        raise ConfigError(f"--root: {args.root} is not a directory")
    passthrough = ["--bind", args.bind, "--tftp-port", str(args.tftp_port), "--http-port", str(args.http_port),
                   "--dhcp-interface", args.dhcp_interface, "--dhcp-range", args.dhcp_range]
    for mac in args.mac:
        passthrough += ["--mac", mac]
    events_dir = args.events.parent if args.events else None
    box = BootContainer(args.root, args.dhcp_interface, f"{args.bind}/{args.link_prefix}", passthrough,
                        manifest=args.manifest, events_dir=events_dir)
    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)  # so that `finally` removes the container
    box.start()
    print(json.dumps({"container": box.container.short_id, "bind": args.bind}), flush=True)
    try:
        code = box.wait(timeout=3600)
    finally:
        logs = box.logs()
        box.stop()
    print(logs, end="", flush=True)
    return int(code)


def _build(args: argparse.Namespace) -> int:
    from trustcap.netboot.image.builder import BuildInputs, build_image

    img = build_image(BuildInputs(http_port=args.http_port), args.out, use_cache=not args.no_cache)
    print(json.dumps({"dir": str(img.out_dir), "digests": img.digests, "bootdigest": img.bootdigest}, indent=2))
    return 0
