"""`trustcap capsule build DIR`: a capsule function image, built reproducibly, and its id printed.

DIR/image.yaml names the base image (a local one: no registry is reachable), the files to add, the user,
the command and the working directory. The image is one layer over the base, assembled here rather than
by `docker build`, because Docker 20.10's builder stamps the build time into the config and the files'
times into the layer: here the layer tar has fixed owners (0:0), modes, order and times (0), and the
config a fixed creation time, so the image id (sha256 of the config bytes, what a Capsule's
`spec.function.digest` names) is the same on every build from the same base. The result is loaded with
`docker load` (the save format: manifest.json, the config, one tar per layer) and checked: the id the
engine reports must be the digest computed here.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from trustcap.errors import TrustcapError

__all__ = ["build_image", "layer_tar", "register"]

EPOCH = "1970-01-01T00:00:00Z"
_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_KEYS = {"from", "tag", "files", "user", "cmd", "workdir"}


class CapsuleBuildError(TrustcapError):
    """A capsule image cannot be built: the message names the field or the failed step."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("capsule", help="capsule function images")
    sub = parser.add_subparsers(dest="capsule_command", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="build DIR/image.yaml reproducibly and print the image id")
    build.add_argument("dir", type=Path, metavar="DIR")
    build.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    image_id, tag = build_image(args.dir)
    print(f"{tag} {image_id}")
    return 0


def _spec(directory: Path) -> dict[str, Any]:
    path = directory / "image.yaml"
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CapsuleBuildError(f"cannot read {path}: {exc}") from exc
    if not isinstance(spec, dict) or set(spec) - _KEYS or not {"from", "tag", "files", "cmd"} <= set(spec):
        raise CapsuleBuildError(f"{path}: expected the keys {sorted(_KEYS)} (from, tag, files, cmd required)")
    if not isinstance(spec["cmd"], list) or not spec["cmd"] or not all(isinstance(a, str) for a in spec["cmd"]):
        raise CapsuleBuildError(f"{path}: field 'cmd' must be a non-empty list of strings")
    if not isinstance(spec["files"], list) or not spec["files"]:
        raise CapsuleBuildError(f"{path}: field 'files' must list {{src, dest, mode}}")
    for i, f in enumerate(spec["files"]):
        if not isinstance(f, dict) or set(f) != {"src", "dest", "mode"} \
                or not re.fullmatch(r"0[0-7]{3}", str(f["mode"])):
            raise CapsuleBuildError(f"{path}: field 'files[{i}]' must be {{src, dest, mode: \"0444\"}}")
        dest = PurePosixPath(str(f["dest"]))
        if not dest.is_absolute() or ".." in dest.parts:
            raise CapsuleBuildError(f"{path}: field 'files[{i}].dest' must be an absolute path without '..'")
    return spec


def layer_tar(files: list[tuple[str, bytes, int]]) -> bytes:
    """A layer with `files` (dest, content, mode) and their parent directories; every header field that
    could vary (owner, names, times, order, format) is fixed."""
    out = io.BytesIO()
    dirs: set[str] = set()
    for dest, _, _ in files:
        for parent in PurePosixPath(dest.lstrip("/")).parents:
            if str(parent) != ".":
                dirs.add(str(parent))
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        entries: list[tuple[str, bytes | None, int]] = [(d, None, 0o755) for d in dirs]
        entries += [(dest.lstrip("/"), data, mode) for dest, data, mode in files]
        for name, data, mode in sorted(entries, key=lambda e: e[0]):
            info = tarfile.TarInfo(name + ("/" if data is None else ""))
            info.type = tarfile.DIRTYPE if data is None else tarfile.REGTYPE
            info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = mode, 0, 0, 0, "", ""
            info.size = 0 if data is None else len(data)
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return out.getvalue()


def build_image(directory: Path, client: Any | None = None) -> tuple[str, str]:
    """Build DIR's image into the engine; returns (image id `sha256:<hex>`, tag)."""
    import docker
    from docker.errors import DockerException

    spec = _spec(directory)
    files = []
    for f in spec["files"]:
        try:
            files.append((str(f["dest"]), (directory / str(f["src"])).read_bytes(), int(str(f["mode"]), 8)))
        except OSError as exc:
            raise CapsuleBuildError(f"cannot read {directory / str(f['src'])}: {exc}") from exc
    layer = layer_tar(files)
    layer_diff = "sha256:" + hashlib.sha256(layer).hexdigest()
    try:
        client = client or docker.from_env(timeout=300)
        base = client.images.get(spec["from"])
        base_rootfs = base.attrs["RootFS"]["Layers"]
        base_config = base.attrs.get("Config") or {}
        config = {
            "architecture": base.attrs.get("Architecture", "amd64"), "os": base.attrs.get("Os", "linux"),
            "created": EPOCH,
            "config": {"Env": base_config.get("Env") or [_PATH],
                       "Cmd": list(spec["cmd"]), "User": str(spec.get("user", "")),
                       "WorkingDir": str(spec.get("workdir", "/"))},
            "rootfs": {"type": "layers", "diff_ids": [*base_rootfs, layer_diff]},
            "history": [*({"created": EPOCH, "created_by": f"{spec['from']} layer {i}"}
                          for i in range(len(base_rootfs))),
                        {"created": EPOCH, "created_by": "trustcap capsule build: "
                         + ", ".join(f"{f['src']} -> {f['dest']}" for f in spec["files"])}],
        }
        raw = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        image_id = "sha256:" + hashlib.sha256(raw).hexdigest()
        with tempfile.TemporaryFile() as bundle:
            _bundle(bundle, base, raw, image_id, layer, str(spec["tag"]))
            bundle.seek(0)
            client.images.load(bundle)
        got = str(client.images.get(str(spec["tag"])).id)
    except DockerException as exc:
        raise CapsuleBuildError(f"building {directory}: Docker Engine failed: {exc}") from exc
    if got != image_id:
        raise CapsuleBuildError(f"the engine loaded {got}, not the computed {image_id}")
    return image_id, str(spec["tag"])


def _bundle(dst: Any, base: Any, config: bytes, image_id: str, layer: bytes, tag: str) -> None:
    """The save format: the base's layer tars (from `docker save` of the base), ours, config, manifest."""
    with tempfile.TemporaryFile() as saved:
        for chunk in base.save(named=False):
            saved.write(chunk)
        saved.seek(0)
        with tarfile.open(fileobj=saved, mode="r:") as src, tarfile.open(fileobj=dst, mode="w:") as out:
            manifest = json.load(src.extractfile("manifest.json"))  # type: ignore[arg-type]
            layers = list(manifest[0]["Layers"])
            for name in layers:
                member = src.getmember(name)
                out.addfile(member, src.extractfile(member))
            ours = f"{hashlib.sha256(layer).hexdigest()}/layer.tar"
            entries = [(ours, layer), (f"{image_id[7:]}.json", config),
                       ("manifest.json", json.dumps([{"Config": f"{image_id[7:]}.json", "RepoTags": [tag],
                                                      "Layers": [*layers, ours]}]).encode())]
            for name, data in entries:
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                out.addfile(info, io.BytesIO(data))
