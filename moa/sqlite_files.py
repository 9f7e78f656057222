"""One SQLite file shared by worker threads: each thread gets its own connection (WAL mode), and
all of them are closed together. The key and spend state (``moa.state``) and the response cache
(``moa.cache``) both keep their SQLite files this way."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path


class ThreadConnections:
    """A connection per thread to ``path``; ``get()`` from the thread that will use it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []

    def get(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            # isolation_level=None: transactions are the caller's (BEGIN IMMEDIATE), not the module's.
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
            with self._lock:
                self._connections.append(db)
        return db

    def close_all(self) -> None:
        with self._lock:
            for db in self._connections:
                db.close()
            self._connections.clear()


__all__ = ["ThreadConnections"]
