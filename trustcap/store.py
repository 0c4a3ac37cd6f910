"""The content store: sealed inputs and sealed results, named by their CID and checked on every read.

Why a CID and a check on `get`: the Capsule spec names each input by CID (trustcap/cid.py: CIDv1, raw,
sha2-256), and the store is not trusted. Whatever a store returns is hashed again before anyone sees it,
so a store that swaps, truncates or corrupts a blob is caught at the read, naming the CID and the store.

    caller            Store                       backend
      | put(data) ----->| cid = compute(data)        |
      |                 |--- write / POST add ------>| file: temp file + rename, 0600
      |                 |<-- the backend's CID ------| kubo: must be exactly our CID (else StoreError)
      |<-- cid ---------|                            |
      | get(cid) ------>| parse(cid) (strict)        |
      |                 |--- read / POST block/get ->|
      |                 |<-- bytes ------------------|
      |<-- bytes -------| verify(cid, bytes)         | CidMismatch names the CID and the store

Two backends, chosen by URL (`open_store`):

- `file:///path` (or `file:` for `$XDG_DATA_HOME/trustcap/store`, default ~/.local/share/trustcap/store):
  one file per CID, written whole (trustcap.atomicfile: temporary file, fsync, rename), mode 0600
  in a 0700 folder.
- `kubo+http://127.0.0.1:5001`: kubo's HTTP RPC. `put` is `POST /api/v0/add?cid-version=1&raw-leaves=true
  &pin=true&chunker=size-1048576`; `get` is `POST /api/v0/block/get?arg=CID`.

  Larger data (chunk-limited, not recomputed): kubo's `add` returns a raw leaf, whose CID is ours, only
  while the data fits in one chunk. Past the chunk size kubo builds a dag-pb tree and returns the CID of
  its root (codec 0x70), which is not the CID of the bytes and which `block/get` would answer with a
  protobuf node, not the data. The chunker is set to 1 MiB, a chunk size every kubo release accepts
  (boxo has capped chunks at 1 MiB; bitswap's block limit is 2 MiB), and `KuboStore.put` refuses data
  above `MAX_BLOCK` before sending anything: a bigger blob goes in a file: store. Every put also checks
  that kubo answered our CID, so a kubo that chunks differently is caught, not trusted.

Errors:

    TrustcapError
    ├── StoreError                the store cannot be opened, reached or written; names the URL and the fix
    │   └── NotInStore            the store answers but does not hold the CID
    └── CidError (trustcap.cid)   the CID string is malformed
        └── CidMismatch           the store returned bytes that are not the CID's content
"""

from __future__ import annotations

import json
import os
import secrets
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Protocol

from trustcap import cid as cids
from trustcap.atomicfile import write_atomic
from trustcap.errors import TrustcapError

__all__ = ["DEFAULT_URL", "MAX_BLOCK", "FileStore", "KuboStore", "NotInStore", "Store", "StoreError",
           "default_file_root", "open_store"]

DEFAULT_URL = "file:"
#: the chunk size we ask kubo for: the largest blob whose kubo CID is the CID of its bytes.
MAX_BLOCK = 1 << 20
_KUBO_TIMEOUT = 60.0
_MAX_ERROR_BODY = 16 * 1024


class StoreError(TrustcapError):
    """The store cannot be opened, reached or written; the message names the store URL and the fix."""


class NotInStore(StoreError):
    """The store answered, and it does not hold this CID."""


class Store(Protocol):
    """What the operator, gateways and parties use; `get` returns only bytes that match the CID. (Both
    backends also have `url`, the URL `open_store` opens them from again.)"""

    def put(self, data: bytes) -> str: ...

    def get(self, cid: str) -> bytes: ...


def _checked(url: str, cid: str, data: bytes) -> bytes:
    try:
        cids.verify(cid, data)
    except cids.CidMismatch:
        raise cids.CidMismatch(f"store {url} returned {len(data)} bytes that do not match CID {cid}: the store "
                               "is corrupt or was tampered with; do not use this content") from None
    return data


def default_file_root() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "trustcap" / "store"


class FileStore:
    """One file per CID under `root`. The folder is made 0700, each blob 0600: sealed blobs are not
    secret, but results name their recipients and nobody else needs to list them."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def url(self) -> str:
        return self.root.resolve().as_uri()

    def _path(self, cid: str) -> Path:
        return self.root / str(cids.parse(cid))  # parse first: a CID is base32 only, never a path

    def put(self, data: bytes) -> str:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"put takes bytes, not {type(data).__name__}")
        data = bytes(data)
        cid = cids.compute(data)
        path = self._path(cid)
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            if path.is_file() and path.stat().st_size == len(data):
                try:
                    _checked(self.url, cid, path.read_bytes())
                    return cid  # already here, and whole
                except cids.CidMismatch:
                    pass  # a damaged copy: write it again
            write_atomic(path, data, mode=0o600)
        except OSError as exc:
            raise StoreError(f"cannot write {cid} to store {self.url}: {exc.strerror or exc} (check that "
                             f"{self.root} is a writable folder, or pass another --store)") from exc
        return cid

    def get(self, cid: str) -> bytes:
        path = self._path(cid)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotInStore(f"store {self.url} holds no {cid} (was it put into another store?)") from None
        except OSError as exc:
            raise StoreError(f"cannot read {cid} from store {self.url}: {exc.strerror or exc}") from exc
        return _checked(self.url, cid, data)


class KuboStore:
    """kubo's HTTP RPC at `api_url` (http://HOST:PORT, the daemon's API address, not its gateway)."""

    def __init__(self, api_url: str, *, timeout: float = _KUBO_TIMEOUT) -> None:
        parsed = urllib.parse.urlsplit(api_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise StoreError(f"kubo API URL {api_url!r} is not http(s)://HOST:PORT (e.g. kubo+http://127.0.0.1:5001)")
        self.api_url = api_url.rstrip("/")
        self.timeout = timeout

    @property
    def url(self) -> str:
        return "kubo+" + self.api_url

    def _rpc(self, command: str, params: dict[str, str], body: bytes | None = None,
             content_type: str | None = None, limit: int = _MAX_ERROR_BODY) -> bytes:
        query = urllib.parse.urlencode(params)
        req = urllib.request.Request(f"{self.api_url}/api/v0/{command}?{query}", data=body or b"",  # noqa: S310 - http(s) checked in __init__
                                     method="POST")
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 - the store URL we were given
                raw: bytes = resp.read(limit + 1)
        except urllib.error.HTTPError as exc:
            message = _kubo_message(exc.read(_MAX_ERROR_BODY))
            if command == "block/get" and ("not found" in message or "could not find" in message):
                raise NotInStore(f"store {self.url} holds no {params.get('arg')}: {message}") from None
            raise StoreError(f"kubo at {self.api_url} refused {command}: HTTP {exc.code} {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise StoreError(f"cannot reach kubo at {self.api_url} ({command}): {reason} (is `ipfs daemon` "
                             "running with this API address? `ipfs config Addresses.API` shows it)") from None
        if len(raw) > limit:
            raise StoreError(f"kubo at {self.api_url} answered {command} with more than {limit} bytes")
        return raw

    def put(self, data: bytes) -> str:
        data = bytes(data)
        if len(data) > MAX_BLOCK:
            raise StoreError(f"{len(data)} bytes do not fit one kubo block of {MAX_BLOCK} bytes; past one block "
                             f"kubo's CID is a DAG root, not the CID of the data; use a file: store for this blob")
        cid = cids.compute(data)
        boundary = "trustcap-" + secrets.token_hex(16)
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"blob\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        raw = self._rpc("add", {"cid-version": "1", "raw-leaves": "true", "pin": "true", "chunker": f"size-{MAX_BLOCK}",
                                "hash": "sha2-256", "quieter": "true"},
                        body, f"multipart/form-data; boundary={boundary}")
        answered = _added_hash(raw, self.api_url)
        if answered != cid:
            raise StoreError(f"kubo at {self.api_url} stored the data as {answered}, not as its CID {cid}: this kubo "
                             "does not keep raw single blocks as asked (cid-version=1, raw-leaves=true)")
        return cid

    def get(self, cid: str) -> bytes:
        text = str(cids.parse(cid))
        # offline: a block this node does not hold is an answer at once, never a search of the network
        data = self._rpc("block/get", {"arg": text, "offline": "true"}, limit=MAX_BLOCK)
        return _checked(self.url, text, data)


def _kubo_message(raw: bytes) -> str:
    try:
        doc = json.loads(raw)
        if isinstance(doc, dict) and isinstance(doc.get("Message"), str):
            return str(doc["Message"])
    except ValueError:
        pass
    return raw.decode("utf-8", "replace").strip()[:300]


def _added_hash(raw: bytes, api_url: str) -> str:
    """The Hash of the last JSON line of an `add` answer (kubo streams one object per file)."""
    lines = [line for line in raw.decode("utf-8", "replace").splitlines() if line.strip()]
    try:
        doc: Any = json.loads(lines[-1])
        return str(doc["Hash"])
    except (IndexError, ValueError, KeyError, TypeError):
        raise StoreError(f"kubo at {api_url} answered add without a Hash: {raw[:200]!r}") from None


def open_store(url: str) -> FileStore | KuboStore:
    """A store from its URL: `file:` (the default folder), `file:///abs/path`, or `kubo+http://HOST:PORT`."""
    if not isinstance(url, str) or not url:
        raise StoreError("a store URL is needed: file:, file:///path or kubo+http://127.0.0.1:5001")
    if url.startswith("kubo+"):
        return KuboStore(url[len("kubo+"):])
    if url == "file:":
        return FileStore(default_file_root())
    if url.startswith("file:"):
        parsed = urllib.parse.urlsplit(url)
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/") or parsed.query:
            raise StoreError(f"store URL {url!r} is not file:///ABSOLUTE/PATH (three slashes, an absolute path)")
        return FileStore(Path(urllib.parse.unquote(parsed.path)))
    raise StoreError(f"store URL {url!r} is not one we know: use file: (default folder {default_file_root()}), "
                     "file:///path or kubo+http://127.0.0.1:5001")
