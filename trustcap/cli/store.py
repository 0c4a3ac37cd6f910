"""`trustcap store put|get`: blobs in and out of the content store by CID (trustcap/store.py).

    trustcap store put FILE [--store URL]            prints the CID
    trustcap store get CID [--store URL] [-o FILE]   writes the content (checked against the CID) to FILE or stdout

URL is file: (default), file:///path or kubo+http://127.0.0.1:5001; env TRUSTCAP_STORE sets the default.
`get -o FILE` writes a temporary file beside FILE and renames it once the content matched its CID.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from trustcap.store import DEFAULT_URL, StoreError, open_store


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("store", help="put blobs into the content store and get them back by CID")
    sub = parser.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    default = os.environ.get("TRUSTCAP_STORE", DEFAULT_URL)
    help_url = "file:, file:///path or kubo+http://HOST:PORT (env TRUSTCAP_STORE, default file:)"

    put = sub.add_parser("put", help="store a file; prints its CID")
    put.add_argument("file", type=Path, metavar="FILE")
    put.add_argument("--store", default=default, metavar="URL", help=help_url)
    put.set_defaults(func=_put)

    get = sub.add_parser("get", help="fetch a blob by CID; refused unless it matches the CID")
    get.add_argument("cid", metavar="CID")
    get.add_argument("--store", default=default, metavar="URL", help=help_url)
    get.add_argument("-o", "--out", type=Path, metavar="FILE", help="write here (default: stdout)")
    get.set_defaults(func=_get)


def _put(args: argparse.Namespace) -> int:
    try:
        data = args.file.read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot read {args.file}: {exc.strerror or exc}") from exc
    print(open_store(args.store).put(data))
    return 0


def _get(args: argparse.Namespace) -> int:
    data = open_store(args.store).get(args.cid)
    if args.out is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return 0
    out: Path = args.out
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, out)
    except OSError as exc:
        raise StoreError(f"cannot write {out}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return 0
