"""Build the HPC boot image from Debian packages: a kernel, an initramfs with busybox and our init, the
iPXE script that boots them, and a manifest of their sha256 digests (what a BootImage pins).

Inputs are .deb files (`linux-image-<abi>-amd64`, `busybox-static`), fetched once with
`apt-get download` into `~/.cache/trustcap/netboot/debs/` and extracted with `dpkg-deb -x`; nothing is
taken from the build host's own filesystem. Outputs are cached under `~/.cache/trustcap/netboot/images/`
by a key over every input, and the archive is written by `cpio.pack` (fixed owners, times, inodes,
gzip without mtime), so the same inputs give byte-identical files (docs/decisions/0052-*.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from trustcap.netboot.errors import ImageBuildError
from trustcap.netboot.image.cpio import Entry, pack
from trustcap.netboot.image.python import PY_DEBS, agent_entries, entries_digest, python_entries
from trustcap.netboot.ipxe import boot_digest, render_script

__all__ = ["BuildInputs", "BuiltImage", "build_image", "cache_dir", "ensure_debs"]

log = logging.getLogger("trustcap.netboot")

RECIPE_VERSION = "2"
HERE = Path(__file__).resolve().parent
KERNEL_FILE, INITRD_FILE, SCRIPT_FILE = "vmlinuz", "initrd.img", "boot.ipxe"


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "trustcap" / "netboot"


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 600) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageBuildError(f"{cmd[0]} failed: {exc}") from exc
    if proc.returncode != 0:
        raise ImageBuildError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-400:]}")
    return proc.stdout


def ensure_debs(debs: Path | None = None) -> dict[str, Path]:
    """The kernel and busybox .debs, downloaded with apt-get into the cache when not there yet."""
    debs = debs or cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)

    def find(pattern: str) -> Path | None:
        hits = sorted(p for p in debs.glob(pattern) if "-dbg" not in p.name and "unsigned" not in p.name)
        return hits[-1] if hits else None

    kernel = find("linux-image-*-amd64_*.deb")
    if kernel is None:
        deps = _run(["apt-cache", "depends", "linux-image-amd64"])
        pkg = next((ln.split(":", 1)[1].strip() for ln in deps.splitlines() if "Depends: linux-image-" in ln), None)
        if not pkg:
            raise ImageBuildError("apt-cache cannot resolve linux-image-amd64; run apt-get update")
        _run(["apt-get", "download", pkg], cwd=debs)
        kernel = find("linux-image-*-amd64_*.deb")
    busybox = find("busybox-static_*.deb")
    if busybox is None:
        _run(["apt-get", "download", "busybox-static"], cwd=debs)
        busybox = find("busybox-static_*.deb")
    if kernel is None or busybox is None:
        raise ImageBuildError(f"kernel or busybox-static .deb missing in {debs} after apt-get download")
    return {"kernel": kernel, "busybox": busybox}


def ensure_python_debs(debs: Path | None = None) -> dict[str, Path]:
    """The .debs of the Python interpreter and its libraries (python.PY_DEBS), downloaded once."""
    debs = debs or cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    missing = []
    for name in PY_DEBS:
        hits = sorted(debs.glob(f"{name}_*_amd64.deb"))
        if hits:
            found[name] = hits[-1]
        else:
            missing.append(name)
    if missing:
        _run(["apt-get", "download", *missing], cwd=debs)
        return ensure_python_debs(debs) if all(sorted(debs.glob(f"{n}_*_amd64.deb")) for n in missing) else \
            _missing(missing, debs)
    return found


def _missing(names: list[str], debs: Path) -> dict[str, Path]:
    raise ImageBuildError(f"{', '.join(names)}: .deb missing in {debs} after apt-get download")


@dataclass(frozen=True)
class BuildInputs:
    """Everything that decides the image's bytes. Nothing names a gateway: one image boots behind all."""

    http_port: int = 8080
    cmdline: str = "console=ttyS0 panic=30 loglevel=4"
    modules: tuple[str, ...] = ("e1000",)
    source_date_epoch: int = field(default_factory=lambda: int(os.environ.get("SOURCE_DATE_EPOCH", "1700000000")))
    extra_files: Mapping[str, bytes] = field(default_factory=dict)  # initramfs path -> content (e.g. the agent)
    debs: Mapping[str, Path] = field(default_factory=dict)  # {"kernel": .deb, "busybox": .deb}; default: cache
    with_agent: bool = False  # Python 3.11 from Debian + the trustcap agent, started by init


@dataclass(frozen=True)
class BuiltImage:
    out_dir: Path
    digests: dict[str, str]  # file name -> sha256:<hex>
    bootdigest: str
    cmdline: str

    def path(self, name: str) -> Path:
        return self.out_dir / name


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _cache_key(inputs: BuildInputs, debs: Mapping[str, Path], extra: str = "") -> str:
    h = hashlib.sha256()
    for part in (RECIPE_VERSION, str(inputs.http_port), inputs.cmdline, ",".join(inputs.modules),
                 str(inputs.source_date_epoch)):
        h.update(part.encode() + b"\0")
    for name in ("kernel", "busybox"):
        h.update(hashlib.sha256(debs[name].read_bytes()).digest())
    for f in ("init", "udhcpc.script", "builder.py", "cpio.py", "python.py"):
        h.update(hashlib.sha256((HERE / f).read_bytes()).digest())
    h.update(extra.encode())
    for k in sorted(inputs.extra_files):
        h.update(k.encode() + b"\0" + hashlib.sha256(inputs.extra_files[k]).digest())
    return h.hexdigest()[:32]


def _initramfs(kernel_tree: Path, busybox_tree: Path, inputs: BuildInputs, more: list[Entry]) -> list[Entry]:
    entries = [Entry(d, "dir") for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "run", "sys",
                                          "tmp", "usr", "usr/bin", "usr/share", "usr/share/udhcpc", "www")]
    entries.append(Entry("dev/console", "chardev", mode=0o600, rdev=(5, 1)))
    entries.append(Entry("dev/null", "chardev", mode=0o666, rdev=(1, 3)))
    entries.append(Entry("bin/busybox", "file", (busybox_tree / "bin/busybox").read_bytes()))
    entries.append(Entry("bin/sh", "symlink", b"busybox"))
    entries.append(Entry("init", "file", (HERE / "init").read_bytes()))
    entries.append(Entry("usr/share/udhcpc/default.script", "file", (HERE / "udhcpc.script").read_bytes()))
    for mod in inputs.modules:
        hits = sorted(kernel_tree.glob(f"lib/modules/*/kernel/**/{mod}.ko"))
        if len(hits) != 1:
            raise ImageBuildError(f"module {mod}: expected one {mod}.ko in the kernel package, found {len(hits)}")
        entries.append(Entry(f"lib/modules/{mod}.ko", "file", hits[0].read_bytes(), mode=0o644))
    have = {e.path for e in entries}
    entries += [e for e in more if e.path not in have]  # shared folders (usr, lib, ...) once
    dirs = {e.path for e in entries if e.kind == "dir"}
    for path, data in sorted(inputs.extra_files.items()):
        parts = path.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                entries.append(Entry(d, "dir"))
        entries.append(Entry(path, "file", data, mode=0o644))
    return entries


def build_image(inputs: BuildInputs, out_dir: Path | None = None, use_cache: bool = True) -> BuiltImage:
    """Build (or reuse from the cache) the image for `inputs`; returns where it is and its digests."""
    debs = dict(inputs.debs) if inputs.debs else ensure_debs()
    agent: list[Entry] = agent_entries() if inputs.with_agent else []
    if inputs.with_agent:
        debs.update({k: v for k, v in ensure_python_debs().items() if k not in debs})
    extra = entries_digest(agent) + "".join(
        hashlib.sha256(debs[n].read_bytes()).hexdigest() for n in PY_DEBS if inputs.with_agent)
    key = _cache_key(inputs, debs, extra)
    out = out_dir or cache_dir() / "images" / key
    manifest = out / "manifest.json"
    if use_cache and manifest.exists():
        m = json.loads(manifest.read_text())
        if m.get("key") == key:
            log.info("boot image %s from cache", key)
            return BuiltImage(out, m["digests"], m["bootdigest"], m["cmdline"])
    with tempfile.TemporaryDirectory(prefix="trustcap-image-") as tmp:
        ktree, btree = Path(tmp) / "kernel", Path(tmp) / "busybox"
        _run(["dpkg-deb", "-x", str(debs["kernel"]), str(ktree)])
        _run(["dpkg-deb", "-x", str(debs["busybox"]), str(btree)])
        vmlinuz = sorted(ktree.glob("boot/vmlinuz-*"))
        if len(vmlinuz) != 1:
            raise ImageBuildError(f"{debs['kernel'].name}: expected one boot/vmlinuz-*, found {len(vmlinuz)}")
        kernel = vmlinuz[0].read_bytes()
        more = (python_entries(debs, Path(tmp)) + agent) if inputs.with_agent else []
        initrd = pack(_initramfs(ktree, btree, inputs, more), inputs.source_date_epoch)
    bootdigest = boot_digest(hashlib.sha256(kernel).digest(), hashlib.sha256(initrd).digest(), inputs.cmdline)
    script = render_script(inputs.http_port, KERNEL_FILE, INITRD_FILE, inputs.cmdline, bootdigest).encode()
    out.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name, data in ((KERNEL_FILE, kernel), (INITRD_FILE, initrd), (SCRIPT_FILE, script)):
        tmp_path = out / f".{name}.tmp"
        tmp_path.write_bytes(data)
        tmp_path.replace(out / name)
        digests[name] = _sha(data)
    manifest.write_text(json.dumps({"key": key, "digests": digests, "bootdigest": bootdigest,
                                    "cmdline": inputs.cmdline}, indent=2, sort_keys=True) + "\n")
    log.info("built boot image %s: bootdigest %s", key, bootdigest)
    return BuiltImage(out, digests, bootdigest, inputs.cmdline)


def copy_image(image: BuiltImage, dest: Path) -> None:
    """Copy the three served files into a boot root."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in (KERNEL_FILE, INITRD_FILE, SCRIPT_FILE):
        shutil.copyfile(image.path(name), dest / name)
