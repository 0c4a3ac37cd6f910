"""`trustcap seal` and `trustcap open`: seal a file to recipients' public keys, open it with a secret key.

    trustcap seal --to PUBKEY_FILE [--to ...] --in FILE --out FILE [--key OWNER_KEY] [--capsule-id HEX]
                  [--manifest-digest HEX]
    trustcap open --key SECRET_KEY_FILE --in FILE --out FILE --owner PUBKEY_FILE [--capsule-id HEX]
                  [--manifest-digest HEX]

Without --key the envelope is signed by a one-off key: it still proves the file was not altered, but not
who sealed it, and `open` (which always names --owner) refuses it. Without --capsule-id / --manifest-digest the
envelope is bound to all-zero ids ("not bound to a capsule"). The output is written to a temporary file
beside --out and renamed only when everything checked out, so a failure never leaves partial plaintext.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from trustcap.capsule import envelope
from trustcap.capsule.errors import CapsuleError
from trustcap.capsule.keys import KeyPair, load_public_key
from trustcap.errors import ConfigError


def register(subparsers: Any) -> None:
    seal = subparsers.add_parser("seal", help="seal a file to one or more recipients' public keys")
    seal.add_argument("--to", required=True, action="append", type=Path, metavar="PUBKEY_FILE",
                      help="a recipient's key.pub (repeat for several recipients)")
    seal.add_argument("--in", dest="src", required=True, type=Path, metavar="FILE")
    seal.add_argument("--out", required=True, type=Path, metavar="FILE")
    seal.add_argument("--key", type=Path, metavar="SECRET_KEY_FILE", help="the owner's key that signs the envelope")
    _binding(seal)
    seal.set_defaults(func=_seal)

    opener = subparsers.add_parser("open", help="open a sealed file with your secret key")
    opener.add_argument("--key", required=True, type=Path, metavar="SECRET_KEY_FILE")
    opener.add_argument("--in", dest="src", required=True, type=Path, metavar="FILE")
    opener.add_argument("--out", required=True, type=Path, metavar="FILE")
    opener.add_argument("--owner", required=True, type=Path, metavar="PUBKEY_FILE",
                        help="the owner's key.pub: an envelope not signed by this owner is refused")
    _binding(opener)
    opener.set_defaults(func=_open)


def _binding(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--capsule-id", metavar="HEX", help="32-byte capsule id the envelope is bound to")
    parser.add_argument("--manifest-digest", metavar="HEX", help="32-byte manifest digest the envelope is bound to")


def _id(value: str | None, flag: str) -> bytes | None:
    if value is None:
        return None
    try:
        raw = bytes.fromhex(value[2:] if value.startswith("0x") else value)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"{flag} must be 32 bytes of hex (64 digits)")
    return raw


def _tmp(out: Path) -> Path:
    return out.with_name(f".{out.name}.{os.getpid()}.partial")


def _seal(args: argparse.Namespace) -> int:
    recipients = [load_public_key(p) for p in args.to]
    owner = KeyPair.load(args.key) if args.key else KeyPair.generate()
    capsule_id = _id(args.capsule_id, "--capsule-id") or bytes(32)
    manifest_digest = _id(args.manifest_digest, "--manifest-digest") or bytes(32)
    tmp = _tmp(args.out)
    try:
        with args.src.open("rb") as src, tmp.open("wb") as dst:
            envelope.seal_stream(src, dst, length=os.fstat(src.fileno()).st_size, recipients=recipients,
                                 owner=owner, capsule_id=capsule_id, manifest_digest=manifest_digest)
        os.replace(tmp, args.out)
    except OSError as exc:
        raise CapsuleError(f"cannot seal {args.src} to {args.out}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return 0


def _open(args: argparse.Namespace) -> int:
    key = KeyPair.load(args.key)
    owner = load_public_key(args.owner)
    tmp = _tmp(args.out)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with args.src.open("rb") as src, os.fdopen(fd, "wb") as dst:
            envelope.open_stream(src, dst, key=key, owner=owner,
                                 capsule_id=_id(args.capsule_id, "--capsule-id") or bytes(32),
                                 manifest_digest=_id(args.manifest_digest, "--manifest-digest") or bytes(32))
        os.replace(tmp, args.out)
    except OSError as exc:
        raise CapsuleError(f"cannot open {args.src} into {args.out}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return 0
