"""`python -m trustcap.operator`: run the operator (thin: parse flags, import handlers, hand over to kopf).

Credentials come the usual way (KUBECONFIG, in-cluster service account); `trustcap stack env` prints the
local stack's. Several replicas elect one leader through kopf peering (`--peering`); `--standalone`
skips it for a single instance. Prometheus metrics (operator/metrics.py) are served on
`--metrics HOST:PORT` (default $TRUSTCAP_METRICS_ADDR, else 127.0.0.1:9464; "off" disables).
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from collections.abc import Sequence
from typing import Final
from wsgiref.simple_server import WSGIServer

import kopf
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from trustcap.operator import handlers  # noqa: F401  (importing registers every handler)
from trustcap.operator.metrics import KubeSource, LifecycleCollector, ObjectSource, parse_address

METRICS_ENV: Final = "TRUSTCAP_METRICS_ADDR"
METRICS_DEFAULT: Final = "127.0.0.1:9464"

log = logging.getLogger("trustcap.operator")


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
    p.add_argument("--metrics", default=None, metavar="HOST:PORT",
                   help=f"serve Prometheus metrics on http://HOST:PORT/metrics, or 'off' "
                        f"(default: ${METRICS_ENV}, else {METRICS_DEFAULT})")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--debug", action="store_true")
    return p


def default_priority() -> int:
    """A random priority: kopf pauses *every* replica when two share the highest priority, so identical
    replicas of one Deployment would all stop. Distinct random values elect one leader without config."""
    return secrets.randbelow(2**31 - 2) + 1


def serve_metrics(flag: str | None, env: str | None, *, registry: CollectorRegistry = REGISTRY,
                  source: ObjectSource | None = None) -> WSGIServer | None:
    """Start the /metrics server (None: off, or the default address is taken). An address the user chose
    (flag or environment) that cannot be bound is fatal; the default one is only warned about, so a
    second operator on the same machine (tests, a developer's shell) still runs."""
    chosen = flag if flag is not None else env
    try:
        where: tuple[str, int] | None = parse_address(chosen if chosen is not None else METRICS_DEFAULT)
    except ValueError as exc:
        raise SystemExit(f"--metrics: {exc}") from None
    if where is None:
        return None
    try:
        server, _thread = start_http_server(where[1], addr=where[0], registry=registry)
    except OSError as exc:
        if chosen is not None:
            raise SystemExit(f"cannot serve metrics on {where[0]}:{where[1]}: {exc}; choose another --metrics "
                             f"HOST:PORT or 'off'") from None
        log.warning("metrics off: cannot listen on the default %s:%s (%s); pass --metrics HOST:PORT",
                    where[0], where[1], exc)
        return None
    registry.register(LifecycleCollector(source if source is not None else KubeSource()))
    log.info("serving Prometheus metrics on http://%s:%s/metrics", *where)
    return server


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    kopf.configure(verbose=args.verbose, debug=args.debug, log_prefix=True)  # "[ns/name]" on object lines
    serve_metrics(args.metrics, os.environ.get(METRICS_ENV))
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
