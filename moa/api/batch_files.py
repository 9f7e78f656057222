"""The Batch API's files: records in the state store, contents in a directory (``batch.files_dir``).

An uploaded input is written under a temporary name and renamed once whole, so a file id names
whole contents only. A batch's output and error files have ids derived from the batch's, so a
replica that finalizes a batch again (after a restart in the middle of it) replaces them, never
adds a second pair. The directory is the service user's own (``0700``), each file ``0600``: a
batch's input and output hold its prompts and answers. On a cluster it must be one directory
every ingress replica sees (a shared file system): any replica may run or take over a batch.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moa.api.batch_objects import not_found
from moa.config import MoAConfig
from moa.sqlite_files import DIR_MODE, FILE_MODE
from moa.state import state_dir
from moa.state.batches import BatchStore, FileRecord


def files_dir(config: MoAConfig) -> Path:
    """``batch.files_dir``, else ``files/`` in the state directory."""
    chosen = config.batch.files_dir
    return Path(chosen).expanduser() if chosen else state_dir(config.state) / "files"


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def output_file_id(batch_id: str, kind: str) -> str:
    """The id of a batch's ``output`` or ``error`` file: the same every time it is written."""
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


class FileStore:
    def __init__(self, directory: Path, records: BatchStore) -> None:
        self.dir = directory
        self.records = records

    def _ready(self) -> None:
        self.dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        return self.dir / file_id

    def upload_path(self) -> Path:
        """Where an upload is written while it streams in (renamed by ``add_upload``)."""
        self._ready()
        return self.dir / f".upload-{secrets.token_hex(8)}"

    def journal_path(self, batch_id: str) -> Path:
        """The batch's journal (``moa.batch.journal``): its checkpoint, here beside its files."""
        self._ready()
        return self.dir / f"{batch_id}.journal.jsonl"

    async def add_upload(self, written: Path, owner: str, filename: str, size: int) -> FileRecord:
        record = FileRecord(
            id=new_file_id(),
            owner=owner,
            filename=filename,
            purpose="batch",
            bytes=size,
            created_at=int(time.time()),
        )
        os.replace(written, self.path(record.id))
        await self.records.add_file(record)
        return record

    def _write(self, file_id: str, lines: Iterable[dict[str, Any]]) -> int:
        self._ready()
        tmp = self.dir / f".{file_id}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        tmp.replace(self.path(file_id))
        return size

    async def add_output(
        self, batch_id: str, kind: str, owner: str, lines: Iterable[dict[str, Any]]
    ) -> FileRecord:
        """Writes a batch's ``output`` or ``error`` file (JSONL), then its record."""
        file_id = output_file_id(batch_id, kind)
        size = await asyncio.to_thread(self._write, file_id, lines)
        record = FileRecord(
            id=file_id,
            owner=owner,
            filename=f"{batch_id}_{kind}.jsonl",
            purpose="batch_output",
            bytes=size,
            created_at=int(time.time()),
        )
        await self.records.add_file(record)
        return record

    async def owned(self, file_id: str, owner: str) -> FileRecord:
        """The file, if ``owner``'s; OpenAI's 404 otherwise (whether or not it exists)."""
        record = await self.records.file(file_id)
        if record is None or record.owner != owner:
            raise not_found("File", file_id)
        return record
