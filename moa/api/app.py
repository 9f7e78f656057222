"""The OpenAI-compatible HTTP API as an ASGI app, independent of how the engine reaches its models.

The Ray Serve ingress serves this app with handle-based transports; tests and single-process use
serve it with the in-process provider pool. Every failure leaves as an OpenAI-style error body
with the right status; nothing leaks a stack trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from moa.api.schemas import ChatCompletionRequest, MoARequest, error_body
from moa.config import MoAConfig
from moa.engine.engine import MoAEngine
from moa.engine.errors import InvalidPlan, InvalidRequest, MoAError
from moa.engine.result import MoAResult
from moa.types import TextDelta, Usage
from observability.asgi import TracingMiddleware
from observability.metrics import RequestMetrics

log = logging.getLogger("moa.api")

M = TypeVar("M", bound=BaseModel)
HealthFn = Callable[[], Awaitable[dict[str, Any]]]


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers: dict[str, str] = {}


def _moa_error(err: MoAError) -> ApiError:
    api = ApiError(err.status_code, err.message, err.error_type, err.code)
    if err.retry_after_s is not None:
        api.headers["Retry-After"] = str(max(1, round(err.retry_after_s)))
    return api


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(
        error_body(err.message, err.type, err.code, err.param), status_code=err.status, headers=err.headers
    )


def _validation_message(err: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    parts, first = [], None
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p not in ("body",))
        first = first or loc or None
        msg = str(e["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request", first


def _finish_reason(reason: str | None) -> str:
    return reason if reason in ("stop", "length", "content_filter") else "stop"


def _usage(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def moa_detail(result: MoAResult) -> dict[str, Any]:
    """The opt-in per-call breakdown (``moa: {"detail": true}``)."""
    return {
        "preset": result.preset,
        "decision": result.decision.model_dump(mode="json"),
        "answered_by": f"{result.provider}/{result.model}",
        "fallback": result.fallback,
        "notes": result.notes,
        "calls": [c.model_dump(mode="json") for c in result.calls],
        "totals": {
            "calls": len(result.calls),
            "cost_usd": result.cost_usd,
            "wall_time_s": result.wall_time_s,
            "critical_path_s": result.critical_path_s,
            "simulated_critical_path_s": result.simulated_critical_path_s,
            "stragglers_cancelled": result.stragglers_cancelled,
        },
    }


class Api:
    """Request handling, kept apart from FastAPI wiring so each piece stays small."""

    def __init__(self, config: MoAConfig, engine: MoAEngine, health: HealthFn) -> None:
        self.config = config
        self.engine = engine
        self.health = health
        self.in_flight = 0
        self.metrics = RequestMetrics()

    # -- input ------------------------------------------------------------------------------------

    async def read_json(self, request: Request) -> Any:
        limit = self.config.server.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(
                413, f"request body exceeds {limit} bytes", "invalid_request_error", "body_too_large"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(
                    413, f"request body exceeds {limit} bytes", "invalid_request_error", "body_too_large"
                )
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(
                400, f"request body is not valid JSON: {e}", "invalid_request_error", "invalid_json"
            ) from None

    def parse(self, model: type[M], body: Any) -> M:
        if not isinstance(body, dict):
            raise ApiError(
                400, "request body must be a JSON object", "invalid_request_error", "invalid_request"
            )
        try:
            return model.model_validate(body)
        except ValidationError as e:
            message, param = _validation_message(e)
            raise ApiError(422, message, "invalid_request_error", "invalid_value", param) from None

    def admit(self) -> None:
        """Admission control: past the concurrency limit, say 429 with Retry-After at once."""
        if self.in_flight >= self.config.server.max_concurrent_requests:
            err = ApiError(429, "the service is at capacity; retry shortly", "rate_limit_error", "overloaded")
            err.headers["Retry-After"] = "1"
            raise err
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        self.admit()
        try:
            yield
        finally:
            self.release()

    def deadline(self, requested: float | None) -> float:
        limit = self.config.server.request_deadline_s
        return min(requested, limit) if requested else limit

    # -- endpoints --------------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        req = self.parse(ChatCompletionRequest, await self.read_json(request))
        try:
            messages = req.chat_messages()
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_request_error", "unsupported_content", "messages") from None
        if not any(m.role == "user" for m in messages):
            raise ApiError(
                400,
                "messages must contain a user message",
                "invalid_request_error",
                "invalid_request",
                "messages",
            )
        self.admit()
        streaming = False  # once the stream starts, it releases the slot when it ends
        t0 = time.monotonic()
        try:
            routed = await self.engine.route(messages, req.model)
            kwargs: dict[str, Any] = {
                "params": req.params(),
                "deadline_s": self.deadline(req.moa.deadline_s),
                "routed": routed,
            }
            if not req.stream:
                result = await until_disconnected(request, self.engine.run(messages, **kwargs))
                self.record(result, 200, time.monotonic() - t0)
                return JSONResponse(self.completion_body(req, result))
            events = self.engine.stream(messages, **kwargs)
            # Wait for the first event so that failures before any text get a real status code.
            first = await until_disconnected(request, anext(events))
            streaming = True
            return StreamingResponse(self.sse(req, first, events), media_type="text/event-stream")
        except MoAError as e:
            self.metrics.record(req.model, None, e.status_code, time.monotonic() - t0, None)
            raise
        finally:
            if not streaming:
                self.release()

    def record(self, result: MoAResult, status: int, seconds: float) -> None:
        complexity = result.decision.complexity.value if result.decision.complexity else None
        self.metrics.record(result.preset, complexity, status, seconds, result.fallback)

    def completion_body(self, req: ChatCompletionRequest, result: MoAResult) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": f"chatcmpl-moa-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": _finish_reason(result.finish_reason),
                }
            ],
            "usage": _usage(result.usage),
        }
        if req.moa.detail:
            body["moa"] = moa_detail(result)
        return body

    async def sse(
        self,
        req: ChatCompletionRequest,
        first: TextDelta | MoAResult,
        events: AsyncIterator[TextDelta | MoAResult],
    ) -> AsyncIterator[bytes]:
        ident, created = f"chatcmpl-moa-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": req.model}
            body |= {"system_fingerprint": None, "choices": choices, **extra}
            return b"data: " + json.dumps(body).encode() + b"\n\n"

        yield chunk({"role": "assistant", "content": ""})
        ev: TextDelta | MoAResult | None = first
        try:
            while ev is not None:
                if isinstance(ev, TextDelta):
                    yield chunk({"content": ev.text})
                else:
                    result = ev
                    self.record(result, 200, result.wall_time_s)
                    yield chunk({}, _finish_reason(result.finish_reason))
                    extra: dict[str, Any] = {"moa": moa_detail(result)} if req.moa.detail else {}
                    include_usage = req.stream_options is not None and req.stream_options.include_usage
                    if include_usage or extra:
                        usage = _usage(result.usage) if include_usage else None
                        body = {"id": ident, "object": "chat.completion.chunk", "created": created}
                        body |= {"model": req.model, "choices": [], "usage": usage, **extra}
                        yield b"data: " + json.dumps(body).encode() + b"\n\n"
                ev = await anext(events, None)
        except MoAError as e:
            # Text may already be out: the error travels in the stream, as OpenAI's API does.
            yield b"data: " + json.dumps(error_body(e.message, e.error_type, e.code)).encode() + b"\n\n"
        finally:
            self.release()
            await events.aclose()  # type: ignore[attr-defined]
        yield b"data: [DONE]\n\n"

    async def moa(self, request: Request) -> Response:
        req = self.parse(MoARequest, await self.read_json(request))
        try:
            messages = [m.to_chat() for m in req.messages]
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_request_error", "unsupported_content", "messages") from None
        if req.plan is not None:
            problems = self.config.unknown_models(req.plan)
            if problems:
                raise _moa_error(InvalidPlan(f"the plan cannot run here: {'; '.join(problems)}"))
        with self.admitted():
            result = await until_disconnected(
                request,
                self.engine.run(
                    messages,
                    preset=req.preset,
                    plan=req.plan,
                    params=req.params,
                    deadline_s=self.deadline(req.deadline_s),
                ),
            )
        return JSONResponse(result.model_dump(mode="json"))

    def models(self) -> dict[str, Any]:
        presets = ["auto", *self.config.presets]
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "moa"} for name in presets]
        data += [
            {"id": f"{p}/{m}", "object": "model", "created": 0, "owned_by": p}
            for p, m in self.config.all_models()
        ]
        return {"object": "list", "data": data}

    async def healthz(self) -> Response:
        providers = await self.health()
        states = [p.get("state") for p in providers.values()]
        up = sum(s != "open" for s in states)
        status = "ok" if up == len(states) else "degraded" if up else "down"
        return JSONResponse({"status": status, "providers": providers}, status_code=200 if up else 503)


T = TypeVar("T")

# Recent FastAPI versions open their own OpenTelemetry server span per request; ours (which also
# returns x-moa-trace-id, in-process and on Ray alike) is the one server span, so theirs is off.
_NO_NATIVE_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client goes away first (so the whole fan-out stops)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise asyncio.CancelledError("client disconnected")
    return task.result()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_api(config: MoAConfig, engine: MoAEngine, health: HealthFn) -> FastAPI:
    api = Api(config, engine, health)
    app = FastAPI(title="MoA", version="0.1.0", docs_url=None, redoc_url=None, **_NO_NATIVE_TELEMETRY)
    app.state.api = api
    app.add_middleware(TracingMiddleware)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(MoAError)
    async def _moa(_: Request, err: MoAError) -> JSONResponse:
        return _error_response(_moa_error(err))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(err)
        return _error_response(ApiError(422, message, "invalid_request_error", "invalid_value", param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return _error_response(ApiError(err.status_code, str(err.detail), "invalid_request_error", code))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error while serving a request")
        return _error_response(ApiError(500, "internal error", "server_error", "internal_error"))

    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])
    app.add_api_route("/v1/moa", api.moa, methods=["POST"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/healthz", api.healthz, methods=["GET"])
    return app


__all__ = ["ApiError", "InvalidRequest", "create_api", "moa_detail"]
