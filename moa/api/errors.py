"""Every failure as an OpenAI-style error body with its status: the API's own refusals
(``ApiError``), the engine's (``MoAError``), validation, unknown routes, and the unexpected (a 500
that leaks no stack trace). ``add_error_handlers`` installs them on the app."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from moa.api.schemas import ParamError, UnknownParameter, error_body
from moa.errors import MoAError
from moa_observability.asgi import CLIENT_CLOSED_REQUEST

log = logging.getLogger("moa.api")


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers: dict[str, str] = {}


class ClientDisconnected(Exception):
    """The client hung up before its answer was ready: not a server error (recorded as 499)."""


def moa_error(err: MoAError) -> ApiError:
    api = ApiError(err.status_code, err.message, err.error_type, err.code, err.param)
    if err.retry_after_s is not None:
        # Whole seconds, rounded up: a client that waits as told must not come back too early.
        api.headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_s)))
    return api


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(
        error_body(err.message, err.type, err.code, err.param), status_code=err.status, headers=err.headers
    )


def validation_message(err: ValidationError | RequestValidationError) -> tuple[str, str]:
    """The message lists every problem with its field; ``param`` names the first field at fault."""
    parts, first = [], None
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p not in ("body",))
        cause = (e.get("ctx") or {}).get("error")
        loc = loc or getattr(cause, "param", "")
        first = first or loc or None
        msg = str(e["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request", first or "body"


def unknown_parameter(err: ValidationError) -> UnknownParameter | None:
    """The request field OpenAI's API does not have, if that is what failed validation."""
    for e in err.errors():
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, UnknownParameter):
            return cause
    return None


def bad_messages(e: ParamError) -> ApiError:
    return ApiError(400, str(e), "invalid_request_error", "invalid_request", e.param)


def add_error_handlers(app: FastAPI) -> None:
    """Every exception a request can end in, mapped to its status and OpenAI-style body."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(MoAError)
    async def _moa(_: Request, err: MoAError) -> JSONResponse:
        return error_response(moa_error(err))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        message, param = validation_message(err)
        return error_response(ApiError(422, message, "invalid_request_error", "invalid_value", param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        api_error = ApiError(err.status_code, str(err.detail), "invalid_request_error", code)
        api_error.headers.update(err.headers or {})  # e.g. Allow on a 405
        return error_response(api_error)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, err: ClientDisconnected) -> Response:
        # Nobody is there to read it; the status is for the request log and the span.
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error while serving a request")
        return error_response(ApiError(500, "internal error", "server_error", "internal_error"))
