"""The embedded store: one SQLite file in WAL mode, shared by every process on this machine.

Each operation runs in a worker thread (never on the event loop) with its own connection, and
every read-modify-write is one ``BEGIN IMMEDIATE`` transaction: SQLite's write lock makes the
budget check and the reservation a single step for every process using the file.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from moa.sqlite_files import ThreadConnections
from moa.state import KeyExists, KeyLimits, KeyRecord, KeyStatus, Refused, Reservation
from moa.state.sqlite_batches import SCHEMA as BATCH_SCHEMA
from moa.state.sqlite_batches import SQLiteBatches

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    key_hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    status TEXT NOT NULL,
    limits TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS spend (
    key_id TEXT NOT NULL, win TEXT NOT NULL, micro INTEGER NOT NULL,
    PRIMARY KEY (key_id, win)
);
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY, key_id TEXT NOT NULL, win TEXT NOT NULL,
    micro INTEGER NOT NULL, expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_by_key ON reservations (key_id, win);
CREATE TABLE IF NOT EXISTS rate (
    key_id TEXT NOT NULL, minute INTEGER NOT NULL,
    requests INTEGER NOT NULL, tokens INTEGER NOT NULL,
    PRIMARY KEY (key_id, minute)
);
"""


def _record(row: tuple[str, str, str, float, str, str]) -> KeyRecord:
    id_, name, key_hash, created_at, status, limits = row
    return KeyRecord(
        id=id_,
        name=name,
        key_hash=key_hash,
        created_at=created_at,
        status=status,  # type: ignore[arg-type]
        limits=KeyLimits.model_validate_json(limits),
    )


class SQLiteStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._connections = ThreadConnections(self.path)
        with self._tx() as db:
            for statement in (SCHEMA + BATCH_SCHEMA).split(";"):
                if statement.strip():
                    db.execute(statement)
        # The Batch API's files, batches and leases, in the same file.
        self.batches = SQLiteBatches(self._run)

    # -- plumbing ---------------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        return self._connections.get()

    def _tx(self) -> _Transaction:
        return _Transaction(self._db())

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def work() -> T:
            with self._tx() as db:
                return fn(db)

        return await asyncio.to_thread(work)

    # -- keys -------------------------------------------------------------------------------------

    async def create_key(self, record: KeyRecord) -> None:
        def create(db: sqlite3.Connection) -> None:
            try:
                db.execute(
                    "INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        record.id,
                        record.name,
                        record.key_hash,
                        record.created_at,
                        record.status,
                        record.limits.model_dump_json(),
                    ),
                )
            except sqlite3.IntegrityError:
                raise KeyExists(f"a key named {record.name!r} already exists") from None

        await self._run(create)

    async def list_keys(self) -> list[KeyRecord]:
        rows = await self._run(lambda db: db.execute("SELECT * FROM keys ORDER BY created_at").fetchall())
        return [_record(r) for r in rows]

    async def key_by_hash(self, key_hash: str) -> KeyRecord | None:
        row = await self._run(
            lambda db: db.execute("SELECT * FROM keys WHERE key_hash = ?", (key_hash,)).fetchone()
        )
        return _record(row) if row else None

    async def key_by_name(self, name: str) -> KeyRecord | None:
        row = await self._run(lambda db: db.execute("SELECT * FROM keys WHERE name = ?", (name,)).fetchone())
        return _record(row) if row else None

    async def set_status(self, name: str, status: KeyStatus) -> bool:
        def update(db: sqlite3.Connection) -> bool:
            # A revoked key stays revoked.
            cur = db.execute(
                "UPDATE keys SET status = ? WHERE name = ? AND status != 'revoked'", (status, name)
            )
            return cur.rowcount > 0

        return await self._run(update)

    async def any_keys(self) -> bool:
        return bool(await self._run(lambda db: db.execute("SELECT 1 FROM keys LIMIT 1").fetchone()))

    # -- ledger -----------------------------------------------------------------------------------

    async def reserve(
        self, key_id: str, window: str, micro: int, budget_micro: int | None, ttl_s: float
    ) -> Reservation | Refused:
        rid = uuid.uuid4().hex

        def reserve(db: sqlite3.Connection) -> Reservation | Refused:
            now = time.time()
            db.execute("DELETE FROM reservations WHERE expires_at <= ?", (now,))
            if budget_micro is not None:
                (spent,) = db.execute(
                    "SELECT COALESCE(SUM(micro), 0) FROM spend WHERE key_id = ? AND win = ?",
                    (key_id, window),
                ).fetchone()
                (held,) = db.execute(
                    "SELECT COALESCE(SUM(micro), 0) FROM reservations WHERE key_id = ? AND win = ?",
                    (key_id, window),
                ).fetchone()
                remaining = budget_micro - spent - held
                if micro > remaining:
                    return Refused(remaining_micro=max(remaining, 0))
            db.execute(
                "INSERT INTO reservations VALUES (?, ?, ?, ?, ?)", (rid, key_id, window, micro, now + ttl_s)
            )
            return Reservation(id=rid, key_id=key_id, window=window, micro=micro)

        return await self._run(reserve)

    async def settle(self, reservation: Reservation, actual_micro: int) -> None:
        def settle(db: sqlite3.Connection) -> None:
            # A reservation that already expired is still charged: the money was spent.
            db.execute("DELETE FROM reservations WHERE id = ?", (reservation.id,))
            db.execute(
                "INSERT INTO spend VALUES (?, ?, ?) ON CONFLICT (key_id, win) DO UPDATE "
                "SET micro = micro + excluded.micro",
                (reservation.key_id, reservation.window, actual_micro),
            )

        await self._run(settle)

    async def spent(self, key_id: str, window: str) -> int:
        row = await self._run(
            lambda db: db.execute(
                "SELECT micro FROM spend WHERE key_id = ? AND win = ?", (key_id, window)
            ).fetchone()
        )
        return int(row[0]) if row else 0

    # -- per-key rate limits ----------------------------------------------------------------------

    async def take_request(self, key_id: str, minute: int, rpm: int | None, tpm: int | None) -> float | None:
        def take(db: sqlite3.Connection) -> float | None:
            row = db.execute(
                "SELECT requests, tokens FROM rate WHERE key_id = ? AND minute = ?", (key_id, minute)
            ).fetchone()
            requests, tokens = row or (0, 0)
            if (rpm is not None and requests >= rpm) or (tpm is not None and tokens >= tpm):
                return max((minute + 1) * 60 - time.time(), 0.001)
            db.execute(
                "INSERT INTO rate VALUES (?, ?, 1, 0) ON CONFLICT (key_id, minute) DO UPDATE "
                "SET requests = requests + 1",
                (key_id, minute),
            )
            db.execute("DELETE FROM rate WHERE minute < ?", (minute - 1,))
            return None

        return await self._run(take)

    async def reserve_tokens(self, key_id: str, minute: int, tokens: int, tpm: int) -> float | None:
        def reserve(db: sqlite3.Connection) -> float | None:
            row = db.execute(
                "SELECT tokens FROM rate WHERE key_id = ? AND minute = ?", (key_id, minute)
            ).fetchone()
            used = row[0] if row else 0
            if used > 0 and used + tokens > tpm:
                return max((minute + 1) * 60 - time.time(), 0.001)
            db.execute(
                "INSERT INTO rate VALUES (?, ?, 0, ?) ON CONFLICT (key_id, minute) DO UPDATE "
                "SET tokens = tokens + excluded.tokens",
                (key_id, minute, tokens),
            )
            return None

        return await self._run(reserve)

    async def add_tokens(self, key_id: str, minute: int, tokens: int) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT INTO rate VALUES (?, ?, 0, MAX(?, 0)) ON CONFLICT (key_id, minute) DO UPDATE "
                "SET tokens = MAX(tokens + ?, 0)",
                (key_id, minute, tokens, tokens),
            )
        )

    async def close(self) -> None:
        self._connections.close_all()


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ``ROLLBACK`` on an exception)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type is not None else "COMMIT")


__all__ = ["SQLiteStore"]
