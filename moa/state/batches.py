"""What the Batch API keeps in the state store: its files' and batches' records, and the leases
that let one replica, and only one, run a batch.

The records live where the keys and the spend ledger live (SQLite on one node, Redis on a
cluster), so every replica sees every batch; the files' contents are in a directory
(``batch.files_dir``), not here. A record is stored whole, as JSON: the store adds only what
finding it needs (its owner, its status while it is open, its order of creation).

Leases: a replica runs a batch only while it holds the batch's lease, claimed for a few seconds
and claimed again (renewed) well before they pass. A replica that dies stops renewing; once its
lease has passed, another claims it and takes the batch over from its checkpoint.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
# A batch in one of these has nothing left to do: no replica looks at it again.
TERMINAL: frozenset[str] = frozenset({"failed", "completed", "expired", "cancelled"})


class FileRecord(BaseModel):
    """A file of the Batch API: an uploaded input, or a batch's output or errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    owner: str = Field(description="The API key's id that owns it ('' while the service runs open).")
    filename: str
    purpose: str = Field(description="batch (an input), batch_output (what a batch wrote).")
    bytes: int
    created_at: int


class RequestCounts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchRecord(BaseModel):
    """A batch as OpenAI's Batch object has it, plus whose it is (``owner``, and the hash of the
    key its requests are sent as: ``owner_hash``, None while the service runs open)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    owner: str
    owner_hash: str | None = None
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    created_at: int
    expires_at: int
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    request_counts: RequestCounts = RequestCounts()
    metadata: dict[str, str] | None = None

    def changed(self, changes: dict[str, Any]) -> BatchRecord:
        """This record with ``changes`` (validated, unlike ``model_copy``)."""
        return BatchRecord.model_validate(self.model_dump() | changes)


class BatchStore(Protocol):
    """Files, batches and leases. Every method is safe to call from many replicas at once."""

    async def add_file(self, record: FileRecord) -> None: ...

    async def file(self, file_id: str) -> FileRecord | None: ...

    async def add_batch(self, record: BatchRecord) -> None: ...

    async def batch(self, batch_id: str) -> BatchRecord | None: ...

    async def update_batch(
        self, batch_id: str, changes: dict[str, Any], when: Collection[str] | None = None
    ) -> BatchRecord | None:
        """Atomically: if the batch exists and its status is one of ``when`` (any, for None),
        apply ``changes``; the batch as changed, or None when nothing was changed."""
        ...

    async def list_batches(self, owner: str, after: str | None, limit: int) -> list[BatchRecord]:
        """The owner's batches, the newest first; with ``after`` (one of its batch ids), those
        created before it. At most ``limit``."""
        ...

    async def open_batches(self) -> list[str]:
        """The ids of the batches not in a terminal status, the oldest first."""
        ...

    async def claim(self, name: str, holder: str, ttl_s: float) -> bool:
        """Atomically: hold the lease ``name`` for ``ttl_s`` from now if it is free, has passed,
        or is ``holder``'s already (a renewal). False if another holds it."""
        ...

    async def release(self, name: str, holder: str) -> None:
        """Let the lease go, if ``holder`` holds it."""
        ...
