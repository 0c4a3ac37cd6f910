"""The `trustcap` command.

Each subcommand lives in its own module of this package and exposes `register(subparsers)`; this
module only wires them together and turns our errors into one clear line on stderr (exit 1), never a
traceback. A subcommand is added by adding its module: every module here that defines `register` is
one (in name order, so `--help` lists them stably).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence as _Sequence

from rich.console import Console as _Console

from trustcap import __version__
from trustcap.errors import TrustcapError as _TrustcapError

__all__ = ["build_parser", "main"]

_err_console = _Console(stderr=True, highlight=False)


def _subcommand_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trustcap",
        description="Trusted execution of digital capsules on a network of attested Pi gateways.",
    )
    parser.add_argument("--version", action="version", version=f"trustcap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _subcommand_modules():
        module = importlib.import_module(f"trustcap.cli.{name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: _Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except _TrustcapError as exc:
        _err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        _err_console.print("[yellow]interrupted[/]")
        return 130
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
