"""ASGI middleware: one SERVER span per HTTP request, continuing an incoming W3C ``traceparent``,
the trace id returned in ``x-moa-trace-id``, and one JSON log line per request."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from observability.tracing import extract, trace_id_hex, tracer

TRACE_ID_HEADER = "x-moa-trace-id"
# nginx's status for a request whose client closed the connection first (no standard code exists).
CLIENT_CLOSED_REQUEST = 499
log = logging.getLogger("moa.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]


class TracingMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Only the propagation headers are read: authorization and the like never reach a span.
        carrier = {
            k.decode("latin-1").lower(): v.decode("latin-1")
            for k, v in scope.get("headers", [])
            if k.lower() in (b"traceparent", b"tracestate")
        }
        parent = extract(carrier)
        method, path = scope.get("method", "GET"), scope.get("path", "/")
        span = tracer().start_span(
            f"{method} {path}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "url.path": path,
                "url.scheme": scope.get("scheme", "http"),
            },
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        trace_id = trace_id_hex(span)
        status = 500
        t0 = time.monotonic()
        client_gone = complete = False

        async def watch_receive() -> Message:
            nonlocal client_gone
            message = await receive()
            if message["type"] == "http.disconnect":
                client_gone = True
            return message

        async def send_with_trace_id(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if trace_id:
                    message.setdefault("headers", [])
                    message["headers"] = [*message["headers"], (TRACE_ID_HEADER.encode(), trace_id.encode())]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        try:
            await self.app(scope, watch_receive, send_with_trace_id)
        except asyncio.CancelledError:
            # The server cancelled the request (on Ray Serve: its proxy saw the client leave).
            client_gone = True
            raise
        finally:
            if client_gone and not complete:
                # The client hung up before the whole answer went out: not a server error.
                status = CLIENT_CLOSED_REQUEST
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            latency = time.monotonic() - t0
            log.info(
                "request",
                extra={"event": "request", "path": path, "status": status, "latency_s": round(latency, 4)},
            )
            span.end()
            otel_context.detach(token)
