"""The chain-writer's durable journal: an SQLite file, one transaction per step, fsync'd (synchronous=FULL).

Every fact the writer must not forget is written here *before* the action that depends on it: a verdict
before it is batched, a sealed batch (leaves, root, signatures) before any transaction for it, a signed
raw transaction (nonce, fees, hash) before it is sent. SQLite's atomic commit means a process killed at
any line leaves either the old or the new state, never half of one; the writer's recovery reads this
file and the chain and carries on (docs/decisions/0031-chain-writer-journal.md).

    verdicts(verdict_id PK, epoch, leaf, body, source, batch_id NULL)    INSERT OR IGNORE: once per id
    batches(batch_id PK, seq, epoch, root, count, signatures, state, tx_hash, block_number, block_hash)
    txs(tx_hash PK, batch_id, nonce, raw, max_fee, tip, state, created_at)
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustcap.chain.errors import JournalError

__all__ = ["BatchRow", "Journal", "TxRow", "VerdictRow"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    verdict_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, leaf BLOB NOT NULL, body TEXT NOT NULL,
    source TEXT NOT NULL, batch_id TEXT, added_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS verdicts_pending ON verdicts(batch_id, epoch);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY, seq INTEGER NOT NULL UNIQUE, epoch INTEGER NOT NULL, root BLOB NOT NULL UNIQUE,
    count INTEGER NOT NULL, signatures TEXT NOT NULL, state TEXT NOT NULL CHECK (state IN ('sealed', 'confirmed')),
    tx_hash TEXT, block_number INTEGER, block_hash TEXT, sealed_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS txs (
    tx_hash TEXT PRIMARY KEY, batch_id TEXT NOT NULL REFERENCES batches(batch_id), nonce INTEGER NOT NULL,
    raw BLOB NOT NULL, max_fee INTEGER NOT NULL, tip INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('signed', 'sent')), created_at REAL NOT NULL);
"""


@dataclass(frozen=True)
class VerdictRow:
    verdict_id: str
    epoch: int
    leaf: bytes
    body: str
    source: str
    batch_id: str | None


@dataclass(frozen=True)
class BatchRow:
    batch_id: str
    seq: int
    epoch: int
    root: bytes
    count: int
    signatures: list[bytes]
    state: str
    tx_hash: str | None
    block_number: int | None
    block_hash: str | None


@dataclass(frozen=True)
class TxRow:
    tx_hash: str
    batch_id: str
    nonce: int
    raw: bytes
    max_fee: int
    tip: int
    state: str
    created_at: float


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        # The writer is one loop, but the controller reads records from kopf's threads: steps serialise.
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open the chain-writer journal {path}: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One atomic step: all of it reaches the disk, or none of it."""
        try:
            self._lock.acquire()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise JournalError(f"chain-writer journal {self.path}: {exc}") from exc
        finally:
            self._lock.release()

    # -- verdicts -----------------------------------------------------------------------------------------
    def add_verdict(self, verdict_id: str, epoch: int, leaf: bytes, body: str, source: str) -> bool:
        with self.tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO verdicts VALUES (?, ?, ?, ?, ?, NULL, ?)",
                (verdict_id, epoch, leaf, body, source, time.time()),
            )
            return cur.rowcount == 1

    def verdict(self, verdict_id: str) -> VerdictRow | None:
        row = self._db.execute("SELECT verdict_id, epoch, leaf, body, source, batch_id FROM verdicts "
                               "WHERE verdict_id = ?", (verdict_id,)).fetchone()
        return VerdictRow(*row) if row else None

    def pending_epochs(self) -> list[int]:
        return [r[0] for r in self._db.execute(
            "SELECT DISTINCT epoch FROM verdicts WHERE batch_id IS NULL ORDER BY epoch")]

    def pending(self, epoch: int, limit: int) -> list[VerdictRow]:
        rows = self._db.execute(
            "SELECT verdict_id, epoch, leaf, body, source, batch_id FROM verdicts WHERE batch_id IS NULL "
            "AND epoch = ? ORDER BY verdict_id LIMIT ?", (epoch, limit)).fetchall()
        return [VerdictRow(*r) for r in rows]

    def batch_leaves(self, batch_id: str) -> list[tuple[str, bytes]]:
        return [(r[0], r[1]) for r in self._db.execute(
            "SELECT verdict_id, leaf FROM verdicts WHERE batch_id = ? ORDER BY verdict_id", (batch_id,))]

    def counts(self) -> dict[str, int]:
        one = self._db.execute
        return {
            "verdicts": one("SELECT COUNT(*) FROM verdicts").fetchone()[0],
            "pending": one("SELECT COUNT(*) FROM verdicts WHERE batch_id IS NULL").fetchone()[0],
            "batches": one("SELECT COUNT(*) FROM batches").fetchone()[0],
            "unconfirmed": one("SELECT COUNT(*) FROM batches WHERE state != 'confirmed'").fetchone()[0],
        }

    # -- batches ------------------------------------------------------------------------------------------
    def seal(self, batch_id: str, epoch: int, root: bytes, count: int, signatures: Sequence[bytes],
             verdict_ids: Sequence[str]) -> None:
        """Record the batch and assign its verdicts in one step; a verdict already batched is an error."""
        with self.tx() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM batches").fetchone()[0]
            db.execute("INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?, 'sealed', NULL, NULL, NULL, ?)",
                       (batch_id, seq, epoch, root, count, json.dumps([s.hex() for s in signatures]), time.time()))
            for vid in verdict_ids:
                cur = db.execute("UPDATE verdicts SET batch_id = ? WHERE verdict_id = ? AND batch_id IS NULL",
                                 (batch_id, vid))
                if cur.rowcount != 1:
                    raise JournalError(f"verdict {vid} is already in a batch or unknown: refusing to batch it twice")

    def _batch(self, row: Any) -> BatchRow:
        bid, seq, epoch, root, count, sigs, state, txh, bn, bh = row
        return BatchRow(str(bid), int(seq), int(epoch), bytes(root), int(count),
                        [bytes.fromhex(s) for s in json.loads(str(sigs))], str(state),
                        txh, bn, bh)

    _BCOLS = "batch_id, seq, epoch, root, count, signatures, state, tx_hash, block_number, block_hash"

    def unconfirmed(self) -> list[BatchRow]:
        rows = self._db.execute(f"SELECT {self._BCOLS} FROM batches WHERE state != 'confirmed' ORDER BY seq")  # noqa: S608
        return [self._batch(r) for r in rows]

    def batch(self, batch_id: str) -> BatchRow | None:
        row = self._db.execute(f"SELECT {self._BCOLS} FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()  # noqa: S608
        return self._batch(row) if row else None

    def batches(self) -> list[BatchRow]:
        return [self._batch(r) for r in self._db.execute(f"SELECT {self._BCOLS} FROM batches ORDER BY seq")]  # noqa: S608

    def confirm(self, batch_id: str, tx_hash: str, block_number: int, block_hash: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE batches SET state = 'confirmed', tx_hash = ?, block_number = ?, block_hash = ? "
                       "WHERE batch_id = ?", (tx_hash, block_number, block_hash, batch_id))

    # -- transactions -------------------------------------------------------------------------------------
    def add_tx(self, tx_hash: str, batch_id: str, nonce: int, raw: bytes, max_fee: int, tip: int) -> None:
        with self.tx() as db:
            db.execute("INSERT OR IGNORE INTO txs VALUES (?, ?, ?, ?, ?, ?, 'signed', ?)",
                       (tx_hash, batch_id, nonce, raw, max_fee, tip, time.time()))

    def mark_sent(self, tx_hash: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE txs SET state = 'sent' WHERE tx_hash = ?", (tx_hash,))

    def txs(self, batch_id: str | None = None) -> list[TxRow]:
        q = "SELECT tx_hash, batch_id, nonce, raw, max_fee, tip, state, created_at FROM txs"
        rows = (self._db.execute(q + " WHERE batch_id = ? ORDER BY created_at, rowid", (batch_id,))
                if batch_id else self._db.execute(q + " ORDER BY created_at, rowid"))
        return [TxRow(*r) for r in rows]
