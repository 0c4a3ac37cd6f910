"""The writer's journal: a verdict is journaled once, batched once, and a failed step leaves no trace."""

from __future__ import annotations

from pathlib import Path

import pytest

from trustcap.chain.errors import JournalError
from trustcap.chain.journal import Journal


def _j(tmp_path: Path) -> Journal:
    return Journal(tmp_path / "j.sqlite")


def test_a_verdict_is_journaled_once(tmp_path: Path) -> None:
    j = _j(tmp_path)
    assert j.add_verdict("0x01", 1, b"\x01" * 32, "{}", "ns/a")
    assert not j.add_verdict("0x01", 1, b"\x01" * 32, "{}", "ns/a")
    assert j.counts()["verdicts"] == 1


def test_batching_a_verdict_twice_fails_and_changes_nothing(tmp_path: Path) -> None:
    j = _j(tmp_path)
    for i in (1, 2):
        j.add_verdict(f"0x0{i}", 1, bytes([i]) * 32, "{}", "s")
    j.seal("0xb1", 1, b"\xaa" * 32, 1, [b"\x01" * 65], ["0x01"])
    with pytest.raises(JournalError, match="0x01 is already in a batch"):
        j.seal("0xb2", 1, b"\xbb" * 32, 2, [b"\x01" * 65], ["0x02", "0x01"])
    assert j.batch("0xb2") is None, "the failed seal left a batch behind"
    assert j.verdict("0x02").batch_id is None  # type: ignore[union-attr]
    assert j.counts() == {"verdicts": 2, "pending": 1, "batches": 1, "unconfirmed": 1}


def test_state_survives_reopening(tmp_path: Path) -> None:
    j = _j(tmp_path)
    j.add_verdict("0x01", 4, b"\x01" * 32, "{}", "s")
    j.seal("0xb1", 4, b"\xaa" * 32, 1, [b"\x02" * 65], ["0x01"])
    j.add_tx("0xt1", "0xb1", 7, b"raw", 100, 1)
    j.mark_sent("0xt1")
    j.close()
    j2 = _j(tmp_path)
    (b,) = j2.unconfirmed()
    assert (b.batch_id, b.epoch, b.signatures) == ("0xb1", 4, [b"\x02" * 65])
    (t,) = j2.txs("0xb1")
    assert (t.nonce, t.raw, t.state) == (7, b"raw", "sent")
    j2.confirm("0xb1", "0xt1", 12, "0xh")
    assert j2.unconfirmed() == [] and j2.batch("0xb1").block_number == 12  # type: ignore[union-attr]


def test_unreadable_journal_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "j.sqlite"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(JournalError, match=r"j\.sqlite"):
        Journal(bad)
