"""`trustcap bootimage id FILE.yaml`: the image id to approve on chain for a BootImage manifest.

The NodeRegistry owner approves one bytes32 per image (decision 0063); this prints it, so the value
passed to `approveBootImage` is computed by the same code the operator checks it with.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from trustcap.bootimage import BootImageSpecError, image_id_of_spec
from trustcap.errors import ConfigError

MAX_MANIFEST_BYTES = 1024 * 1024
# libyaml's safe loader refuses deep nesting itself (see trustcap.evidence.policy).
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("bootimage", help="BootImage helpers (the image id the chain approves)")
    sub = parser.add_subparsers(dest="bootimage_command", metavar="ACTION", required=True)
    ident = sub.add_parser("id", help="print the image id (0x + 64 hex) to pass to NodeRegistry.approveBootImage")
    ident.add_argument("manifest", type=Path, metavar="FILE.yaml", help="a BootImage manifest")
    ident.set_defaults(func=_id)


def _load_spec(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes; not a BootImage manifest")
        docs = [d for d in yaml.load_all(path.read_text(), Loader=_LOADER) if d is not None]
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    images = [d for d in docs if isinstance(d, dict) and d.get("kind") == "BootImage"]
    if len(images) != 1:
        raise ConfigError(f"{path}: expected exactly one document of kind BootImage, found {len(images)}")
    spec = images[0].get("spec")
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: spec: missing or not a mapping")
    return spec


def _id(args: argparse.Namespace) -> int:
    spec = _load_spec(args.manifest)
    try:
        iid = image_id_of_spec(spec)
    except BootImageSpecError as exc:
        raise ConfigError(f"{args.manifest}: {exc}") from exc
    print("0x" + iid.hex())
    return 0
