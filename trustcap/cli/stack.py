"""`trustcap stack up|down|status|env`: the local stack every e2e test and the demo run on."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from trustcap.cli._stack_images import add_images_parser
from trustcap.stack.stack import Stack

console = Console(stderr=True, highlight=False)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("stack", help="start, stop and inspect the local stack")
    p.add_argument("--kubeconfig", type=Path, default=None,
                   help="use this cluster (e.g. a real k3s) instead of starting kube-apiserver")
    ssub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = ssub.add_parser("up", help="build what is missing and start every part (idempotent)")
    up.add_argument("--no-image", action="store_true", help="do not build the base container image")
    up.add_argument("--node", action="store_true",
                    help="also run a one-node cluster (containerd, controller-manager, scheduler, kube-proxy, "
                         "CoreDNS, kubelet) so that pods run; the API server then binds the node IP "
                         "(docs/decisions/0111-one-node-cluster.md)")
    up.set_defaults(func=_up)
    ssub.add_parser("down", help="stop what the stack started; keeps data and the tool cache").set_defaults(
        func=_down)
    ssub.add_parser("status", help="show each part and where it listens").set_defaults(func=_status)
    ssub.add_parser("env", help="print shell export lines: eval \"$(trustcap stack env)\"").set_defaults(
        func=_env)
    add_images_parser(ssub)


def _stack(args: argparse.Namespace) -> Stack:
    return Stack(kubeconfig=args.kubeconfig)


def _up(args: argparse.Namespace) -> int:
    stack = _stack(args)
    start = time.monotonic()
    with console.status("[bold]starting the trustcap stack[/]", spinner="dots") as status:
        def say(part: str, msg: str) -> None:
            status.update(f"[bold]{part}[/]: {msg}  [dim]({time.monotonic() - start:.0f}s)[/]")
            console.log(f"[cyan]{part:<15}[/] {msg}")

        stack.up(say, with_image=not args.no_image, with_node=args.node)
    _print_status(stack)
    console.print(f"stack up in {time.monotonic() - start:.1f}s; next: [bold]eval \"$(trustcap stack env)\"[/]")
    return 0


def _down(args: argparse.Namespace) -> int:
    stopped = _stack(args).down(lambda part, msg: console.log(f"[cyan]{part:<15}[/] {msg}"))
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _print_status(stack: Stack) -> bool:
    table = Table(title="trustcap stack")
    table.add_column("part")
    table.add_column("state")
    table.add_column("listens at")
    table.add_column("detail")
    ok = True
    for part in stack.status():
        ok &= part.running
        table.add_row(part.name, "[green]running[/]" if part.running else "[red]down[/]", part.where, part.detail)
    Console(highlight=False, width=None if sys.stdout.isatty() else 130).print(table)
    return ok


def _status(args: argparse.Namespace) -> int:
    return 0 if _print_status(_stack(args)) else 3


def _env(args: argparse.Namespace) -> int:
    print("\n".join(_stack(args).env_lines()))
    return 0
