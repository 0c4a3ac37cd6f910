"""Where the list of approved boot files comes from.

The gateway serves a file only if some approved boot image lists it with a digest. Who approves is
pluggable (`ApprovalSource`): the `BootImage` status in the Kubernetes API (`BootImageApproval`), which the
operator mirrors from the chain's `NodeRegistry.approvedBootImage` (decision 0063); a fixed manifest
(`ManifestApproval`) serves tests and `trustcap netboot serve`.

A source returns a fresh mapping on each call; the store asks again on every request, so a revoked image
stops being served at the next request, not at the next restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

from trustcap.netboot.errors import ApprovalUnavailable, PathRejected

from trustcap.bootimage import BootImageSpecError, parse_sha256
from trustcap.kubeclient import local_api_client

__all__ = [
    "ApprovalSource",
    "BootImageApproval",
    "ManifestApproval",
    "parse_digest",
    "pin_directory",
]

log = logging.getLogger("trustcap.netboot")

# The same pattern the BootImage CRD enforces on artifact paths: plain relative names, no '..', no '/' lead.
SAFE_PATH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*(/[A-Za-z0-9_][A-Za-z0-9_.+-]*)*$")


def parse_digest(value: str, field: str) -> bytes:
    """`sha256:<64 hex>` to 32 bytes; a clear error names the field otherwise."""
    try:
        return parse_sha256(value, field)
    except BootImageSpecError as exc:
        raise ApprovalUnavailable(str(exc)) from None


def check_path(name: str, field: str) -> str:
    if not isinstance(name, str) or len(name) > 255 or not SAFE_PATH.match(name) or ".." in name.split("/"):
        raise PathRejected(f"{field}: {name!r} is not a plain relative boot file name")
    return name


@runtime_checkable
class ApprovalSource(Protocol):
    """Anything that can say, right now, which boot files are approved and with what sha256."""

    def approved(self) -> Mapping[str, bytes]:
        """Relative path -> approved sha256 (32 bytes). Raises ApprovalUnavailable when unknown."""
        ...


class ManifestApproval:
    """A fixed mapping, e.g. read from a JSON manifest `{"kernel": "sha256:..."}`."""

    def __init__(self, files: Mapping[str, bytes]) -> None:
        self._files = {check_path(k, "manifest path"): bytes(v) for k, v in files.items()}

    @classmethod
    def from_json(cls, path: Path) -> ManifestApproval:
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ApprovalUnavailable(f"manifest {path}: cannot read JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ApprovalUnavailable(f"manifest {path}: must be an object of path -> sha256:<hex>")
        return cls({k: parse_digest(v, f"manifest {path}: {k}") for k, v in raw.items()})

    def approved(self) -> Mapping[str, bytes]:
        return dict(self._files)


def pin_directory(root: Path) -> ManifestApproval:
    """Approve every regular file under `root` as it is now: later changes to its bytes are refused.

    This is what `trustcap netboot serve --root DIR` does without a manifest: the operator vouches for
    the folder at start, and the server then guards it against tampering while it runs.
    """
    files: dict[str, bytes] = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink() or not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        if not SAFE_PATH.match(rel):
            log.warning("not pinning %s: name is not a plain boot file name", rel)
            continue
        files[rel] = hashlib.sha256(p.read_bytes()).digest()
    return ManifestApproval(files)


ListBootImages = Callable[[], list[dict[str, Any]]]


def _list_with_kubernetes(kubeconfig: str | None) -> ListBootImages:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = client.CustomObjectsApi(local_api_client(kubeconfig))

    def list_all() -> list[dict[str, Any]]:
        try:
            out = cast(dict[str, Any], api.list_cluster_custom_object(
                "trustcap.io", "v1alpha1", "bootimages", _request_timeout=10
            ))
        except (ApiException, OSError) as exc:
            raise ApprovalUnavailable(f"cannot list BootImages: {exc}") from exc
        items: list[dict[str, Any]] = out.get("items", [])
        return items

    return list_all


class BootImageApproval:
    """Approved files from the `BootImage` resources whose status says Approved.

    An image is approved when `status.phase == "Approved"` (the operator sets it from the chain's
    answer). A malformed approved image is skipped with a warning; it never widens what is served.
    """

    def __init__(self, list_images: ListBootImages | None = None, kubeconfig: str | None = None) -> None:
        self._list = list_images or _list_with_kubernetes(kubeconfig)

    def approved(self) -> Mapping[str, bytes]:
        files: dict[str, bytes] = {}
        for item in self._list():
            name = item.get("metadata", {}).get("name", "?")
            if item.get("status", {}).get("phase") != "Approved":
                continue
            spec = item.get("spec", {})
            try:
                entries = {
                    check_path(spec[part]["path"], f"BootImage {name}: spec.{part}.path"):
                    parse_digest(spec[part]["digest"], f"BootImage {name}: spec.{part}.digest")
                    for part in ("kernel", "initrd", "ipxeScript")
                }
            except (KeyError, TypeError, ApprovalUnavailable, PathRejected) as exc:
                log.warning("skipping BootImage %s: %s", name, exc)
                continue
            for path, digest in entries.items():
                if files.get(path, digest) != digest:
                    # Two approved images claim one path with different bytes: serve neither.
                    log.warning("BootImage %s: %s approved with two digests; refusing it", name, path)
                    files[path] = b""
                else:
                    files[path] = digest
        return {k: v for k, v in files.items() if v}
