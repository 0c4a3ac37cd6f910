"""`trustcap broker serve`: an input owner's key-release broker (trustcap/release/server.py).

    trustcap broker serve --key DIR --rpc URL --deployment FILE [--listen 127.0.0.1:PORT]

DIR is what `trustcap keys new --out DIR` wrote (DIR/key, mode 0600). The broker reads the chain only
(TaskEscrow and the registry, through the deployment file); it never sends a transaction. It prints
`ready url=http://HOST:PORT` once it listens, logs one line per decision on stderr, and serves until
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from trustcap.capsule.keys import SECRET_NAME, KeyPair
from trustcap.cli._chain import open_escrow
from trustcap.errors import ConfigError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("broker", help="run your key-release broker for the inputs you own")
    sub = parser.add_subparsers(dest="broker_command", metavar="ACTION", required=True)
    serve = sub.add_parser("serve", help="serve POST /v1/release until SIGTERM")
    serve.add_argument("--key", required=True, type=Path, metavar="DIR",
                       help="your key folder from `trustcap keys new` (DIR/key), or the key file itself")
    serve.add_argument("--rpc", default=os.environ.get("TRUSTCAP_CHAIN_RPC"), metavar="URL",
                       help="chain RPC URL (env TRUSTCAP_CHAIN_RPC)")
    serve.add_argument("--deployment", type=Path, default=os.environ.get("TRUSTCAP_CHAIN_DEPLOYMENT"),
                       metavar="FILE", help="the contracts' deployment JSON (env TRUSTCAP_CHAIN_DEPLOYMENT)")
    serve.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                       help="address to listen on (port 0: a free one; default 127.0.0.1:0)")
    serve.set_defaults(func=_serve)


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--listen {text!r} is not HOST:PORT (e.g. 127.0.0.1:8480)")
    return host, int(port)


def load_key(path: Path) -> KeyPair:
    return KeyPair.load(path / SECRET_NAME if path.is_dir() else path)


def chain_view(rpc: str | None, deployment: Path | None) -> Any:
    """A read-only Escrow: the broker only reads the task and its attestations."""
    return open_escrow(rpc, deployment)


def _serve(args: argparse.Namespace) -> int:
    from trustcap.release.server import BrokerServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    host, port = parse_listen(args.listen)
    key = load_key(args.key)
    view = chain_view(args.rpc, args.deployment)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = BrokerServer(key, view, host=host, port=port)
    try:
        print(f"ready url={server.url}", flush=True)
        print(f"owner key 0x{key.public_key().hex()}", file=sys.stderr, flush=True)
        stop.wait()
    finally:
        server.close()
    return 0
