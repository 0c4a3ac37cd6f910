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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trustcap.errors import StackError
from trustcap.stack import paths, versions

__all__ = ["BASE_IMAGE", "PAUSE_IMAGE", "base_tarball", "debootstrap_argv", "debootstrap_rootfs", "ensure_base_image",
           "ensure_pause_image", "host_arch", "pack_rootfs"]

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


def host_arch() -> str:
    """The Debian name of this machine's architecture (amd64, arm64): the one debootstrap needs no emulator for."""
    proc = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise StackError("dpkg --print-architecture failed: base images are built on Debian (apt-get install dpkg)")
    return proc.stdout.strip()


def debootstrap_argv(root: Path, packages: Sequence[str], arch: str, mirror: str, *, foreign: bool) -> list[str]:
    """A foreign architecture gets only debootstrap's first stage (unpack); its second stage runs its own
    maintainer scripts, which needs the target's binaries to execute (qemu-user through binfmt_misc)."""
    return ["debootstrap", "--variant=minbase", f"--arch={arch}", *(["--foreign"] if foreign else []),
            f"--include={','.join(packages)}", versions.DEBIAN_SUITE, str(root), mirror]


def debootstrap_rootfs(root: Path, packages: Sequence[str], arch: str | None = None) -> None:
    """A Debian minbase tree at `root` with `packages`, for `arch` (default: this machine's), without caches
    or docs. A foreign architecture needs a binfmt_misc handler for it (`ensure_foreign_ready`)."""
    if shutil.which("debootstrap") is None:
        raise StackError("debootstrap is not installed: run scripts/install-deps (apt-get install debootstrap)")
    arch = arch or host_arch()
    foreign = arch != host_arch()
    cmd = debootstrap_argv(root, packages, arch, _mirror(), foreign=foreign)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise StackError(f"debootstrap failed (exit {proc.returncode}): {proc.stdout[-800:]}{proc.stderr[-800:]}")
    if foreign:
        proc = subprocess.run(["chroot", str(root), "/debootstrap/debootstrap", "--second-stage"],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            log = root / "debootstrap" / "debootstrap.log"
            tail = log.read_text(errors="replace")[-800:] if log.is_file() else proc.stderr[-800:]
            raise StackError(f"debootstrap's second stage for {arch} failed under qemu-user (exit "
                             f"{proc.returncode}): {tail}")
    # Caches and docs are not part of any capsule's environment.
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                "usr/share/locale", "var/log"):
        target = root / sub
        if target.is_dir():
            shutil.rmtree(target)
            target.mkdir()


def pack_rootfs(root: Path, out: Path) -> None:
    """Tar `root` with fixed owners and order (the same tree gives the same bytes), atomically to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    tar = ["tar", "--sort=name", "--numeric-owner", "--owner=0", "--group=0", "-C", str(root), "-cf",
           str(partial), "."]
    proc = subprocess.run(tar, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise StackError(f"packing the image tree {root} failed: {proc.stderr.strip()}")
    partial.replace(out)


def _build_tarball(out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="trustcap-rootfs-") as tmp:
        root = Path(tmp) / "rootfs"
        debootstrap_rootfs(root, _PACKAGES)
        pack_rootfs(root, out)


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
