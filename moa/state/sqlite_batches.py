"""The Batch API's records in the embedded store's SQLite file (``moa.state.sqlite_store``), in
tables of their own. Every read-modify-write is one ``BEGIN IMMEDIATE`` transaction, as the
ledger's are: a status change or a lease claim is a single step for every process on the file."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeVar

from moa.state.batches import TERMINAL, BatchRecord, FileRecord

T = TypeVar("T")
Run = Callable[[Callable[[sqlite3.Connection], T]], Awaitable[T]]

SCHEMA = """
CREATE TABLE IF NOT EXISTS batch_files (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL, open INTEGER NOT NULL, record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_by_owner ON batches (owner, seq);
CREATE INDEX IF NOT EXISTS batches_open ON batches (open, seq);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at REAL NOT NULL
);
"""


class SQLiteBatches:
    """``run``: the store's way to run a function in a transaction, in a worker thread."""

    def __init__(self, run: Run[Any]) -> None:
        self._run = run

    async def add_file(self, record: FileRecord) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO batch_files VALUES (?, ?, ?)",
                (record.id, record.owner, record.model_dump_json()),
            )
        )

    async def file(self, file_id: str) -> FileRecord | None:
        row = await self._run(
            lambda db: db.execute("SELECT record FROM batch_files WHERE id = ?", (file_id,)).fetchone()
        )
        return FileRecord.model_validate_json(row[0]) if row else None

    async def add_batch(self, record: BatchRecord) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT INTO batches (id, owner, open, record) VALUES (?, ?, ?, ?)",
                (record.id, record.owner, record.status not in TERMINAL, record.model_dump_json()),
            )
        )

    async def batch(self, batch_id: str) -> BatchRecord | None:
        row = await self._run(
            lambda db: db.execute("SELECT record FROM batches WHERE id = ?", (batch_id,)).fetchone()
        )
        return BatchRecord.model_validate_json(row[0]) if row else None

    async def update_batch(
        self, batch_id: str, changes: dict[str, Any], when: Collection[str] | None = None
    ) -> BatchRecord | None:
        def update(db: sqlite3.Connection) -> BatchRecord | None:
            row = db.execute("SELECT record FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row is None:
                return None
            record = BatchRecord.model_validate_json(row[0])
            if when is not None and record.status not in when:
                return None
            new = record.changed(changes)
            db.execute(
                "UPDATE batches SET record = ?, open = ? WHERE id = ?",
                (new.model_dump_json(), new.status not in TERMINAL, batch_id),
            )
            return new

        result: BatchRecord | None = await self._run(update)
        return result

    async def list_batches(self, owner: str, after: str | None, limit: int) -> list[BatchRecord]:
        def select(db: sqlite3.Connection) -> list[Any]:
            args: tuple[str, ...]
            if after is None:
                sql, args = "SELECT record FROM batches WHERE owner = ?", (owner,)
            else:
                # An id that is not the owner's finds no row: nothing comes after it.
                sql = (
                    "SELECT record FROM batches WHERE owner = ? AND seq < "
                    "(SELECT seq FROM batches WHERE id = ? AND owner = ?)"
                )
                args = (owner, after, owner)
            return db.execute(f"{sql} ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()

        rows = await self._run(select)
        return [BatchRecord.model_validate_json(r[0]) for r in rows]

    async def open_batches(self) -> list[str]:
        rows = await self._run(
            lambda db: db.execute("SELECT id FROM batches WHERE open = 1 ORDER BY seq").fetchall()
        )
        return [str(r[0]) for r in rows]

    async def claim(self, name: str, holder: str, ttl_s: float) -> bool:
        def claim(db: sqlite3.Connection) -> bool:
            now = time.time()
            row = db.execute("SELECT holder, expires_at FROM leases WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] != holder and row[1] > now:
                return False
            db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?)", (name, holder, now + ttl_s))
            return True

        claimed: bool = await self._run(claim)
        return claimed

    async def release(self, name: str, holder: str) -> None:
        await self._run(
            lambda db: db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))
        )


__all__ = ["SCHEMA", "SQLiteBatches"]
