"""The OpenAI Batch API's routes: ``/v1/files`` (upload, retrieve, content) and ``/v1/batches``
(create, retrieve, list, cancel), so that the official ``openai`` client's batch flow works
unchanged against the service.

Every id belongs to the API key that created it (or, while the service runs open, to everyone):
another key gets OpenAI's 404 for it, exactly as for an id that does not exist. A batch's work is
``moa.api.batch_worker``'s, in the background; these routes only shape HTTP and records.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse

from moa.api.batch_files import FileStore
from moa.api.batch_objects import (
    WINDOW_S,
    batch_list,
    batch_object,
    file_object,
    invalid,
    list_limit,
    new_batch,
    not_found,
)
from moa.api.batch_worker import BatchWorker
from moa.api.body import read_json
from moa.api.errors import ApiError
from moa.api.multipart import read_upload, too_large
from moa.api.serving import Api
from moa.auth import Principal
from moa.state.batches import BatchRecord, BatchStore

# Room for the form's own bytes (boundaries, part headers, the purpose field) past the file's.
FORM_OVERHEAD_BYTES = 64 * 1024
CANCELLABLE = ("validating", "in_progress")


def _owner(principal: Principal) -> str:
    """Whose ids a caller sees: its key's id, or '' while the service runs open."""
    return principal.key.id if principal.key is not None else ""


class BatchApi:
    def __init__(self, api: Api, store: BatchStore, files: FileStore, worker: BatchWorker) -> None:
        self.api, self.store, self.files, self.worker = api, store, files, worker

    async def caller(self, request: Request) -> Principal:
        return await self.api.access.principal(request.headers.get("authorization"))

    async def owned_batch(self, batch_id: str, owner: str) -> BatchRecord:
        record = await self.store.batch(batch_id)
        if record is None or record.owner != owner:
            raise not_found("Batch", batch_id)
        return record

    # -- files ----------------------------------------------------------------------------------

    async def upload(self, request: Request) -> dict[str, Any]:
        """``POST /v1/files`` (``client.files.create(file=..., purpose="batch")``)."""
        owner = _owner(await self.caller(request))
        limit = self.api.config.batch.max_file_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit + FORM_OVERHEAD_BYTES:
            raise too_large(limit)
        path = self.files.upload_path()
        content_type = request.headers.get("content-type")
        upload = await read_upload(request.stream(), content_type, "file", path, limit)
        try:
            if upload.filename is None:
                raise invalid("Missing required parameter: 'file'.", "file", "missing_required_parameter")
            purpose = upload.fields.get("purpose")
            if purpose is None:
                raise invalid(
                    "Missing required parameter: 'purpose'.", "purpose", "missing_required_parameter"
                )
            if purpose != "batch":
                raise invalid(
                    "This service takes files for the Batch API only: purpose must be 'batch', "
                    f"not {purpose!r}.",
                    "purpose",
                )
        except ApiError:
            path.unlink(missing_ok=True)
            raise
        record = await self.files.add_upload(path, owner, upload.filename, upload.size)
        return file_object(record)

    async def file(self, request: Request, file_id: str) -> dict[str, Any]:
        """``GET /v1/files/{id}`` (``client.files.retrieve``)."""
        owner = _owner(await self.caller(request))
        return file_object(await self.files.owned(file_id, owner))

    async def content(self, request: Request, file_id: str) -> FileResponse:
        """``GET /v1/files/{id}/content`` (``client.files.content``): the bytes as written."""
        owner = _owner(await self.caller(request))
        record = await self.files.owned(file_id, owner)
        return FileResponse(self.files.path(record.id), media_type="application/jsonl")

    # -- batches --------------------------------------------------------------------------------

    async def create(self, request: Request) -> JSONResponse:
        """``POST /v1/batches`` (``client.batches.create``): validated in the background (status
        ``validating``), as OpenAI does; a malformed line fails the batch there, by its line."""
        principal = await self.caller(request)
        owner = _owner(principal)
        spec = new_batch(await read_json(request, self.api.config.server.max_request_bytes))
        source = await self.files.owned(spec.input_file_id, owner)
        if source.purpose != "batch":
            raise invalid(
                f"The file {source.id} has purpose {source.purpose!r}; a batch's input needs 'batch'.",
                "input_file_id",
            )
        now = int(time.time())
        record = BatchRecord(
            id="batch_" + secrets.token_hex(12),
            owner=owner,
            owner_hash=principal.key.key_hash if principal.key is not None else None,
            endpoint=spec.endpoint,
            input_file_id=source.id,
            completion_window=spec.completion_window,
            status="validating",
            created_at=now,
            expires_at=now + WINDOW_S[spec.completion_window],
            metadata=spec.metadata,
        )
        await self.store.add_batch(record)
        self.worker.wake()
        return JSONResponse(batch_object(record))

    async def batch(self, request: Request, batch_id: str) -> dict[str, Any]:
        """``GET /v1/batches/{id}`` (``client.batches.retrieve``)."""
        owner = _owner(await self.caller(request))
        return batch_object(await self.owned_batch(batch_id, owner))

    async def batches(self, request: Request) -> dict[str, Any]:
        """``GET /v1/batches?limit=&after=`` (``client.batches.list``): the newest first."""
        owner = _owner(await self.caller(request))
        limit = list_limit(request.query_params.get("limit"))
        after = request.query_params.get("after") or None
        return batch_list(await self.store.list_batches(owner, after, limit + 1), limit)

    async def cancel(self, request: Request, batch_id: str) -> dict[str, Any]:
        """``POST /v1/batches/{id}/cancel``: ``cancelling`` at once; the requests in progress
        finish, no other starts, and the batch ends ``cancelled`` with what was done."""
        owner = _owner(await self.caller(request))
        await self.owned_batch(batch_id, owner)
        changes = {"status": "cancelling", "cancelling_at": int(time.time())}
        record = await self.store.update_batch(batch_id, changes, CANCELLABLE)
        if record is None:
            record = await self.owned_batch(batch_id, owner)
            if record.status not in ("cancelling", "cancelled"):
                raise ApiError(
                    409,
                    f"Cannot cancel a batch with status {record.status!r}.",
                    "invalid_request_error",
                    "batch_not_cancellable",
                )
        self.worker.cancel(batch_id)
        return batch_object(record)


def add_batch_routes(app: FastAPI, batch_api: BatchApi | None, keyed: Sequence[Any]) -> None:
    """The routes; without a state store (``batch_api`` None), each says the service has no
    Batch API rather than that the route does not exist."""

    def handler(name: str) -> Any:
        if batch_api is not None:
            return getattr(batch_api, name)

        async def unavailable(request: Request) -> None:
            raise ApiError(
                404,
                "The Batch API needs the service's state store; this app was built without one.",
                "invalid_request_error",
                "not_found",
            )

        return unavailable

    routes = [
        ("/v1/files", "upload", "POST"),
        ("/v1/files/{file_id}", "file", "GET"),
        ("/v1/files/{file_id}/content", "content", "GET"),
        ("/v1/batches", "create", "POST"),
        ("/v1/batches", "batches", "GET"),
        ("/v1/batches/{batch_id}", "batch", "GET"),
        ("/v1/batches/{batch_id}/cancel", "cancel", "POST"),
    ]
    for path, name, method in routes:
        app.add_api_route(path, handler(name), methods=[method], dependencies=list(keyed))
