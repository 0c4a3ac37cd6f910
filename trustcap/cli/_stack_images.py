"""`trustcap stack images [--arch amd64|arm64|all]`: build the chart's component images from Debian packages.

Registered by `trustcap stack` (`add_images_parser(ssub)` in cli/stack.py), so it sits under the stack
command whose tool cache it shares; this file only parses and reports, trustcap/stack/component_images.py
builds.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from trustcap.cli._progress import step_bar, step_reporter

console = Console(stderr=True, highlight=False)


def add_images_parser(ssub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = ssub.add_parser(
        "images", help="build trustcap/operator, /gateway, /netboot from Debian packages (cached)",
        description="Build the component images the Helm chart runs, for amd64 and/or arm64 (arm64 under "
                    "qemu-user-static), load them into Docker and write a `docker load` archive per arch.")
    p.add_argument("--arch", choices=["amd64", "arm64", "all"], default=None,
                   help="architecture to build (default: this machine's; all = amd64 and arm64)")
    p.set_defaults(func=_images)
    return p


def arches_for(choice: str | None, host: str) -> list[str]:
    if choice is None:
        return [host]
    return ["amd64", "arm64"] if choice == "all" else [choice]


def _images(args: argparse.Namespace) -> int:
    from trustcap.stack import component_images, images

    arches = arches_for(args.arch, images.host_arch())
    start = time.monotonic()
    with step_bar(console) as bar:
        built = component_images.build(arches, step_reporter(bar))
    table = Table(title=f"trustcap images ({time.monotonic() - start:.1f}s)")
    for col in ("arch", "component", "tags in this engine", "image id"):
        table.add_column(col)
    for b in built:
        for comp, tags in b.tags.items():
            table.add_row(b.arch, comp, " ".join(tags), b.image_ids[comp][7:19])
    Console(highlight=False, width=None if sys.stdout.isatty() else 130).print(table)
    for b in built:
        console.print(f"{b.arch}: [bold]docker load -i {b.archive}[/] on an {b.arch} machine gives the chart's tags",
                      soft_wrap=True)
    return 0
