"""The one 32-byte value the chain approves for a BootImage: its *image id* (decision 0063).

Why one value for four digests: a gateway serves three files (kernel, initrd, iPXE script) by their
sha256, and quotes carry a fourth value, the *boot digest* (sha256 of canonical {kernel, initrd, cmdline},
netboot's `boot_digest`). Approving only the boot digest would leave the iPXE script unpinned; approving
the three file digests would leave the digest that quotes must carry to whoever writes the BootImage.
The image id hashes all four together, so one `NodeRegistry.approveBootImage(imageId)` pins every byte
served and the value every enrolled node must quote.

    imageId = sha256(JCS({"bootDigest": b, "initrd": i, "ipxeScript": s, "kernel": k}))

with each value the raw 32 bytes (encoded as `0x<hex>` by `trustcap.canonical`). It lives in the core
library because both the CLI (`trustcap bootimage id`) and the operator compute it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from trustcap.canonical import digest
from trustcap.errors import TrustcapError

__all__ = ["BootImageSpecError", "image_id", "image_id_of_spec", "parse_sha256"]

_SHA256: Final = re.compile(r"^sha256:[0-9a-f]{64}$")
#: The spec fields that make up the image id, in the order error messages name them.
FILE_PARTS: Final = ("kernel", "initrd", "ipxeScript")


class BootImageSpecError(TrustcapError):
    """A BootImage spec lacks a field the image id needs, or a digest is malformed; the message names it."""


def parse_sha256(value: Any, field: str) -> bytes:
    """`sha256:<64 lowercase hex>` -> 32 bytes, or BootImageSpecError naming `field`."""
    if not isinstance(value, str) or not _SHA256.match(value):
        raise BootImageSpecError(f"{field}: must be sha256:<64 lowercase hex>, got {value!r}")
    return bytes.fromhex(value[len("sha256:"):])


def image_id(*, kernel: bytes, initrd: bytes, ipxe_script: bytes, boot_digest: bytes) -> bytes:
    """The 32 bytes to approve on chain for these four sha256 digests (each 32 raw bytes)."""
    parts = {"bootDigest": boot_digest, "initrd": initrd, "ipxeScript": ipxe_script, "kernel": kernel}
    for name, value in parts.items():
        if len(value) != 32:
            raise BootImageSpecError(f"{name}: a sha256 digest is 32 bytes, got {len(value)}")
    return digest(parts)


def image_id_of_spec(spec: Mapping[str, Any]) -> bytes:
    """The image id of a BootImage `spec` (the CRD's shape); names the first missing or malformed field."""
    if not isinstance(spec, Mapping):
        raise BootImageSpecError("spec: must be a mapping")
    files: dict[str, bytes] = {}
    for part in FILE_PARTS:
        entry = spec.get(part)
        if not isinstance(entry, Mapping):
            raise BootImageSpecError(f"spec.{part}: missing (needs path and digest)")
        if "digest" not in entry:
            raise BootImageSpecError(f"spec.{part}.digest: missing")
        files[part] = parse_sha256(entry["digest"], f"spec.{part}.digest")
    if "bootDigest" not in spec:
        raise BootImageSpecError("spec.bootDigest: missing (the boot digest quotes carry; the image builder "
                                 "prints it as BuiltImage.bootdigest)")
    boot = parse_sha256(spec["bootDigest"], "spec.bootDigest")
    return image_id(kernel=files["kernel"], initrd=files["initrd"], ipxe_script=files["ipxeScript"],
                    boot_digest=boot)
