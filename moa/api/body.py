"""Reading a request's body: its size bounded, its JSON strict (``moa.api.jsonbody``), and
validated against the endpoint's schema with OpenAI-style errors."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from moa.api.errors import ApiError, unknown_parameter, validation_message
from moa.api.jsonbody import NonFiniteNumber, loads_finite
from moa.textcheck import first_unencodable

M = TypeVar("M", bound=BaseModel)


async def read_json(request: Request, limit: int) -> Any:
    """The request body's JSON: at most ``limit`` bytes, finite numbers only, text every encoder
    can write. Anything else is a 4xx naming what is wrong."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body exceeds {limit} bytes", "invalid_request_error", "body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(
                413, f"request body exceeds {limit} bytes", "invalid_request_error", "body_too_large"
            )
        chunks.append(chunk)
    try:
        body = loads_finite(b"".join(chunks))
    except NonFiniteNumber as e:
        raise ApiError(400, str(e), "invalid_request_error", "invalid_number") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(
            400, f"request body is not valid JSON: {e}", "invalid_request_error", "invalid_json"
        ) from None
    except RecursionError:
        raise ApiError(
            400, "request body is nested too deeply to parse", "invalid_request_error", "invalid_json"
        ) from None
    # Text no encoder can write (a lone surrogate escape) would fail at every provider: refuse
    # it here, naming the field, before anything is sent.
    where = first_unencodable(body)
    if where is not None:
        raise ApiError(
            400,
            f"{where}: contains a lone UTF-16 surrogate, which is not valid Unicode text",
            "invalid_request_error",
            "invalid_encoding",
            where,
        )
    return body


def parse(model: type[M], body: Any) -> M:
    """``body`` as ``model``: a field OpenAI's API does not have is a 400, as OpenAI answers it;
    any other problem a 422 listing every field at fault."""
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", "invalid_request_error", "invalid_request")
    try:
        return model.model_validate(body)
    except (ValidationError, RecursionError) as e:
        if isinstance(e, RecursionError):
            raise ApiError(
                400, "request body is nested too deeply", "invalid_request_error", "invalid_request"
            ) from None
        unknown = unknown_parameter(e)
        if unknown is not None:  # as OpenAI answers a field it does not have: a 400
            raise ApiError(
                400, str(unknown), "invalid_request_error", "unknown_parameter", unknown.param
            ) from None
        message, param = validation_message(e)
        raise ApiError(422, message, "invalid_request_error", "invalid_value", param) from None
