"""The OpenAI-compatible HTTP API as an ASGI app, independent of how the engine reaches its models.

The Ray Serve ingress serves this app with handle-based transports; tests and single-process use
serve it with the in-process provider pool. Every failure leaves as an OpenAI-style error body
with the right status (``moa.api.errors``); nothing leaks a stack trace.

This module is the routes: each endpoint shapes HTTP only. The request handling is
``moa.api.serving`` (the one request preamble, running, streaming's first event), the bodies
``moa.api.schemas`` and ``moa.api.responses``, the stream's bytes ``moa.api.sse``.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from moa.api.access import Access
from moa.api.admin import Admin, add_admin_routes, admin_key_from_env
from moa.api.batch_files import FileStore, files_dir
from moa.api.batch_routes import BatchApi, add_batch_routes
from moa.api.batch_worker import BatchWorker
from moa.api.drain import CUT_GRACE_S
from moa.api.errors import ApiError, add_error_handlers, moa_error
from moa.api.health import HealthFn, health_status, model_objects
from moa.api.priority import PriorityMiddleware
from moa.api.responses import (
    answer_header,
    cache_header,
    completion_body,
    cost_header,
    moa_detail,
    overhead_header,
    preset_header,
)
from moa.api.schemas import ChatCompletionRequest, MoARequest
from moa.api.serving import Api
from moa.api.streaming import AdmittedStream
from moa.config import MoAConfig
from moa.engine.engine import MoAEngine
from moa.engine.receipts import ReceiptSource
from moa.errors import InvalidRequest, MoAError, UnknownPreset
from moa.exposure import RequestExposure
from moa.keys_admin import admin_key_matches
from moa.result import MoAResult, Progress
from moa.state import StateStore, describe
from moa_observability.asgi import TracingMiddleware


def _api(request: Request) -> Api:
    api: Api = request.app.state.api
    return api


async def chat_completions(request: Request) -> Response:
    """``POST /v1/chat/completions``: the answer whole (JSON), or streamed (SSE) once the run is
    admitted, so that a refusal still gets its real status."""
    received = time.monotonic()
    api = _api(request)
    req, run = await api.prepare(request, ChatCompletionRequest)
    response: Response | None = None
    try:
        if not req.stream:
            result = await api.answer(request, run)
            api.outcomes.answered(result, time.monotonic() - run.t0, run.messages, req.model)
            headers = cache_header(run.ticket) | preset_header(result.preset) | answer_header(result)
            headers |= cost_header(result) | overhead_header(result, received)
            return JSONResponse(completion_body(req, result), headers=headers)
        first, events = await api.open_stream(request, run)
        # From here the response owns the slot and the events (see AdmittedStream).
        ran = first.preset if isinstance(first, Progress | MoAResult) else None
        response = AdmittedStream(api.sse.write(req, first, events, run.t0, ran), run.slot, events, run.gate)
        response.headers.update(cache_header(run.ticket) | preset_header(ran))
        return response
    except MoAError as e:
        api.outcomes.failed(req.model, e, time.monotonic() - run.t0)
        raise
    finally:
        if response is None:
            await run.close()


async def moa(request: Request) -> Response:
    """``POST /v1/moa``: an explicit plan (or a preset), and the full result back."""
    received = time.monotonic()
    api = _api(request)
    _, run = await api.prepare(request, MoARequest)
    try:
        result = await api.answer(request, run)
    except UnknownPreset as e:
        e.param = "preset"  # this endpoint's field for it
        raise
    finally:
        await run.close()
    return JSONResponse(
        result.model_dump(mode="json"),
        headers=cache_header(run.ticket)
        | answer_header(result)
        | cost_header(result)
        | overhead_header(result, received),
    )


async def models(request: Request) -> dict[str, Any]:
    """``GET /v1/models``: every preset, then every model a plan may name directly."""
    api = _api(request)
    await api.access.principal(request.headers.get("authorization"))
    return {"object": "list", "data": model_objects(api.config)}


async def model(request: Request, model_id: str) -> dict[str, Any]:
    """``GET /v1/models/{id}`` (``client.models.retrieve``): one entry of the list, or OpenAI's
    404 ``model_not_found``."""
    api = _api(request)
    await api.access.principal(request.headers.get("authorization"))
    for entry in model_objects(api.config):
        if entry["id"] == model_id:
            return entry
    raise moa_error(UnknownPreset(f"The model {model_id!r} does not exist"))


# Recent FastAPI versions open their own OpenTelemetry server span per request; ours (which also
# returns x-moa-trace-id, in-process and on Ray alike) is the one server span, so theirs is off.
_NO_NATIVE_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


def _batch_api(
    config: MoAConfig, api: Api, app: FastAPI, store: StateStore | None, run_batches: bool
) -> BatchApi | None:
    """The Batch API over the state store's records and ``batch.files_dir``, its background work
    started (on the loop the app is built on: the one that serves it) if ``run_batches``; None
    without a store."""
    if store is None:
        return None
    files = FileStore(files_dir(config), store.batches)
    worker = BatchWorker(config, store.batches, files, app, api.batch_gate, background=run_batches)
    api.batch_worker = worker
    with contextlib.suppress(RuntimeError):  # built outside a loop: it starts with the first batch
        worker.start()
    return BatchApi(api, store.batches, files, worker)


def create_api(
    config: MoAConfig,
    engine: MoAEngine,
    health: HealthFn,
    store: StateStore | None = None,
    receipts: ReceiptSource | None = None,
    run_batches: bool = True,
) -> FastAPI:
    """The API app; with a ``store``, API keys and budgets apply (once a key exists), the Batch
    API runs (``/v1/files``, ``/v1/batches``), and with ``MOA_ADMIN_KEY`` in the environment
    too, the admin API manages keys (``/admin/keys``).
    ``receipts``: where the transport leaves what the calls a request cut really consumed (on
    Ray, the health board); without one, a cut call is charged its estimate. ``run_batches``:
    whether this app runs the Batch API's batches in its background (a serving app does; an app
    built for one command's own requests, such as ``moa batch run``'s, must not take the
    service's batches)."""
    api = Api(config, engine, health, Access(config, store, receipts))
    # No /openapi.json, /docs or /redoc: the handlers read their bodies themselves, so the schema
    # would describe no request or response (clients follow OpenAI's API), only list the routes,
    # the admin ones included, to anyone, with or without a key.
    app = FastAPI(
        title="MoA", version="0.1.0", openapi_url=None, docs_url=None, redoc_url=None, **_NO_NATIVE_TELEMETRY
    )
    app.state.api = api
    # Added first, so inside the tracing (each middleware added goes outside those before it).
    app.add_middleware(PriorityMiddleware)
    app.add_middleware(TracingMiddleware)
    add_error_handlers(app)

    admin_key = admin_key_from_env()
    auth = api.access.auth
    exposure = RequestExposure(
        config.server.open,
        auth.any_keys if auth is not None else None,
        describe(config.state),
        admin_api=admin_key is not None and store is not None,
    )

    async def refuse_open_to_the_network(request: Request) -> None:
        # Before the key check: with no key at all, a request from beyond loopback is refused.
        why = await exposure.refusal(request.scope.get("server"), request.scope.get("client"))
        if why is not None:
            raise ApiError(503, why, "service_unavailable", "no_api_key")

    # The API needs a key, or loopback, or server.open; /healthz (probes) and /admin (its own key,
    # which may create the first API key) do not.
    keyed = [Depends(refuse_open_to_the_network)]
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], dependencies=keyed)
    app.add_api_route("/v1/moa", moa, methods=["POST"], dependencies=keyed)
    app.add_api_route("/v1/models", models, methods=["GET", "HEAD"], dependencies=keyed)
    # {model_id:path}: a direct model's id holds a slash (openai/gpt-4.1).
    app.add_api_route("/v1/models/{model_id:path}", model, methods=["GET", "HEAD"], dependencies=keyed)

    async def healthz(request: Request) -> Response:
        # Per-provider detail for the admin key only; without one set, for nobody.
        detail = admin_key is not None and admin_key_matches(admin_key, request.headers.get("authorization"))
        return await health_status(api.health, api.draining, detail)

    app.add_api_route("/healthz", healthz, methods=["GET", "HEAD"])
    add_batch_routes(app, _batch_api(config, api, app, store, run_batches), keyed)
    if admin_key is not None and store is not None:
        add_admin_routes(app, Admin(store, admin_key, auth, config.server.max_request_bytes))
    return app


__all__ = ["CUT_GRACE_S", "Api", "ApiError", "InvalidRequest", "create_api", "moa_detail"]
