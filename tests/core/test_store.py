"""The content store: round trips, a store that lies is caught at the read, URLs name their backend.

FileStore runs on a real folder. KuboStore's own checks (our CID or a refusal, a tampered block, a blob
past one block) run against a small HTTP stand-in on 127.0.0.1 that answers as kubo's RPC does; the
real kubo round trip is e2e/stack/test_store_kubo_e2e.py.
"""

from __future__ import annotations

import http.server
import json
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trustcap import cid as cids
from trustcap.cid import CidError, CidMismatch
from trustcap.cli import main
from trustcap.store import MAX_BLOCK, FileStore, KuboStore, NotInStore, StoreError, default_file_root, open_store

DATA = b"sealed envelope bytes \x00\x01\x02" * 100


def test_file_round_trip_and_modes(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s")
    cid = store.put(DATA)
    assert cid == cids.compute(DATA)
    assert store.get(cid) == DATA
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "s" / cid).stat().st_mode) == 0o600
    assert store.put(DATA) == cid  # idempotent
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [cid]  # no partial files left behind


def test_file_empty_blob(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    assert store.get(store.put(b"")) == b""


def test_file_tampered_blob_is_refused(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    cid = store.put(DATA)
    (tmp_path / cid).write_bytes(DATA[:-1] + b"X")
    with pytest.raises(CidMismatch, match=f"store {store.url} .* do not match CID {cid}"):
        store.get(cid)
    assert store.put(DATA) == cid  # a damaged copy is written again
    assert store.get(cid) == DATA


def test_file_blob_under_another_cid_is_refused(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    other = cids.compute(b"what the owner sealed")
    (tmp_path / other).write_bytes(b"what an attacker put there")
    with pytest.raises(CidMismatch):
        store.get(other)


def test_file_missing(tmp_path: Path) -> None:
    with pytest.raises(NotInStore, match="holds no"):
        FileStore(tmp_path).get(cids.compute(b"never put"))


@pytest.mark.parametrize("bad", [
    pytest.param("../../etc/passwd", id="path-traversal"),
    pytest.param("QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG", id="cidv0"),
    pytest.param("", id="empty"),
])
def test_file_malformed_cid_reads_nothing(tmp_path: Path, bad: str) -> None:
    with pytest.raises(CidError):
        FileStore(tmp_path).get(bad)


def test_file_unwritable_root_names_the_fix(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match="writable folder"):
        FileStore(blocker / "s").put(DATA)


@pytest.mark.parametrize(("url", "kind", "where"), [
    pytest.param("file:///srv/ts", FileStore, "/srv/ts", id="file-abs"),
    pytest.param("file://localhost/srv/ts", FileStore, "/srv/ts", id="file-localhost"),
    pytest.param("kubo+http://127.0.0.1:5001", KuboStore, "http://127.0.0.1:5001", id="kubo"),
    pytest.param("kubo+http://127.0.0.1:5001/", KuboStore, "http://127.0.0.1:5001", id="kubo-slash"),
])
def test_open_store(url: str, kind: type, where: str) -> None:
    store = open_store(url)
    assert isinstance(store, kind)
    assert (str(store.root) if isinstance(store, FileStore) else store.api_url) == where


def test_open_store_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    store = open_store("file:")
    assert isinstance(store, FileStore) and store.root == tmp_path / "trustcap" / "store" == default_file_root()
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_file_root() == Path.home() / ".local" / "share" / "trustcap" / "store"


@pytest.mark.parametrize(("url", "message"), [
    pytest.param("", "a store URL is needed", id="empty"),
    pytest.param("/srv/ts", "not one we know", id="bare-path"),
    pytest.param("s3://bucket", "not one we know", id="s3"),
    pytest.param("file://otherhost/x", "three slashes", id="file-host"),
    pytest.param("file:relative", "three slashes", id="file-relative"),
    pytest.param("kubo+ftp://127.0.0.1:5001", "not http", id="kubo-ftp"),
    pytest.param("kubo+", "not http", id="kubo-nothing"),
])
def test_open_store_refuses(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        open_store(url)


# -- KuboStore's own checks, against an HTTP stand-in for kubo's RPC on 127.0.0.1 --------------------------

class _Kubo(http.server.BaseHTTPRequestHandler):
    """Answers add and block/get as kubo does; `server.mode` makes it lie in one way."""

    server: Any

    def log_message(self, *_: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.server.requests.append(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.startswith("/api/v0/add?"):
            _, _, rest = body.partition(b"\r\n\r\n")
            data = rest.rsplit(b"\r\n--", 1)[0]
            cid = cids.compute(data)
            if self.server.mode == "dag":
                cid = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"
            self.server.blocks[cid] = data
            self._send(200, json.dumps({"Name": "blob", "Hash": cid, "Size": str(len(data))}).encode() + b"\n")
        elif self.path.startswith("/api/v0/block/get?"):
            arg = self.path.split("arg=")[1].split("&")[0]
            if arg not in self.server.blocks:
                msg = {"Message": f"block was not found locally (offline): ipld: could not find {arg}", "Code": 0,
                       "Type": "error"}
                self._send(500, json.dumps(msg).encode())
                return
            data = self.server.blocks[arg]
            self._send(200, data + b"!" if self.server.mode == "tamper" else data)
        else:
            self._send(404, b"404 page not found")

    def _send(self, code: int, payload: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def kubo() -> Iterator[Any]:
    server: Any = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Kubo)
    server.mode, server.blocks, server.requests = "honest", {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _kubo_url(server: Any) -> str:
    return f"kubo+http://127.0.0.1:{server.server_address[1]}"


def test_kubo_round_trip_asks_for_raw_cidv1(kubo: Any) -> None:
    store = open_store(_kubo_url(kubo))
    cid = store.put(DATA)
    assert cid == cids.compute(DATA)
    assert store.get(cid) == DATA
    add = kubo.requests[0]
    for param in ("cid-version=1", "raw-leaves=true", "pin=true", f"chunker=size-{MAX_BLOCK}"):
        assert param in add
    assert "offline=true" in kubo.requests[1]


def test_kubo_answering_another_cid_is_refused(kubo: Any) -> None:
    kubo.mode = "dag"
    with pytest.raises(StoreError, match="not as its CID"):
        open_store(_kubo_url(kubo)).put(DATA)


def test_kubo_tampered_block_is_refused(kubo: Any) -> None:
    store = open_store(_kubo_url(kubo))
    cid = store.put(DATA)
    kubo.mode = "tamper"
    with pytest.raises(CidMismatch, match=cid):
        store.get(cid)


def test_kubo_missing_block(kubo: Any) -> None:
    with pytest.raises(NotInStore, match="not found locally"):
        open_store(_kubo_url(kubo)).get(cids.compute(b"never put"))


def test_kubo_refuses_more_than_one_block_before_sending(kubo: Any) -> None:
    store = open_store(_kubo_url(kubo))
    assert store.put(b"x" * MAX_BLOCK) == cids.compute(b"x" * MAX_BLOCK)  # exactly one block: fine
    kubo.requests.clear()
    with pytest.raises(StoreError, match="do not fit one kubo block"):
        store.put(b"x" * (MAX_BLOCK + 1))
    assert kubo.requests == []


def test_kubo_unreachable_names_the_daemon(kubo: Any) -> None:
    port = kubo.server_address[1]
    kubo.shutdown()
    kubo.server_close()
    with pytest.raises(StoreError, match=r"cannot reach kubo .*ipfs daemon"):
        KuboStore(f"http://127.0.0.1:{port}", timeout=5).get(cids.compute(b"x"))


# -- the CLI -----------------------------------------------------------------------------------------------

def test_cli_put_get(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(DATA)
    url = (tmp_path / "s").as_uri()
    assert main(["store", "put", str(src), "--store", url]) == 0
    cid = capsys.readouterr().out.strip()
    assert cid == cids.compute(DATA)
    assert main(["store", "get", cid, "--store", url, "-o", str(out)]) == 0
    assert out.read_bytes() == DATA
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_cli_get_tampered_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = FileStore(tmp_path / "s")
    cid = store.put(DATA)
    (tmp_path / "s" / cid).write_bytes(b"swapped")
    out = tmp_path / "out.bin"
    assert main(["store", "get", cid, "--store", store.url, "-o", str(out)]) == 1
    assert "do not match CID" in capsys.readouterr().err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["s"]
