"""Base images built locally from Debian packages: no image registry is reachable from a gateway or CI.

`trustcap/base:bookworm` is Debian minbase with a POSIX shell and python3: the default image of
`trustcap exec` and the base of capsule function images. It is made with debootstrap against the
machine's own apt mirror, tarred with fixed owners and order, and imported into Docker. The tarball is
cached, so a wiped Docker Engine gets the image back in seconds.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from trustcap.errors import StackError
from trustcap.stack import paths, versions

__all__ = ["BASE_IMAGE", "PAUSE_IMAGE", "base_tarball", "ensure_base_image", "ensure_pause_image"]

BASE_IMAGE = f"trustcap/base:{versions.DEBIAN_SUITE}"
#: The node's pod sandbox image (`stack up --node`): registry.k8s.io/pause cannot be pulled here, and a
#: sandbox only has to hold the pod's namespaces open and exit on SIGTERM, which a shell with a trap does.
PAUSE_IMAGE = f"trustcap/pause:{versions.DEBIAN_SUITE}"
_PAUSE_ENTRYPOINT = ('ENTRYPOINT ["/bin/sh", "-c", '
                     '"trap \'exit 0\' TERM INT; while :; do sleep 3600 & wait $!; done"]')
_PACKAGES = ("python3-minimal",)
_DEFAULT_MIRROR = "http://deb.debian.org/debian"


def _mirror() -> str:
    """The machine's own Debian mirror (deb822 or one-line sources), so debootstrap reaches what apt does."""
    for src in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        m = re.search(r"^URIs:\s*(\S+)", src.read_text(), re.MULTILINE)
        if m and "security" not in m.group(1):
            return m.group(1)
    listing = Path("/etc/apt/sources.list")
    if listing.is_file():
        m = re.search(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", listing.read_text(), re.MULTILINE)
        if m:
            return m.group(1)
    return _DEFAULT_MIRROR


def base_tarball() -> Path:
    return paths.cache_dir() / "images" / f"base-{versions.DEBIAN_SUITE}.tar"


def _build_tarball(out: Path) -> None:
    if shutil.which("debootstrap") is None:
        raise StackError("debootstrap is not installed: run scripts/install-deps (apt-get install debootstrap)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="trustcap-rootfs-") as tmp:
        root = Path(tmp) / "rootfs"
        cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(_PACKAGES)}",
               versions.DEBIAN_SUITE, str(root), _mirror()]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise StackError(f"debootstrap failed (exit {proc.returncode}): {proc.stdout[-800:]}{proc.stderr[-800:]}")
        # Caches and docs are not part of any capsule's environment.
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                    "usr/share/locale", "var/log"):
            target = root / sub
            if target.is_dir():
                shutil.rmtree(target)
                target.mkdir()
        partial = out.with_suffix(".partial")
        tar = ["tar", "--sort=name", "--numeric-owner", "--owner=0", "--group=0", "-C", str(root), "-cf",
               str(partial), "."]
        proc = subprocess.run(tar, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise StackError(f"packing the base image failed: {proc.stderr.strip()}")
        partial.replace(out)


_ENV = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "ENV LANG=C.UTF-8"]


def _ensure_imported(image: str, changes: list[str], client: Any | None) -> str:
    import docker  # local: the core library does not need Docker to import this module
    from docker.errors import DockerException, ImageNotFound

    try:
        client = client or docker.from_env()
        try:
            client.images.get(image)
            return image
        except ImageNotFound:
            pass
        tarball = base_tarball()
        if not tarball.is_file():
            _build_tarball(tarball)
        repo, tag = image.split(":")
        with tarball.open("rb") as fh:
            client.api.import_image_from_data(fh.read(), repository=repo, tag=tag, changes=changes)
        client.images.get(image)
    except DockerException as exc:
        raise StackError(f"cannot build or import {image}: {exc}") from exc
    return image


def ensure_base_image(client: Any | None = None) -> str:
    """Make sure `trustcap/base:<suite>` exists in the Docker Engine; returns its tag."""
    return _ensure_imported(BASE_IMAGE, ['CMD ["/bin/sh"]', *_ENV], client)


def ensure_pause_image(client: Any | None = None) -> str:
    """Make sure the node's sandbox image `trustcap/pause:<suite>` exists in Docker; returns its tag."""
    return _ensure_imported(PAUSE_IMAGE, [_PAUSE_ENTRYPOINT, *_ENV], client)
