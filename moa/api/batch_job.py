"""One batch of the Batch API from where it stands to its end: validating, in progress,
finalizing (or cancelling), then completed, failed, expired or cancelled.

Its requests run through ``moa.batch``'s runner, as ``moa batch run`` runs them: the same retries,
de-duplication, cost accounting, and the same journal, which is the batch's checkpoint. A job
taken over after its replica stopped (or died) starts again from the status the store holds: an
input is validated again, the requests run on from the journal (a request it holds is never sent
again), and a finalization is done again whole (its files' ids are the batch's, so they are
replaced, not doubled). Each status change is conditional on the status it leaves, so a
cancellation asked on another replica in the meantime is never overwritten.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from moa.api.batch_files import FileStore
from moa.batch.items import BatchItem, InputError, check_items
from moa.batch.journal import Journal
from moa.batch.runner import BatchRunner, Progress, Sender
from moa.config import MoAConfig
from moa.state.batches import BatchRecord, BatchStore, RequestCounts

log = logging.getLogger("moa.api")

# Why a run stopped before its end, when it is one of these, the batch is not over.
CANCELLED = "the batch was cancelled"
DRAINING = "the service is draining"
# How often the request counts a client polls are written while the batch runs.
COUNTS_EVERY_S = 1.0
MAX_REPORTED_ERRORS = 100
EXPIRED = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}


def _now() -> int:
    return int(time.time())


def _error_entry(e: InputError) -> dict[str, Any]:
    return {"code": e.code, "message": e.message, "param": e.param, "line": e.line}


class BatchJob:
    """``runner_started``: told the runner once it exists (the worker stops it on a cancel or a
    drain)."""

    def __init__(
        self,
        batch_id: str,
        config: MoAConfig,
        store: BatchStore,
        files: FileStore,
        sender: Sender,
        runner_started: Callable[[BatchRunner], None],
    ) -> None:
        self.id, self.config, self.store, self.files = batch_id, config, store, files
        self.sender, self.runner_started = sender, runner_started
        self._counts_written = 0.0
        self._counting: asyncio.Task[Any] | None = None

    async def run(self) -> None:
        record = await self.store.batch(self.id)
        if record is None:
            return
        items: list[BatchItem] = []
        if record.status in ("validating", "in_progress", "cancelling"):
            items, record = await self._validate(record)
        if record.status == "in_progress":
            record = await self._process(record, items)
        if record.status in ("finalizing", "cancelling"):
            await self._finalize(record, items, "completed" if record.status == "finalizing" else "cancelled")

    # -- validating ------------------------------------------------------------------------------

    def _read(self, record: BatchRecord) -> tuple[list[BatchItem], list[InputError]]:
        path = self.files.path(record.input_file_id)
        try:
            with path.open(encoding="utf-8") as f:
                items, errors = check_items(
                    f, self.config.default_preset, record.endpoint, max_errors=MAX_REPORTED_ERRORS
                )
        except FileNotFoundError:
            return [], [InputError(f"the input file {record.input_file_id} is gone", code="file_not_found")]
        except UnicodeDecodeError as e:
            return [], [
                InputError(f"the input is not UTF-8 text (at byte {e.start})", code="invalid_file_format")
            ]
        limit = self.config.batch.max_requests
        if not errors and len(items) > limit:
            errors = [
                InputError(
                    f"the input holds {len(items)} requests; a batch may hold {limit}",
                    code="too_many_requests",
                )
            ]
        return items, errors

    async def _validate(self, record: BatchRecord) -> tuple[list[BatchItem], BatchRecord]:
        """The input's items (every line checked, as OpenAI checks a batch's input); a batch whose
        input cannot run fails here, its errors naming each line, before anything is sent."""
        items, errors = await asyncio.to_thread(self._read, record)
        if record.status != "validating":
            return items, record  # validated before: read again to go on (or to finalize)
        if errors:
            changes = {"status": "failed", "failed_at": _now(), "errors": [_error_entry(e) for e in errors]}
            return items, await self._change(changes, "validating")
        counts = RequestCounts(total=len(items))
        changes = {"status": "in_progress", "in_progress_at": _now(), "request_counts": counts}
        return items, await self._change(changes, "validating")

    async def _change(self, changes: dict[str, Any], *when: str) -> BatchRecord:
        """The record with ``changes`` if its status is still one of ``when``; else as it is now
        (another replica changed it: a cancellation)."""
        changed = await self.store.update_batch(self.id, changes, when)
        return changed if changed is not None else await self._reread()

    async def _reread(self) -> BatchRecord:
        current = await self.store.batch(self.id)
        assert current is not None  # batches are never deleted
        return current

    # -- in progress -----------------------------------------------------------------------------

    def _counts(self, progress: Progress) -> None:
        """The runner's progress, written to the store at most once a second (a client polls it)."""
        now = time.monotonic()
        if now - self._counts_written < COUNTS_EVERY_S or (self._counting and not self._counting.done()):
            return
        self._counts_written = now
        counts = RequestCounts(
            total=progress.total, completed=progress.done - progress.errors, failed=progress.errors
        )
        self._counting = asyncio.ensure_future(
            self.store.update_batch(self.id, {"request_counts": counts}, ("in_progress", "cancelling"))
        )

    async def _process(self, record: BatchRecord, items: list[BatchItem]) -> BatchRecord:
        journal = Journal(self.files.journal_path(self.id))
        batch = self.config.batch
        runner = BatchRunner(
            items,
            journal,
            self.sender,
            concurrency=batch.concurrency,
            attempts=batch.attempts,
            on_progress=self._counts,
        )
        self.runner_started(runner)
        expired = False
        try:
            async with asyncio.timeout(max(0, record.expires_at - time.time())):
                summary = await runner.run()
        except TimeoutError:
            expired = True
        finally:
            journal.close()
            await self._counted()
        if expired:
            await self._finalize(record, items, "expired")
            return await self._reread()
        if summary.stopped == DRAINING:
            return record  # the rest runs later, here or on another replica, from the journal
        if summary.stopped == CANCELLED:
            return await self._reread()
        if summary.stopped is not None:  # the key was refused (401): no request of it can run
            failure = {"code": "invalid_api_key", "message": summary.stopped, "param": None, "line": None}
            await self._finalize(record, items, "failed", [failure])
            return await self._reread()
        return await self._change({"status": "finalizing", "finalizing_at": _now()}, "in_progress")

    async def _counted(self) -> None:
        if self._counting is not None:
            await asyncio.gather(self._counting, return_exceptions=True)

    # -- finalizing ------------------------------------------------------------------------------

    def _results(self, items: list[BatchItem], end: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The journal's lines, split into the output (answered with 200) and the errors (any
        other answer, or none); each item once. An expired batch's items not done are errors."""
        path = self.files.journal_path(self.id)
        done: dict[str, dict[str, Any]] = {}
        if path.exists():
            for raw in path.read_bytes().splitlines(keepends=True):
                try:
                    if not raw.endswith(b"\n"):
                        raise ValueError("a line without its end")
                    line = json.loads(raw)
                except ValueError:
                    break  # a line a stopped run did not finish: not an item
                line.pop("moa", None)  # the journal's cost accounting, not OpenAI's output
                done.setdefault(line["custom_id"], line)
        if end == "expired":
            for n, item in enumerate(items):
                if item.custom_id not in done:
                    expired = {
                        "id": f"batch_req_{self.id}_{n}",
                        "custom_id": item.custom_id,
                        "response": None,
                    }
                    done[item.custom_id] = expired | {"error": dict(EXPIRED)}
        ok = [line for line in done.values() if (line.get("response") or {}).get("status_code") == 200]
        failed = [line for line in done.values() if (line.get("response") or {}).get("status_code") != 200]
        return ok, failed

    async def _finalize(
        self,
        record: BatchRecord,
        items: list[BatchItem],
        end: str,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        ok, failed = await asyncio.to_thread(self._results, items, end)
        output = await self.files.add_output(self.id, "output", record.owner, ok) if ok else None
        error = await self.files.add_output(self.id, "error", record.owner, failed) if failed else None
        total = record.request_counts.total or len(items)
        changes: dict[str, Any] = {
            "status": end,
            f"{end}_at": _now(),
            "output_file_id": output.id if output else None,
            "error_file_id": error.id if error else None,
            "request_counts": RequestCounts(total=total, completed=len(ok), failed=len(failed)),
        }
        if errors is not None:
            changes["errors"] = errors
        if end == "cancelled" and record.cancelling_at is None:
            changes["cancelling_at"] = changes["cancelled_at"]
        await self.store.update_batch(self.id, changes, ("in_progress", "finalizing", "cancelling"))
