"""`trustcap keys new --out DIR`: a key pair for a person or node (DIR/key mode 0600, DIR/key.pub)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from trustcap.capsule.keys import KeyPair


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("keys", help="make and show key pairs (secp256k1)")
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    new = sub.add_parser("new", help="write a new key pair: DIR/key (secret, 0600) and DIR/key.pub")
    new.add_argument("--out", required=True, type=Path, metavar="DIR")
    new.set_defaults(func=_new)


def _new(args: argparse.Namespace) -> int:
    pair = KeyPair.generate()
    secret, public = pair.save(args.out)
    print(f"secret key: {secret} (mode 0600)")
    print(f"public key: {public} 0x{pair.public_key().hex()}")
    print(f"address:    {pair.address}")
    return 0
