"""The Batch API's bodies, in OpenAI's shapes: the File and Batch objects and their list, and the
checks of a ``POST /v1/batches`` body (each refusal a 400 naming its field, as OpenAI's are)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moa.api.errors import ApiError
from moa.batch.items import ENDPOINTS
from moa.state.batches import BatchRecord, FileRecord

COMPLETION_WINDOWS = ("24h",)
WINDOW_S = {"24h": 24 * 3600}
# OpenAI's bounds on a batch's metadata.
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
# The create body's fields: OpenAI's. ``output_expires_after`` is taken and has no effect here
# (outputs do not expire), so a client that sends it is not refused.
CREATE_FIELDS = frozenset(
    {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
)
# Fields of the record that are the service's own, never shown.
PRIVATE = frozenset({"owner", "owner_hash"})


def invalid(message: str, param: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


def not_found(kind: str, object_id: str) -> ApiError:
    """OpenAI's 404 for an id the caller cannot see: another key's ids get the same one."""
    return ApiError(404, f"No such {kind} object: {object_id}", "invalid_request_error", "not_found", "id")


def file_object(record: FileRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": record.created_at,
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def batch_object(record: BatchRecord) -> dict[str, Any]:
    body = record.model_dump(mode="json", exclude=set(PRIVATE))
    body["object"] = "batch"
    body["errors"] = None if record.errors is None else {"object": "list", "data": record.errors}
    return body


def batch_list(records: list[BatchRecord], limit: int) -> dict[str, Any]:
    """OpenAI's cursor page; ``records`` holds up to one more than ``limit`` (then there are more)."""
    page = records[:limit]
    return {
        "object": "list",
        "data": [batch_object(r) for r in page],
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
        "has_more": len(records) > limit,
    }


@dataclass(frozen=True)
class NewBatch:
    """A ``POST /v1/batches`` body, checked."""

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid("metadata must be an object of strings", "metadata")
    if len(value) > MAX_METADATA_PAIRS:
        raise invalid(f"metadata may hold at most {MAX_METADATA_PAIRS} pairs", "metadata")
    for k, v in value.items():
        if len(k) > MAX_METADATA_KEY:
            raise invalid(f"a metadata key may be at most {MAX_METADATA_KEY} characters", f"metadata.{k}")
        if not isinstance(v, str) or len(v) > MAX_METADATA_VALUE:
            raise invalid(
                f"a metadata value must be a string of at most {MAX_METADATA_VALUE} characters",
                f"metadata.{k}",
            )
    return dict(value)


def new_batch(body: Any) -> NewBatch:
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", "invalid_request_error", "invalid_request")
    unknown = sorted(set(body) - CREATE_FIELDS)
    if unknown:
        raise invalid(
            f"Unrecognized request argument supplied: {unknown[0]}", unknown[0], "unknown_parameter"
        )
    for name in ("input_file_id", "endpoint", "completion_window"):
        if name not in body:
            raise invalid(f"Missing required parameter: '{name}'.", name, "missing_required_parameter")
        if not isinstance(body[name], str) or not body[name]:
            raise invalid(f"{name} must be a non-empty string", name)
    if body["endpoint"] not in ENDPOINTS:
        raise invalid(
            f"endpoint must be one of {', '.join(ENDPOINTS)} here, not {body['endpoint']!r}", "endpoint"
        )
    if body["completion_window"] not in COMPLETION_WINDOWS:
        raise invalid(
            f"completion_window must be {' or '.join(COMPLETION_WINDOWS)}, not {body['completion_window']!r}",
            "completion_window",
        )
    return NewBatch(
        body["input_file_id"], body["endpoint"], body["completion_window"], _metadata(body.get("metadata"))
    )


def list_limit(raw: str | None) -> int:
    """``?limit=``: 1 to 100, 20 when absent (OpenAI's)."""
    if raw is None:
        return 20
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise invalid(f"limit must be an integer from 1 to 100, not {raw!r}", "limit")
    return int(raw)
