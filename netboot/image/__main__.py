"""`python -m trustcap.netboot.image [--http-port PORT] [--out DIR]`: build the boot image, print its manifest."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trustcap.errors import TrustcapError
from trustcap.netboot.image.builder import BuildInputs, build_image


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="build-image", description="Build the HPC netboot image reproducibly.")
    ap.add_argument("--http-port", type=int, default=8080, help="the gateways' boot HTTP port")
    ap.add_argument("--out", type=Path, help="output folder (default: the cache)")
    ap.add_argument("--no-cache", action="store_true", help="rebuild even when the cache has this image")
    args = ap.parse_args(argv)
    try:
        img = build_image(BuildInputs(http_port=args.http_port), args.out, use_cache=not args.no_cache)
    except TrustcapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"dir": str(img.out_dir), "digests": img.digests, "bootdigest": img.bootdigest}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
