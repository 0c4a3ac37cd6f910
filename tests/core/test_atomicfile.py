"""Files replaced whole (trustcap.atomicfile): old content or new, never half, and no temporary left."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from trustcap.atomicfile import replacing, write_atomic


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_replaces_the_content_with_mode_0600(tmp_path: Path) -> None:
    target = tmp_path / "key"
    target.write_bytes(b"old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) & 0o077 == 0
    assert _leftovers(tmp_path) == []


def test_a_failure_while_writing_leaves_the_old_content_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "key"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"), replacing(target) as fh:
        fh.write(b"half a ne")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_exclusive_refuses_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "key"
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_atomic(target, b"new", exclusive=True)
    assert target.read_bytes() == b"old"


def test_exclusive_refuses_a_file_that_appears_while_writing(tmp_path: Path) -> None:
    """The check before writing is not enough on its own: the file is linked into place, never replaced."""
    target = tmp_path / "key"
    with pytest.raises(FileExistsError, match="refusing to overwrite"), replacing(target, exclusive=True) as fh:
        fh.write(b"ours")
        target.write_bytes(b"theirs")  # another writer got there first
    assert target.read_bytes() == b"theirs"
    assert _leftovers(tmp_path) == []


def test_control_exclusive_creates_a_new_file(tmp_path: Path) -> None:
    target = tmp_path / "key"
    write_atomic(target, b"new", exclusive=True)
    assert target.read_bytes() == b"new"
    assert _leftovers(tmp_path) == []
