"""`python -m trustcap.netboot serve ...`: the boot container's entry point (it carries no CLI)."""

from __future__ import annotations

import argparse
import sys

from trustcap.errors import TrustcapError
from trustcap.netboot.serve import add_serve_arguments, run_serve


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trustcap.netboot")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_serve_arguments(sub.add_parser("serve", help="serve approved boot files until stopped"))
    args = ap.parse_args(argv)
    try:
        return int(run_serve(args))
    except TrustcapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
