"""The content store on a real kubo: a private, offline node (`ipfs init --profile test`, `ipfs daemon
--offline`, API on 127.0.0.1, no swarm). The `ipfs` binary is $TRUSTCAP_IPFS, else the stack's tool cache
(where `make stack` puts the tools it builds), else PATH; without one the tests skip saying so.

kubo's own `ipfs add --cid-version 1 --raw-leaves` names a one-block blob with our CID (so an owner may
add with kubo's CLI and name the CID in the Capsule spec), and past one block names a DAG root instead,
which is why KuboStore refuses such blobs. A block changed on kubo's disk, or a CID with a changed
character, is refused at the read.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from trustcap import cid as cids
from trustcap.cid import CidError, CidMismatch
from trustcap.cli import main
from trustcap.stack import paths
from trustcap.store import MAX_BLOCK, KuboStore, NotInStore, StoreError, open_store


def _ipfs() -> Path:
    env = os.environ.get("TRUSTCAP_IPFS")
    if env:
        return Path(env)
    cached = paths.bin_dir() / "ipfs"
    if cached.is_file():
        return cached
    found = shutil.which("ipfs")
    return Path(found) if found else cached


IPFS = _ipfs()
NO_KUBO = (f"kubo's `ipfs` binary is not at {IPFS}, nor on PATH: `make stack` builds the stack's tools into "
           f"{paths.bin_dir()} (kubo through the wrapper module tools/kubo), or set TRUSTCAP_IPFS=/path/to/ipfs")


class Kubo:
    def __init__(self, root: Path) -> None:
        self.env = dict(os.environ, IPFS_PATH=str(root / "ipfs"))
        self.root = root / "ipfs"
        self.log = root / "kubo.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def ipfs(self, *args: str, data: bytes | None = None) -> str:
        proc = subprocess.run([str(IPFS), *args], input=data, capture_output=True, env=self.env, timeout=60,
                              check=False)
        assert proc.returncode == 0, f"ipfs {' '.join(args)} failed: {proc.stderr.decode()}"
        return proc.stdout.decode().strip()

    def start(self) -> Kubo:
        self.ipfs("init", "--profile", "test")  # API, gateway, swarm on 127.0.0.1 port 0; no bootstrap, no mDNS
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([str(IPFS), "daemon", "--offline"], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"ipfs daemon exited {self.proc.returncode}:\n{self.log.read_text()}")
            api = self.root / "api"
            if api.is_file():
                parts = api.read_text().strip().split("/")  # /ip4/127.0.0.1/tcp/PORT
                url = f"http://{parts[2]}:{parts[4]}"
                try:
                    req = urllib.request.Request(url + "/api/v0/version", data=b"", method="POST")  # noqa: S310
                    with urllib.request.urlopen(req, timeout=2):  # noqa: S310 - our own loopback daemon
                        self.url = url
                        return self
                except OSError:
                    pass
            time.sleep(0.2)
        pytest.fail(f"ipfs daemon did not answer within 60 s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def kubo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kubo]:
    if not IPFS.is_file():
        pytest.skip(NO_KUBO)
    k = Kubo(tmp_path_factory.mktemp("kubo")).start()
    assert k.url.startswith("http://127.0.0.1:"), f"the test kubo must listen on loopback only, not {k.url}"
    yield k
    k.stop()


def test_round_trip_with_kubos_own_cid(kubo: Kubo, tmp_path: Path) -> None:
    store = open_store("kubo+" + kubo.url)
    for data in (b"", b"a sealed input", os.urandom(300 * 1024), os.urandom(MAX_BLOCK)):
        cid = store.put(data)
        assert cid == cids.compute(data)
        assert store.get(cid) == data
        src = tmp_path / "blob"
        src.write_bytes(data)
        # kubo's own CLI, as an owner would use it, names the same block
        assert kubo.ipfs("add", "--cid-version", "1", "--raw-leaves", "--chunker", f"size-{MAX_BLOCK}",
                         "-Q", str(src)) == cid
        assert kubo.ipfs("pin", "ls", "--type", "recursive", cid).startswith(cid)


def test_past_one_block_kubo_names_a_dag_so_we_refuse(kubo: Kubo, tmp_path: Path) -> None:
    data = os.urandom(MAX_BLOCK + 1)
    src = tmp_path / "big"
    src.write_bytes(data)
    theirs = kubo.ipfs("add", "--cid-version", "1", "--raw-leaves", "--chunker", f"size-{MAX_BLOCK}", "-Q", str(src))
    assert theirs != cids.compute(data) and theirs.startswith("bafybei")  # dag-pb root, not the raw block
    with pytest.raises(StoreError, match="do not fit one kubo block"):
        open_store("kubo+" + kubo.url).put(data)


def test_block_changed_on_kubos_disk_is_refused(kubo: Kubo) -> None:
    data = b"owner B's sealed list " + os.urandom(64)
    store = open_store("kubo+" + kubo.url)
    cid = store.put(data)
    files = [p for p in (kubo.root / "blocks").rglob("*.data") if p.read_bytes() == data]
    assert len(files) == 1, "the test profile keeps blocks as flatfs files"
    files[0].write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CidMismatch, match=f"do not match CID {cid}"):
        store.get(cid)


def test_changed_cid_is_refused(kubo: Kubo) -> None:
    store = open_store("kubo+" + kubo.url)
    cid = store.put(b"the real content")
    digest = bytearray(cids.parse(cid).digest)
    digest[0] ^= 1
    other = str(cids.ContentId(bytes(digest)))
    with pytest.raises(NotInStore, match=other):
        store.get(other)
    with pytest.raises(CidError):
        store.get(cid[:-1] + ("a" if cid[-1] != "a" else "b") + "x")


def test_cli_put_get_on_kubo(kubo: Kubo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.write_bytes(b"through the CLI")
    assert main(["store", "put", str(src), "--store", "kubo+" + kubo.url]) == 0
    cid = capsys.readouterr().out.strip()
    assert main(["store", "get", cid, "--store", "kubo+" + kubo.url, "-o", str(out)]) == 0
    assert out.read_bytes() == b"through the CLI"


def test_stopped_kubo_is_a_clear_error(tmp_path_factory: pytest.TempPathFactory) -> None:
    if not IPFS.is_file():
        pytest.skip(NO_KUBO)
    k = Kubo(tmp_path_factory.mktemp("kubo-stopped")).start()
    url = k.url
    k.stop()
    with pytest.raises(StoreError, match="cannot reach kubo"):
        KuboStore(url, timeout=5).get(cids.compute(b"x"))
