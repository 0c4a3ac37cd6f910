"""The chart's component images, built for real: debootstrap from the apt mirror, wheels from PyPI, loaded
into the local Docker Engine; the arm64 build runs under qemu-user-static through binfmt_misc.

SLOW on a first run. Measured on the 2-core lab machine (shared): amd64 and arm64 from an empty cache
took 20 min 39 s (amd64 about 4.5 min; arm64 about 16 min, most of it debootstrap's second stage under
qemu); after a source change, which rebuilds only the wheel and the layers, about 2 min; with nothing
changed 2.4 s. The suite itself adds about 3 min (the arm64 entrypoints run under emulation). Nothing here
is skipped: a missing prerequisite (root, debootstrap, Docker, a binfmt_misc handler for aarch64) fails
with the command that fixes it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trustcap.stack import component_images as ci
from trustcap.stack import images, paths

pytestmark = [pytest.mark.slow, pytest.mark.timeout(5400)]

ARCHES = ["amd64", "arm64"]
ELF_MACHINE = {"amd64": 0x3E, "arm64": 0xB7}  # e_machine of the tree's interpreter


def _prerequisites() -> None:
    if os.geteuid() != 0:
        pytest.fail("component images need root (debootstrap, chroot): run the e2e suite as root")
    for cmd, pkg in (("debootstrap", "debootstrap"), ("docker", "docker.io"), ("chroot", "coreutils")):
        if shutil.which(cmd) is None:
            pytest.fail(f"{cmd} is missing: apt-get install {pkg}")
    if images.host_arch() != "amd64":
        pytest.fail(f"this suite builds amd64 natively and arm64 under qemu; this machine is {images.host_arch()}")
    if problem := ci.binfmt_problem("arm64"):
        pytest.fail(problem)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot of the sources: the wheel is keyed by them, and the working tree may change while the
    suite runs (an editor, another checkout step), which would rightly rebuild between the two builds."""
    repo, snap = paths.repo_root(), tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(repo / name, snap / name)
    for d in sorted(set(tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
                        ["package-dir"].values())):
        shutil.copytree(repo / d, snap / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return snap


@pytest.fixture(scope="module")
def built(source: Path) -> dict[str, ci.BuiltArch]:
    _prerequisites()
    start = time.monotonic()
    result = {b.arch: b for b in ci.build(ARCHES, root=source)}
    print(f"\ncomponent images, amd64 + arm64: {time.monotonic() - start:.1f}s")
    return result


@pytest.fixture(scope="module")
def docker_client() -> Any:
    import docker

    return docker.from_env(timeout=900)


def _layer(arch: str) -> Path:
    found = sorted((ci._cache()).glob(f"layer-{ci.package_version()}-{arch}-*.tar"), key=lambda p: p.stat().st_mtime)
    assert found, f"no {arch} layer in the cache after the build"
    return found[-1]


@pytest.fixture(scope="module")
def trees(built: dict[str, ci.BuiltArch]) -> Iterator[dict[str, Path]]:
    with tempfile.TemporaryDirectory(prefix="trustcap-e2e-trees-") as tmp:
        out = {}
        for arch in ARCHES:
            root = Path(tmp) / arch
            root.mkdir()
            subprocess.run(["tar", "-xf", str(_layer(arch)), "-C", str(root)], check=True)
            out[arch] = root
        yield out


def _docker(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("component", sorted(ci.COMPONENTS))
def test_amd64_image_runs_its_entrypoint(built: dict[str, ci.BuiltArch], docker_client: Any, component: str) -> None:
    version = ci.package_version()
    image = docker_client.images.get(f"trustcap/{component}:{version}")
    latest = docker_client.images.get(f"trustcap/{component}:latest")
    assert image.id == latest.id == built["amd64"].image_ids[component]
    assert image.attrs["Architecture"] == "amd64"
    assert image.attrs["Config"]["Entrypoint"] == ci.entrypoint(component)
    proc = _docker("run", "--rm", "--read-only", f"trustcap/{component}:{version}", "--help")
    assert proc.returncode == 0, proc.stderr
    assert f"python -m trustcap.{component}" in proc.stdout or "usage:" in proc.stdout


@pytest.mark.parametrize("component", sorted(ci.COMPONENTS))
def test_image_has_the_tools_its_component_runs(built: dict[str, ci.BuiltArch], component: str) -> None:
    """The apt packages are really in the image: each component's commands resolve on its PATH."""
    tools = {"gateway": ["nft", "ip", "sysctl", "nsenter"], "netboot": ["dnsmasq"], "operator": []}[component]
    for tool in tools:
        proc = _docker("run", "--rm", "--entrypoint", "/bin/sh", f"trustcap/{component}:{ci.package_version()}",
                       "-c", f"command -v {tool}")
        assert proc.returncode == 0, f"{tool} missing in trustcap/{component}: {proc.stderr}"


@pytest.mark.parametrize("arch", ARCHES)
def test_tree_is_that_architecture_and_its_python_runs(trees: dict[str, Path], arch: str) -> None:
    """In the arm64 tree, the interpreter is an aarch64 ELF and reports aarch64 (qemu-user runs it); the amd64
    tree is the control: same check, x86_64."""
    root = trees[arch]
    python = (root / "usr/bin").joinpath(os.readlink(root / "usr/bin/python3"))
    header = python.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == ELF_MACHINE[arch]
    proc = subprocess.run(["chroot", str(root), "/opt/trustcap/venv/bin/python", "-c",
                           "import trustcap, platform; print(platform.machine())"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ci.ARCHES[arch].machine


@pytest.mark.parametrize("component", sorted(ci.COMPONENTS))
def test_arm64_image_runs_its_entrypoint_under_qemu(built: dict[str, ci.BuiltArch], docker_client: Any,
                                                     component: str) -> None:
    tag = f"trustcap/{component}:{ci.package_version()}-arm64"
    image = docker_client.images.get(tag)
    assert image.id == built["arm64"].image_ids[component]
    assert (image.attrs["Architecture"], image.attrs.get("Variant")) == ("arm64", "v8")
    proc = _docker("run", "--rm", "--read-only", "--platform", "linux/arm64", tag, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
    arch = _docker("run", "--rm", "--platform", "linux/arm64", "--entrypoint", "/opt/trustcap/venv/bin/python", tag,
                   "-c", "import platform; print(platform.machine())")
    assert arch.stdout.strip() == "aarch64", arch.stderr


def test_arm64_archive_carries_the_charts_tags(built: dict[str, ci.BuiltArch]) -> None:
    """What a Pi loads: `docker load -i` gives trustcap/<component>:<version>, arm64 configs, one layer."""
    version = ci.package_version()
    with tarfile.open(built["arm64"].archive) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        tags = sorted(t for entry in manifest for t in entry["RepoTags"])
        assert tags == sorted(t for c in ci.COMPONENTS for t in (f"trustcap/{c}:{version}", f"trustcap/{c}:latest"))
        assert len({entry["Layers"][0] for entry in manifest}) == 1
        for entry in manifest:
            assert json.loads(tar.extractfile(entry["Config"]).read())["architecture"] == "arm64"  # type: ignore[union-attr]


def test_second_run_takes_everything_from_the_cache(built: dict[str, ci.BuiltArch], source: Path) -> None:
    layers = {arch: (_layer(arch), _layer(arch).stat().st_mtime_ns) for arch in ARCHES}
    archives = {arch: built[arch].archive.stat().st_mtime_ns for arch in ARCHES}
    start = time.monotonic()
    again = {b.arch: b for b in ci.build(ARCHES, root=source)}
    print(f"\ncomponent images from the cache, amd64 + arm64: {time.monotonic() - start:.1f}s")
    for arch in ARCHES:
        assert again[arch].image_ids == built[arch].image_ids
        path, mtime = layers[arch]
        assert path.stat().st_mtime_ns == mtime, f"the {arch} layer was rebuilt"
        assert again[arch].archive.stat().st_mtime_ns == archives[arch], f"the {arch} archive was rewritten"


def test_cli_reports_the_images_from_the_cache(built: dict[str, ci.BuiltArch]) -> None:
    """`trustcap stack images` as a user runs it (registered by cli/stack.py): all from the cache, a table."""
    proc = subprocess.run([sys.executable, "-P", "-m", "trustcap.cli", "stack", "images", "--arch", "all"],
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr
    for arch in ARCHES:
        for tag in (t for ts in built[arch].tags.values() for t in ts):
            assert tag in proc.stdout
        assert f"docker load -i {built[arch].archive}" in proc.stderr.replace("\n", "")
