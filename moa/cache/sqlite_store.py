"""The single-node shared store: a SQLite file (WAL), like the key and spend state in moa/state.

Every operation runs in a worker thread with that thread's own connection, never on the event loop.
Past ``max_bytes`` the oldest entries go first (by when they were written).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from moa.cache.store import StoreStats
from moa.sqlite_files import ThreadConnections

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    k TEXT PRIMARY KEY, scope TEXT NOT NULL, v BLOB NOT NULL, size INTEGER NOT NULL,
    expires REAL NOT NULL, written REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_written ON entries (written);
CREATE INDEX IF NOT EXISTS entries_by_scope ON entries (scope);
CREATE TABLE IF NOT EXISTS idx (
    name TEXT NOT NULL, scope TEXT NOT NULL, member TEXT NOT NULL, payload BLOB NOT NULL,
    expires REAL NOT NULL, written REAL NOT NULL, PRIMARY KEY (name, member)
);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, n INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('bytes', 0);
INSERT OR IGNORE INTO meta VALUES ('generation', 0);
"""


def _scope(key: str) -> str:
    return key.split("|", 1)[0]


class SQLiteCacheStore:
    def __init__(self, path: str | Path, max_bytes: int) -> None:
        self.path = Path(path)
        self._connections = ThreadConnections(self.path)
        self.max_bytes = max_bytes
        self._db().executescript(SCHEMA)  # one script, committed as it runs

    def _db(self) -> sqlite3.Connection:
        return self._connections.get()

    def _run_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            out = fn(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return out

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self._run_sync, fn)

    async def get(self, key: str) -> bytes | None:
        def read(db: sqlite3.Connection) -> bytes | None:
            row = db.execute("SELECT v, expires FROM entries WHERE k = ?", (key,)).fetchone()
            return bytes(row[0]) if row and row[1] > time.time() else None

        return await asyncio.to_thread(lambda: read(self._db()))

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        def write(db: sqlite3.Connection) -> None:
            now = time.time()
            old = db.execute("SELECT size FROM entries WHERE k = ?", (key,)).fetchone()
            delta = len(value) - (old[0] if old else 0)
            db.execute(
                "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?)",
                (key, _scope(key), value, len(value), now + ttl_s, now),
            )
            total = db.execute(
                "UPDATE meta SET n = n + ? WHERE k = 'bytes' RETURNING n", (delta,)
            ).fetchone()[0]
            if total > self.max_bytes:
                self._evict(db, total, now)

        await self._run(write)

    def _evict(self, db: sqlite3.Connection, total: int, now: float) -> None:
        """Expired entries first, then the oldest, until the store fits ``max_bytes``."""
        freed = db.execute("DELETE FROM entries WHERE expires <= ? RETURNING size", (now,)).fetchall()
        total -= sum(r[0] for r in freed)
        for k, size in db.execute("SELECT k, size FROM entries ORDER BY written").fetchall():
            if total <= self.max_bytes:
                break
            db.execute("DELETE FROM entries WHERE k = ?", (k,))
            total -= size
        db.execute("UPDATE meta SET n = ? WHERE k = 'bytes'", (total,))

    async def index_add(self, index: str, member: str, payload: bytes, ttl_s: float, keep: int) -> None:
        def add(db: sqlite3.Connection) -> None:
            now = time.time()
            db.execute(
                "INSERT OR REPLACE INTO idx VALUES (?, ?, ?, ?, ?, ?)",
                (index, _scope(index), member, payload, now + ttl_s, now),
            )
            db.execute(
                "DELETE FROM idx WHERE name = ? AND (expires <= ? OR member NOT IN "
                "(SELECT member FROM idx WHERE name = ? ORDER BY written DESC LIMIT ?))",
                (index, now, index, keep),
            )

        await self._run(add)

    async def index_read(self, index: str) -> dict[str, bytes]:
        def read() -> dict[str, bytes]:
            rows = (
                self._db()
                .execute(
                    "SELECT member, payload FROM idx WHERE name = ? AND expires > ?", (index, time.time())
                )
                .fetchall()
            )
            return {m: bytes(p) for m, p in rows}

        return await asyncio.to_thread(read)

    async def clear(self, scope: str | None) -> int:
        def clear(db: sqlite3.Connection) -> int:
            if scope is None:
                n = db.execute("DELETE FROM entries").rowcount
                db.execute("DELETE FROM idx")
            else:
                n = db.execute("DELETE FROM entries WHERE scope = ?", (scope,)).rowcount
                db.execute("DELETE FROM idx WHERE scope = ?", (scope,))
            left = db.execute("SELECT COALESCE(SUM(size), 0) FROM entries").fetchone()[0]
            db.execute("UPDATE meta SET n = ? WHERE k = 'bytes'", (left,))
            # In the same transaction: a replica that sees the new generation sees no old entry.
            db.execute("UPDATE meta SET n = n + 1 WHERE k = 'generation'")
            return int(n)

        return await self._run(clear)

    async def generation(self) -> int:
        def read() -> int:
            row = self._db().execute("SELECT n FROM meta WHERE k = 'generation'").fetchone()
            return int(row[0]) if row else 0

        return await asyncio.to_thread(read)

    async def stats(self) -> StoreStats:
        def read() -> StoreStats:
            db = self._db()
            n, size = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries WHERE expires > ?", (time.time(),)
            ).fetchone()
            return StoreStats(entries=n, bytes=size, where=str(self.path))

        return await asyncio.to_thread(read)

    async def close(self) -> None:
        self._connections.close_all()
