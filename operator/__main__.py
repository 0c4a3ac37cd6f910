"""`python -m trustcap.operator`: run the operator (thin: parse flags, import handlers, hand over to kopf).

Credentials come the usual way (KUBECONFIG, in-cluster service account); `trustcap stack env` prints the
local stack's. Several replicas elect one leader through kopf peering (`--peering`); `--standalone`
skips it for a single instance.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Sequence

import kopf
from trustcap.operator import handlers  # noqa: F401  (importing registers every handler)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trustcap.operator", description="Run the trustcap kopf operator.")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[],
                       help="watch only this namespace (repeatable; glob patterns allowed)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch the whole cluster (default)")
    peer = p.add_mutually_exclusive_group()
    peer.add_argument("--standalone", action="store_true", help="no peering: a single instance")
    peer.add_argument("--peering", default=None, metavar="NAME",
                      help="elect a leader through this kopf peering object (requires kopf's peering CRDs)")
    p.add_argument("--priority", type=int, default=None,
                   help="peering priority of this replica (default: random, so replicas never tie)")
    p.add_argument("--liveness", default=None, metavar="URL",
                   help="serve a liveness probe, e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--debug", action="store_true")
    return p


def default_priority() -> int:
    """A random priority: kopf pauses *every* replica when two share the highest priority, so identical
    replicas of one Deployment would all stop. Distinct random values elect one leader without config."""
    return secrets.randbelow(2**31 - 2) + 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    kopf.configure(verbose=args.verbose, debug=args.debug, log_prefix=True)  # "[ns/name]" on object lines
    namespaces = tuple(args.namespace)
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        # Neither flag: kopf's own choice (peering when its CRDs are installed, else standalone).
        standalone=True if args.standalone else None,
        peering_name=args.peering,
        priority=args.priority if args.priority is not None else default_priority(),
        liveness_endpoint=args.liveness,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
