"""Secret files: refuse what others can read, write what only we can read.

Why: a key file that group or others can read is a leaked key on any shared machine; ssh refuses such
files for the same reason, and so do we, naming the file and the fix.
"""

from __future__ import annotations

import stat
from pathlib import Path

from trustcap.atomicfile import write_atomic
from trustcap.trustroot.errors import KeyFilePermissions, TrustRootUnavailable


def check_private_file(path: Path, what: str) -> None:
    """Raise unless `path` is a regular file with no group/other permission bits."""
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise TrustRootUnavailable(f"{what} {path} does not exist") from exc
    except OSError as exc:
        raise TrustRootUnavailable(f"{what} {path} cannot be read: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise KeyFilePermissions(f"{what} {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise KeyFilePermissions(
            f"{what} {path} has mode {mode:04o} and is open to group or others; run: chmod 600 {path}"
        )


def write_private_file(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write `data` to `path` with mode 0600, atomically (trustcap.atomicfile) so a crash leaves either
    the old file or the new one, never half a key; `exclusive` refuses to overwrite a secret."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, mode=0o600, exclusive=exclusive)
