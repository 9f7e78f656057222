"""One SQLite file shared by worker threads: each thread gets its own connection (WAL mode), and
all of them are closed together. The key and spend state (``moa.state``) and the response cache
(``moa.cache``) both keep their SQLite files this way.

Those files hold every tenant's prompts and answers (the cache) and the keys' hashes and spend
(the state), so they are private to the service's user: the file is created ``0600`` before
SQLite opens it (SQLite creates its ``-wal`` and ``-shm`` files with the database file's
permissions), and a directory created for it is ``0700``. Files an earlier version left
readable to others are narrowed to ``0600`` when opened.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700
# SQLite's side files: the write-ahead log and its shared-memory index.
SIDE_FILES = ("-wal", "-shm", "-journal")


def private_file(path: Path) -> None:
    """``path`` (and any SQLite side file of it) exists and is readable by its owner only. The
    directory is created ``0700`` if missing; an existing one is left as it is (it may be shared
    on purpose, and the files in it are private either way)."""
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    for suffix in SIDE_FILES:
        side = path.with_name(path.name + suffix)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(side.stat().st_mode) & 0o077:
                side.chmod(FILE_MODE)


class ThreadConnections:
    """A connection per thread to ``path``; ``get()`` from the thread that will use it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        private_file(self.path)
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
