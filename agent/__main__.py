"""`python3 -m trustcap.agent`: start the HPC agent from the kernel command line (or flags)."""

from __future__ import annotations

import argparse
import logging
import sys

from trustcap.agent.identity import read_boot_config
from trustcap.agent.service import Agent
from trustcap.errors import TrustcapError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m trustcap.agent", description=__doc__)
    for name, what in (("gateway", "HOST:PORT of the gateway"), ("token", "one-time enrolment token"),
                       ("bootdigest", "sha256:HEX of the boot image"), ("gatewayaddr", "gateway address 0x..."),
                       ("node", "node name")):
        p.add_argument(f"--{name}", default="", help=f"{what} (default: trustcap.{name}= on /proc/cmdline)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = read_boot_config({k: getattr(args, k) for k in ("gateway", "token", "bootdigest", "gatewayaddr",
                                                                 "node")})
        Agent(config).serve_forever()
    except TrustcapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
