"""The component images the Helm chart runs (`trustcap/operator`, `trustcap/gateway`, `trustcap/netboot`), built
locally from Debian packages and PyPI wheels, for amd64 and for the Pis' arm64 (docs/decisions/0112).

No image registry is reachable, so each architecture gets one runtime tree: Debian minbase with python3 and
the union of the components' apt packages (debootstrap; for a foreign architecture its first stage here and
its second stage under qemu-user through binfmt_misc), a venv at /opt/trustcap/venv, and our wheel with its
dependencies installed into the venv by the host's pip for the target platform (no pip runs under
emulation). The three images share that one layer and differ only in their entrypoint, so an engine
stores it once. The images are written as a `docker save` archive with the right architecture in each
config (Docker 20.10 ignores `docker import --platform`) and loaded from it.

    step (per arch)        cached in <tool cache>/images/ as                 keyed by
    runtime tree           runtime-bookworm-<arch>-<h>.tar (debootstrap)     suite, arch, apt packages
    trustcap wheel         wheel-<h>/trustcap-<version>-py3-none-any.whl     source files, pyproject.toml
    wheelhouse             wheelhouse-<arch>-<h>/                            requirements, pinned versions
    image layer            layer-<version>-<arch>-<h>.tar                    the three above
    image archive          trustcap-<version>-linux-<arch>.docker.tar        layer and image configs

The engine's own architecture is tagged `trustcap/<component>:<version>` and `:latest` (what the chart
uses); a foreign one is loaded here as `:<version>-<arch>` (an overlay2 engine holds one platform per tag)
and its archive, tagged as the chart expects, is what a Pi loads with `docker load`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from trustcap.errors import StackError
from trustcap.stack import images, paths, versions

__all__ = [
    "ARCHES", "COMPONENTS", "Arch", "BuiltArch", "Component", "apt_packages", "binfmt_problem", "build",
    "entrypoint", "image_config", "image_tags", "package_version", "pip_platforms",
]

#: Debian bookworm's python3 and glibc: the wheels must fit them, not the host's Python.
PYTHON_VERSION: Final = "3.11"
GLIBC: Final = (2, 36)
VENV: Final = "/opt/trustcap/venv"
SITE: Final = f"{VENV}/lib/python{PYTHON_VERSION}/site-packages"
REPOSITORY: Final = "trustcap"
#: The runtime tree's own packages: the interpreter the venv is made from.
BASE_PACKAGES: Final = ("python3",)
#: A fixed creation time keeps the image configs, and so the image IDs, the same for the same content.
EPOCH: Final = "1970-01-01T00:00:00Z"


@dataclass(frozen=True)
class Component:
    name: str
    #: Debian packages the component runs as commands (checked against its subprocess calls).
    apt: tuple[str, ...]

    @property
    def module(self) -> str:
        return f"trustcap.{self.name}"


COMPONENTS: Final = {
    "operator": Component("operator", ()),
    # nft (egress guard), ip (links and namespaces), sysctl (forwarding); nsenter is in util-linux (essential).
    "gateway": Component("gateway", ("nftables", "iproute2", "procps")),
    # dnsmasq-base for proxy-DHCP, the same package netboot/container.py's image installs (decision 0053);
    # moving the link into the namespace (ip, nsenter) is done by the host, not inside.
    "netboot": Component("netboot", ("dnsmasq-base",)),
}


@dataclass(frozen=True)
class Arch:
    debian: str      # dpkg's name, debootstrap --arch
    machine: str     # platform.machine() inside, and the manylinux suffix
    qemu: str        # the binfmt_misc entry qemu-user-static registers
    variant: str = ""

    @property
    def platform(self) -> str:
        return f"linux/{self.debian}" + (f"/{self.variant}" if self.variant else "")


ARCHES: Final = {
    "amd64": Arch("amd64", "x86_64", "qemu-x86_64"),
    "arm64": Arch("arm64", "aarch64", "qemu-aarch64", variant="v8"),
}

Progress = Callable[..., None]


def apt_packages() -> tuple[str, ...]:
    """One tree for all three images: the union, sorted so the cache key does not depend on dict order."""
    return tuple(sorted({*BASE_PACKAGES, *(p for c in COMPONENTS.values() for p in c.apt)}))


def entrypoint(component: str) -> list[str]:
    return [f"{VENV}/bin/python", "-m", COMPONENTS[component].module]


def image_tags(component: str, version: str, arch: str, host: str) -> list[str]:
    """The chart's tags on the engine's own architecture; a foreign one keeps its arch in the tag here."""
    name = f"{REPOSITORY}/{component}"
    if arch == host:
        return [f"{name}:{version}", f"{name}:latest"]
    return [f"{name}:{version}-{arch}", f"{name}:latest-{arch}"]


def export_tags(component: str, version: str) -> list[str]:
    """The tags inside an exported archive: what the chart names, whatever machine loads it."""
    return [f"{REPOSITORY}/{component}:{version}", f"{REPOSITORY}/{component}:latest"]


def pip_platforms(arch: str) -> list[str]:
    """Every manylinux tag bookworm's glibc runs: pip does not widen `manylinux_2_36` to the older ones."""
    m = ARCHES[arch].machine
    return ["manylinux2014_" + m, *(f"manylinux_2_{minor}_{m}" for minor in range(17, GLIBC[1] + 1))]


def _pip_target_flags(arch: str) -> list[str]:
    flags = ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
             "--abi", "cp" + PYTHON_VERSION.replace(".", "")]
    for plat in pip_platforms(arch):
        flags += ["--platform", plat]
    return flags


def pip_download_argv(wheel: Path, dest: Path, arch: str, constraints: Path) -> list[str]:
    return [sys.executable, "-P", "-m", "pip", "download", "--quiet", "--dest", str(dest), *_pip_target_flags(arch),
            "--constraint", str(constraints), str(wheel)]


def pip_install_argv(wheel: Path, wheelhouse: Path, site: Path, arch: str) -> list[str]:
    # --no-index: the layer is made only from the wheelhouse, so the same wheelhouse gives the same layer.
    return [sys.executable, "-P", "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(wheelhouse),
            "--target", str(site), *_pip_target_flags(arch), "--no-compile", "--no-warn-script-location",
            str(wheel)]


def image_config(component: str, arch: str, version: str, layer_digest: str, content: str) -> dict[str, Any]:
    """The image config `docker load` reads: architecture, entrypoint, environment, labels, one layer."""
    a = ARCHES[arch]
    config: dict[str, Any] = {
        "architecture": a.debian, "os": "linux", "created": EPOCH,
        "config": {
            "Entrypoint": entrypoint(component),
            "Env": [f"PATH={VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "LANG=C.UTF-8", "PYTHONUNBUFFERED=1", "PYTHONDONTWRITEBYTECODE=1"],
            "WorkingDir": "/",
            "Labels": {"org.opencontainers.image.title": f"trustcap {component}",
                       "org.opencontainers.image.version": version,
                       "io.trustcap.content": content},
        },
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
        "history": [{"created": EPOCH,
                     "created_by": f"trustcap stack images: debootstrap {versions.DEBIAN_SUITE} "
                                   f"({', '.join(apt_packages())}) + trustcap {version} wheels"}],
    }
    if a.variant:
        config["variant"] = a.variant
    return config


def _config_bytes(config: dict[str, Any]) -> bytes:
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def binfmt_problem(arch: str, binfmt_dir: Path = Path("/proc/sys/fs/binfmt_misc")) -> str | None:
    """Why `arch` binaries cannot run here (with the fix), or None. debootstrap's second stage and the
    smoke check exec target binaries inside the tree, which only a binfmt_misc handler can serve; the F
    flag makes the kernel keep the host's qemu open, so nothing has to be copied into the tree."""
    entry = ARCHES[arch].qemu
    if not (binfmt_dir / "status").is_file():
        return (f"binfmt_misc is not mounted at {binfmt_dir}, so {arch} binaries cannot run: "
                f"mount -t binfmt_misc binfmt_misc {binfmt_dir} (as root), then update-binfmts --enable {entry}")
    if (binfmt_dir / "status").read_text().strip() != "enabled":
        return f"binfmt_misc is disabled: echo 1 > {binfmt_dir}/status"
    path = binfmt_dir / entry
    if not path.is_file():
        return (f"no binfmt_misc handler for {arch} ({entry}): apt-get install qemu-user-static binfmt-support, "
                f"then update-binfmts --enable {entry}")
    lines = path.read_text().splitlines()
    if not lines or lines[0].strip() != "enabled":
        return f"the binfmt_misc handler {entry} is disabled: update-binfmts --enable {entry}"
    flags = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("flags:")), "")
    if "F" not in flags:
        return (f"the binfmt_misc handler {entry} lacks the F flag (its interpreter would have to exist inside "
                f"every chroot): use qemu-user-static's handler, update-binfmts --enable {entry}")
    return None


def package_version(root: Path | None = None) -> str:
    """The version in pyproject.toml (the chart's appVersion reads the same), not an installed copy's."""
    pyproject = (root or paths.repo_root()) / "pyproject.toml"
    if not pyproject.is_file():
        raise StackError(f"{pyproject} is missing: component images are built from a source checkout of trustcap")
    version: str = tomllib.loads(pyproject.read_text())["project"]["version"]
    return version


def _hash(parts: Iterable[str | bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()[:16]


def source_hash(root: Path) -> str:
    """What the wheel is built from: pyproject.toml and every file of the mapped package folders."""
    pyproject = root / "pyproject.toml"
    dirs = sorted(set(tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-dir"].values()))
    parts: list[str | bytes] = [pyproject.read_bytes()]
    for d in dirs:
        for p in sorted((root / d).rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
                parts += [p.relative_to(root).as_posix(), p.read_bytes()]
    return _hash(parts)


def _pins() -> list[str]:
    """The versions this environment runs (and its tests passed with) pin the images' dependencies."""
    pins = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name and name != "trustcap":
            pins[name] = f"{name}=={dist.version}"
    return [pins[n] for n in sorted(pins)]


def _wheel_requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    return sorted(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")
                  and "extra ==" not in line)


def _run(cmd: Sequence[str], what: str, timeout: float = 3600) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise StackError(f"{what} failed (exit {proc.returncode}): {(proc.stdout + proc.stderr).strip()[-1200:]}")
    return proc.stdout


def _cache() -> Path:
    d = paths.cache_dir() / "images"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _runtime_tarball(arch: str, progress: Progress) -> Path:
    key = _hash([versions.DEBIAN_SUITE, arch, *apt_packages(), VENV])
    out = _cache() / f"runtime-{versions.DEBIAN_SUITE}-{arch}-{key}.tar"
    step = f"{arch}: Debian {versions.DEBIAN_SUITE} runtime tree ({', '.join(apt_packages())})"
    progress(step)
    if not out.is_file():
        with tempfile.TemporaryDirectory(prefix="trustcap-runtime-") as tmp:
            root = Path(tmp) / "rootfs"
            images.debootstrap_rootfs(root, apt_packages(), arch)
            # The venv is made by the tree's own python3 (under qemu for a foreign arch), so its links and
            # pyvenv.cfg are what that interpreter expects; pip is not needed inside, the host installs.
            _run(["chroot", str(root), "python3", "-m", "venv", "--without-pip", VENV], f"creating {VENV} ({arch})")
            images.pack_rootfs(root, out)
    progress(step, done=True)
    return out


def _wheel(root: Path, version: str, progress: Progress) -> Path:
    step = f"trustcap {version} wheel"
    progress(step)
    dest = _cache() / f"wheel-{source_hash(root)}"
    found = sorted(dest.glob("trustcap-*.whl"))
    if not found:
        with tempfile.TemporaryDirectory(prefix="trustcap-wheel-", dir=_cache()) as tmp:
            _run([sys.executable, "-P", "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", tmp, str(root)],
                 "building the trustcap wheel (pip wheel)")
            found = sorted(Path(tmp).glob("trustcap-*.whl"))
            if not found:
                raise StackError(f"pip wheel {root} made no trustcap wheel")
            dest.mkdir(parents=True, exist_ok=True)
            shutil.move(str(found[0]), dest / found[0].name)
            found = [dest / found[0].name]
        for stale in _cache().glob("wheel-*"):
            if stale != dest:
                shutil.rmtree(stale, ignore_errors=True)
    progress(step, done=True)
    return found[0]


def _wheelhouse(wheel: Path, arch: str, progress: Progress) -> tuple[Path, str]:
    pins = _pins()
    key = _hash([arch, *_wheel_requires(wheel), *pins, *pip_platforms(arch)])
    dest = _cache() / f"wheelhouse-{arch}-{key}"
    step = f"{arch}: dependency wheels for manylinux {ARCHES[arch].machine}, cp{PYTHON_VERSION}"
    progress(step)
    if not (dest / ".complete").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        constraints = dest / "constraints.txt"
        constraints.write_text("\n".join(pins) + "\n")
        try:
            _run(pip_download_argv(wheel, dest, arch, constraints), f"pip download for {arch}")
        except StackError as exc:
            raise StackError(f"{exc} -- a pinned dependency may have no {ARCHES[arch].machine} wheel for "
                             f"CPython {PYTHON_VERSION}; pin a version that has one") from exc
        # The project's own wheel is installed from its own cache; the wheelhouse keeps only dependencies.
        for own in dest.glob("trustcap-*.whl"):
            own.unlink()
        (dest / ".complete").write_text("")
    progress(step, done=True)
    return dest, key


def _layer(arch: str, version: str, runtime: Path, wheel: Path, wheelhouse: Path, key: str,
           progress: Progress) -> Path:
    out = _cache() / f"layer-{version}-{arch}-{_hash([runtime.name, wheel.parent.name, key])}.tar"
    step = f"{arch}: image layer (venv {VENV})"
    progress(step)
    if not out.is_file():
        with tempfile.TemporaryDirectory(prefix="trustcap-layer-") as tmp:
            root = Path(tmp) / "rootfs"
            root.mkdir()
            _run(["tar", "-xf", str(runtime), "-C", str(root)], f"unpacking {runtime.name}")
            site = root / SITE.lstrip("/")
            _run(pip_install_argv(wheel, wheelhouse, site, arch), f"pip install into the {arch} venv")
            # Console scripts pip writes under --target carry the host's interpreter path: useless inside.
            shutil.rmtree(site / "bin", ignore_errors=True)
            _compile(root, site, arch)
            _smoke(root, arch)
            images.pack_rootfs(root, out)
        # Every code change makes a new layer of about 400 MB; only the current one is ever loaded again.
        for stale in _cache().glob(f"layer-*-{arch}-*.tar*"):
            if not stale.name.startswith(out.name):
                stale.unlink()
    progress(step, done=True)
    return out


def _compile(root: Path, site: Path, arch: str) -> None:
    """Bytecode ahead of time: the images run with a read-only root, so Python cannot cache it there. The
    host compiles when its Python is the target's (bytecode is the same on every architecture); hash-based
    .pyc files keep the layer the same whatever the files' times."""
    args = ["-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash"]
    if f"{sys.version_info.major}.{sys.version_info.minor}" == PYTHON_VERSION:
        _run([sys.executable, *args, "-s", str(root), "-p", "/", str(site)], "compiling the venv's bytecode")
    else:
        _run(["chroot", str(root), "python3", *args, SITE], f"compiling the venv's bytecode ({arch})")


def _smoke(root: Path, arch: str) -> None:
    """The tree's own interpreter (under qemu for a foreign arch) imports trustcap and reports its machine."""
    probe = "import platform, trustcap; print(platform.machine(), trustcap.__version__)"
    out = _run(["chroot", str(root), f"{VENV}/bin/python", "-c", probe], f"running python in the {arch} tree")
    machine = out.split()[0] if out.split() else ""
    if machine != ARCHES[arch].machine:
        raise StackError(f"the {arch} tree's python reports machine {machine!r}, expected {ARCHES[arch].machine}")


def _sha256_file(path: Path) -> str:
    """A layer's digest, remembered beside it (hashing 300 MB on every cached run would cost seconds)."""
    side = path.with_name(path.name + ".sha256")
    if side.is_file() and side.stat().st_mtime >= path.stat().st_mtime:
        return side.read_text().strip()
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    side.write_text(h.hexdigest())
    return h.hexdigest()


def write_archive(out: Path, layer: Path, layer_digest: str, configs: dict[str, bytes],
                  tags: dict[str, list[str]]) -> None:
    """A `docker save` archive (manifest.json, one config per image, the shared layer once)."""
    partial = out.with_suffix(".partial")
    manifest = [{"Config": f"{hashlib.sha256(cfg).hexdigest()}.json", "RepoTags": tags[name],
                 "Layers": [f"{layer_digest}/layer.tar"]} for name, cfg in sorted(configs.items())]
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, _BytesReader(data))

        dirinfo = tarfile.TarInfo(layer_digest)
        dirinfo.type, dirinfo.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(dirinfo)
        info = tarfile.TarInfo(f"{layer_digest}/layer.tar")
        info.size, info.mode = layer.stat().st_size, 0o644
        with layer.open("rb") as fh:
            tar.addfile(info, fh)
        for cfg in sorted(configs.values()):
            add(f"{hashlib.sha256(cfg).hexdigest()}.json", cfg)
        add("manifest.json", json.dumps(manifest, sort_keys=True).encode())
    partial.replace(out)


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        chunk, self.pos = self.data[self.pos:end], min(end, len(self.data))
        return chunk


@dataclass(frozen=True)
class BuiltArch:
    arch: str
    archive: Path                 # tagged as the chart expects: `docker load -i` on a machine of this arch
    tags: dict[str, list[str]]    # component -> tags in the local engine
    image_ids: dict[str, str]     # component -> image ID (sha256 of its config)


def _docker() -> Any:
    import docker
    from docker.errors import DockerException

    try:
        return docker.from_env(timeout=900)
    except DockerException as exc:
        raise StackError(f"Docker Engine is not reachable: {exc}; start it (trustcap stack up)") from exc


def _load(client: Any, archive: Path, ids: dict[str, str], tags: dict[str, list[str]]) -> None:
    from docker.errors import DockerException, ImageNotFound

    def present() -> bool:
        for name, tag_list in tags.items():
            for tag in tag_list:
                try:
                    if client.images.get(tag).id != ids[name]:
                        return False
                except ImageNotFound:
                    return False
        return True

    try:
        if present():
            return
        before = set()
        for tag in (t for ts in tags.values() for t in ts):
            try:
                before.add(client.images.get(tag).id)
            except ImageNotFound:
                pass
        with archive.open("rb") as fh:
            client.images.load(fh)
        if not present():
            raise StackError(f"docker load {archive} did not give {sorted(t for ts in tags.values() for t in ts)}")
    except DockerException as exc:
        raise StackError(f"cannot load {archive} into Docker: {exc}") from exc
    # The images these tags named before are now untagged copies of an old build: drop them unless a
    # container still uses one (the engine refuses, and that is fine).
    for old in before - set(ids.values()):
        try:
            client.images.remove(old)
        except DockerException:
            pass


def build(arches: Sequence[str], progress: Progress = lambda *_a, **_k: None, *, root: Path | None = None,
          client: Any | None = None) -> list[BuiltArch]:
    """Build (or take from the cache) the component images of each arch, load them, return what was made."""
    for arch in arches:
        if arch not in ARCHES:
            raise StackError(f"unknown architecture {arch!r}: choose from {', '.join(ARCHES)}")
    if os.geteuid() != 0:
        raise StackError("building component images needs root (debootstrap and chroot): run it as root")
    root = root or paths.repo_root()
    version = package_version(root)
    host = images.host_arch()
    for arch in arches:
        if arch != host and (problem := binfmt_problem(arch)):
            raise StackError(problem)
    client = client or _docker()
    wheel = _wheel(root, version, progress)
    built = []
    for arch in arches:
        runtime = _runtime_tarball(arch, progress)
        wheelhouse, key = _wheelhouse(wheel, arch, progress)
        layer = _layer(arch, version, runtime, wheel, wheelhouse, key, progress)
        digest = _sha256_file(layer)
        content = _hash([digest])
        configs = {c: _config_bytes(image_config(c, arch, version, digest, content)) for c in COMPONENTS}
        ids = {c: "sha256:" + hashlib.sha256(cfg).hexdigest() for c, cfg in configs.items()}
        step = f"{arch}: images {', '.join(f'{REPOSITORY}/{c}' for c in COMPONENTS)}"
        progress(step)
        archive = _cache() / f"{REPOSITORY}-{version}-linux-{arch}.docker.tar"
        stamp = archive.with_name(archive.name + ".content")
        exported = {c: export_tags(c, version) for c in COMPONENTS}
        if not (archive.is_file() and stamp.is_file() and stamp.read_text() == content):
            write_archive(archive, layer, digest, configs, exported)
            stamp.write_text(content)
        local = {c: image_tags(c, version, arch, host) for c in COMPONENTS}
        if arch == host:
            _load(client, archive, ids, local)
        else:
            with tempfile.TemporaryDirectory(prefix="trustcap-load-", dir=_cache()) as tmp:
                local_archive = Path(tmp) / "local.docker.tar"
                if not all(_has(client, t, ids[c]) for c, ts in local.items() for t in ts):
                    write_archive(local_archive, layer, digest, configs, local)
                    _load(client, local_archive, ids, local)
        progress(step, done=True)
        built.append(BuiltArch(arch, archive, local, ids))
    return built


def _has(client: Any, tag: str, image_id: str) -> bool:
    from docker.errors import ImageNotFound

    try:
        return bool(client.images.get(tag).id == image_id)
    except ImageNotFound:
        return False
