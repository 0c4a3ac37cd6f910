"""Where the list of approved boot files comes from.

The gateway serves a file only if some approved boot image lists it with a digest. Who approves is
pluggable (`ApprovalSource`): the `BootImage` status in the Kubernetes API (`BootImageApproval`), which the
operator mirrors from the chain's `NodeRegistry.approvedBootImage` (decision 0063); a fixed manifest
(`ManifestApproval`) serves tests and `trustcap netboot serve`.

A source returns a fresh mapping on each call; the store asks again on every request, so a revoked image
stops being served at the next request, not at the next restart.

An approval also expires here, not only in the operator (issue 12 item 13, decisions 0097 and 0116): the
operator dates each chain read in the BootImage's `status.checkedAt`, and an Approved image whose
`checkedAt` is older than TRUSTCAP_BOOTIMAGE_MAX_AGE_SECONDS (the operator's setting, default 600 s) is
not served. So a revocation is not hidden for longer than that by an RPC outage, nor by an operator that
is down and no longer turns the stale approval Pending. The refusal names the image and the age, and the
store counts it (`trustcap_netboot_refused_total{reason="not-approved"}`). An Approved status without
`checkedAt` (written by hand, or by an operator that does not date it) is served, with a warning, unless
TRUSTCAP_BOOTIMAGE_REQUIRE_CHECKED_AT=1.

    BootImage status {phase: Approved, checkedAt}     BootImageApproval.approved()     ApprovedStore
      checkedAt <= max age ago ---------------------> its files approved ------------> served
      checkedAt older, unparseable, in the future --> its files refused, and why ----> NotApproved:
                                                                              "BootImage X's approval is N s old"
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final, Protocol, cast, runtime_checkable

from trustcap.api import BOOTIMAGES, GROUP, VERSION, BootImagePhase
from trustcap.bootimage import BootImageSpecError, parse_sha256
from trustcap.errors import ConfigError
from trustcap.forms import parse_rfc3339, positive_seconds
from trustcap.kubeclient import local_api_client
from trustcap.netboot.errors import ApprovalUnavailable, NetbootError, NotApproved, PathRejected

__all__ = [
    "MAX_AGE_S",
    "MAX_AGE_SETTING",
    "REQUIRE_CHECKED_SETTING",
    "ApprovalSource",
    "ApprovedFiles",
    "BootImageApproval",
    "ManifestApproval",
    "parse_digest",
    "pin_directory",
]

#: The operator's setting (operator/bootimage.py), read here too: one maximum age for the whole Pi.
MAX_AGE_SETTING: Final = "TRUSTCAP_BOOTIMAGE_MAX_AGE_SECONDS"
MAX_AGE_S: Final = 600.0
REQUIRE_CHECKED_SETTING: Final = "TRUSTCAP_BOOTIMAGE_REQUIRE_CHECKED_AT"
#: How far ahead of this clock a `checkedAt` may be (two hosts' clocks); further is no date at all.
CLOCK_SKEW_S: Final = 60.0

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


class ApprovedFiles(Mapping[str, bytes]):
    """Approved path -> sha256, as `ApprovalSource.approved` returns, that also knows why some paths are
    not approved: looking one of those up (`[]`, `get`) raises NotApproved with that reason, so the store's
    refusal (its log line, metric and hooks) names the image and what is wrong with its approval, not
    only "not part of any approved boot image". Such a path is not `in` the mapping, nor listed."""

    def __init__(self, files: Mapping[str, bytes], refused: Mapping[str, str] | None = None) -> None:
        self._files = dict(files)
        self._refused = {k: v for k, v in (refused or {}).items() if k not in self._files}

    def __getitem__(self, name: str) -> bytes:
        if name in self._files:
            return self._files[name]
        if name in self._refused:
            raise NotApproved(self._refused[name])
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return name in self._files

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    @property
    def refused(self) -> Mapping[str, str]:
        return dict(self._refused)


def _positive_seconds(name: str, default: float) -> float:
    try:
        return positive_seconds(name, default)
    except ConfigError as exc:
        raise NetbootError(str(exc)) from None


def _flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise NetbootError(f"{name}={raw!r}: give 1 or 0")


ListBootImages = Callable[[], list[dict[str, Any]]]


def _list_with_kubernetes(kubeconfig: str | None) -> ListBootImages:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = client.CustomObjectsApi(local_api_client(kubeconfig))

    def list_all() -> list[dict[str, Any]]:
        try:
            out = cast(dict[str, Any], api.list_cluster_custom_object(
                GROUP, VERSION, BOOTIMAGES, _request_timeout=10
            ))
        except (ApiException, OSError) as exc:
            raise ApprovalUnavailable(f"cannot list BootImages: {exc}") from exc
        items: list[dict[str, Any]] = out.get("items", [])
        return items

    return list_all


class BootImageApproval:
    """Approved files from the `BootImage` resources whose status says Approved, and recently so.

    An image is approved when `status.phase == "Approved"` (the operator sets it from the chain's
    answer) and its `status.checkedAt` is at most `max_age_s` old (see the module docstring). A malformed
    approved image is skipped with a warning; it never widens what is served.

    `max_age_s` and `require_checked` default to TRUSTCAP_BOOTIMAGE_MAX_AGE_SECONDS (600) and
    TRUSTCAP_BOOTIMAGE_REQUIRE_CHECKED_AT (off); a malformed setting is a NetbootError at construction.
    """

    def __init__(self, list_images: ListBootImages | None = None, kubeconfig: str | None = None, *,
                 max_age_s: float | None = None, require_checked: bool | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._list = list_images or _list_with_kubernetes(kubeconfig)
        self.max_age_s = max_age_s if max_age_s is not None else _positive_seconds(MAX_AGE_SETTING, MAX_AGE_S)
        if not self.max_age_s > 0:
            raise NetbootError(f"max_age_s={self.max_age_s!r}: a BootImage approval's maximum age must be positive")
        self.require_checked = require_checked if require_checked is not None else _flag(REQUIRE_CHECKED_SETTING)
        self.clock = clock
        self._said: dict[str, str] = {}  # image -> the last thing logged about its age (once per change)

    def _stale(self, name: str, status: Mapping[str, Any]) -> str | None:
        """Why the Approved image `name` must not be served for its approval's age, or None."""
        raw = status.get("checkedAt")
        if raw is None:
            if self.require_checked:
                return (f"BootImage {name}'s approval carries no status.checkedAt, so its age is unknown "
                        f"({REQUIRE_CHECKED_SETTING} is on): the operator dates each chain read there")
            self._say(name, "undated", logging.WARNING, "BootImage %s is Approved with no status.checkedAt: its age "
                      "cannot be checked, so it is served (set %s=1 where the operator dates its approvals)",
                      name, REQUIRE_CHECKED_SETTING)
            return None
        checked = parse_rfc3339(raw)
        if checked is None:
            return f"BootImage {name}'s status.checkedAt {str(raw)[:64]!r} is not an RFC 3339 time"
        age = self.clock() - checked
        if age < -CLOCK_SKEW_S:
            return (f"BootImage {name}'s approval is dated {-age:.0f} s in the future (status.checkedAt {raw}), "
                    f"more than the {CLOCK_SKEW_S:.0f} s two clocks may differ: check the Pi's and the operator's "
                    "clocks")
        if age > self.max_age_s:
            return (f"BootImage {name}'s approval is {age:.0f} s old (status.checkedAt {raw}), over the maximum of "
                    f"{self.max_age_s:.0f} s ({MAX_AGE_SETTING}): the chain has not confirmed it since, because "
                    "the operator is down or cannot reach the chain RPC; it is served again after the operator's "
                    "next successful chain read")
        return None

    def _say(self, name: str, what: str, level: int, msg: str, *args: Any) -> None:
        if self._said.get(name) != what:
            self._said[name] = what
            log.log(level, msg, *args)

    def approved(self) -> ApprovedFiles:
        files: dict[str, bytes] = {}
        refused: dict[str, str] = {}
        for item in self._list():
            name = item.get("metadata", {}).get("name", "?")
            status = item.get("status") or {}
            if status.get("phase") != BootImagePhase.APPROVED:
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
            stale = self._stale(name, status)
            if stale is not None:
                self._say(name, "stale", logging.WARNING, "not serving BootImage %s: %s", name, stale)
                for path in entries:
                    refused[path] = f"{path}: {stale}"
                continue
            if self._said.get(name) == "stale":
                self._say(name, "fresh", logging.INFO, "BootImage %s: approval fresh again, serving it", name)
            for path, digest in entries.items():
                if files.get(path, digest) != digest:
                    # Two approved images claim one path with different bytes: serve neither.
                    log.warning("BootImage %s: %s approved with two digests; refusing it", name, path)
                    files[path] = b""
                else:
                    files[path] = digest
        return ApprovedFiles({k: v for k, v in files.items() if v}, refused)
