"""The boot image recipe: the initramfs writer is deterministic and valid newc, and the whole image built
twice from the same Debian inputs has the same digests."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

from trustcap.netboot.image.builder import BuildInputs, build_image, ensure_debs
from trustcap.netboot.image.cpio import Entry, pack
from trustcap.netboot.ipxe import boot_digest, render_script

ENTRIES = [Entry("bin", "dir"), Entry("init", "file", b"#!/bin/sh\necho hi\n"), Entry("bin/sh", "symlink", b"busybox"),
           Entry("dev", "dir"), Entry("dev/console", "chardev", mode=0o600, rdev=(5, 1))]


def test_pack_is_order_independent_and_timestamp_free() -> None:
    a = pack(ENTRIES, 1700000000)
    assert a == pack(list(reversed(ENTRIES)), 1700000000)
    assert a != pack(ENTRIES, 1700000001)  # the epoch is an input, nothing else is
    assert gzip.decompress(a)[:6] == b"070701"


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio not installed")
def test_pack_is_valid_newc(tmp_path: Path) -> None:
    raw = gzip.decompress(pack(ENTRIES, 1700000000))
    out = subprocess.run(["cpio", "-itv"], input=raw, capture_output=True, timeout=10, check=True)
    listing = out.stdout.decode()
    for name in ("bin", "bin/sh -> busybox", "dev/console", "init"):
        assert name in listing


def test_duplicate_paths_are_an_error() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        pack([Entry("a", "dir"), Entry("a", "dir")], 0)


def test_script_carries_digest_gateway_and_dhcp_token() -> None:
    bd = boot_digest(b"\x01" * 32, b"\x02" * 32, "console=ttyS0")
    text = render_script(8080, "vmlinuz", "initrd.img", "console=ttyS0", bd)
    assert text.startswith("#!ipxe\n")
    assert "kernel http://${next-server}:8080/vmlinuz console=ttyS0 trustcap.netboot=${next-server}:8080 " \
           "trustcap.gateway=${227:string} trustcap.token=${224:string} trustcap.node=${225:string} " \
           f"trustcap.gatewayaddr=${{226:string}} trustcap.bootdigest={bd} || goto failed" in text
    assert "10.77" not in text  # no gateway is named: one approved image for every gateway
    assert bd != boot_digest(b"\x01" * 32, b"\x03" * 32, "console=ttyS0")


@pytest.mark.slow
def test_same_inputs_same_digests(tmp_path: Path) -> None:
    try:
        debs = ensure_debs()
    except Exception as exc:  # no apt reachable and nothing cached
        print(f"SKIP reproducibility: Debian packages unavailable: {exc}")
        pytest.skip(f"Debian packages unavailable: {exc}")
    inputs = BuildInputs(debs=debs, source_date_epoch=1700000000)
    a = build_image(inputs, tmp_path / "a", use_cache=False)
    b = build_image(inputs, tmp_path / "b", use_cache=False)
    assert a.digests == b.digests and a.bootdigest == b.bootdigest
    for name in a.digests:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    c = build_image(BuildInputs(debs=debs, source_date_epoch=1700000001),
                    tmp_path / "c", use_cache=False)
    assert c.digests["initrd.img"] != a.digests["initrd.img"]  # a real input changes the digest
    assert c.digests["vmlinuz"] == a.digests["vmlinuz"]


def test_pack_adds_missing_parent_folders() -> None:
    raw = gzip.decompress(pack([Entry("a/b/c", "file", b"x")], 0))
    names = [n for n in (b"a\0", b"a/b\0", b"a/b/c\0") if n in raw]
    assert len(names) == 3
    assert raw.index(b"a/b\0") < raw.index(b"a/b/c\0")


@pytest.mark.slow
def test_agent_image_is_reproducible_and_carries_the_agent(tmp_path: Path) -> None:
    try:
        debs = ensure_debs()
    except Exception as exc:
        print(f"SKIP reproducibility: Debian packages unavailable: {exc}")
        pytest.skip(f"Debian packages unavailable: {exc}")
    inputs = BuildInputs(debs=debs, with_agent=True)
    a = build_image(inputs, tmp_path / "a", use_cache=False)
    b = build_image(inputs, tmp_path / "b", use_cache=False)
    assert a.digests == b.digests
    listing = subprocess.run(["cpio", "-it"], input=gzip.decompress((tmp_path / "a" / "initrd.img").read_bytes()),
                             capture_output=True, timeout=60, check=True).stdout.decode()
    names = set(listing.split())
    for needed in ("init", "usr/bin/python3.11", "lib64/ld-linux-x86-64.so.2",
                   "usr/lib/python3/dist-packages/trustcap/agent/__main__.py",
                   "usr/lib/python3/dist-packages/trustcap/evidence/__init__.py",
                   "usr/lib/python3/dist-packages/cryptography/__init__.py",
                   "usr/lib/python3/dist-packages/docker/__init__.py"):  # imported lazily by the agent
        assert needed in names, needed
    assert not any("__pycache__" in n or n.startswith("usr/share/doc") for n in names)
    assert not any(n.startswith("usr/lib/python3/dist-packages/trustcap/cli") for n in names)
