"""Files replaced whole: a reader, or the next boot after a crash, finds the old content or the new one,
never half of either.

The new content goes to a private temporary file beside the target (same folder, so the rename cannot
cross file systems), is flushed and fsynced, and then renamed over the target in one step. One home for
this pattern (issue 10 item 8): the content store's blobs and the trust root's key files use it, and the
temporary file is removed whatever fails.

Errors are the OSError that happened: each caller translates it into its own error, naming its own fix.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["replacing", "write_atomic"]


@contextlib.contextmanager
def replacing(path: Path, *, mode: int = 0o600, exclusive: bool = False) -> Iterator[BinaryIO]:
    """A file to write `path`'s new content into; it takes `path`'s place only if the block ends without
    an error. `mode` applies before the umask. `exclusive`: FileExistsError if `path` exists, also when it
    appears while we write (it is linked into place, which never replaces)."""
    path = Path(path)
    if exclusive and path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path} already exists; refusing to overwrite it") from None
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, exclusive: bool = False) -> None:
    """Replace `path` with `data` in one step (see `replacing`)."""
    with replacing(path, mode=mode, exclusive=exclusive) as fh:
        fh.write(data)
