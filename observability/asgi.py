"""ASGI middleware: one SERVER span per HTTP request, continuing an incoming W3C ``traceparent``,
the trace id returned in ``x-moa-trace-id``, and one JSON log line per request.

A request's ``X-Request-Id`` (the client's, or one made here when it sends none or an unusable
one) is echoed in the response and recorded on the span and the log line, with the end user the
API handler found in the body (``user``): the correlation ids OpenAI clients already use. Neither
is a metric label: both take a new value per request or user.

The span and the log line name the request by its route template (``POST /admin/keys/{name}``),
never by the path it asked for: a client that pastes its API key into a URL would otherwise have
it exported verbatim to the trace backend and written to the logs. A path no route matches gets
a fixed name (the method alone, as OpenTelemetry's HTTP conventions say), and the raw path is
recorded nowhere."""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode

from moa_observability.tracing import extract, trace_id_hex, tracer

TRACE_ID_HEADER = "x-moa-trace-id"
REQUEST_ID_HEADER = "x-request-id"
# An incoming X-Request-Id is used only if it is short and plain (it goes into logs and spans).
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
# Where the API handler leaves the request's end user (the body's ``user``) in the ASGI scope's
# state (``request.state.end_user``), for the span and the log line written here.
END_USER_STATE = "end_user"
# nginx's status for a request whose client closed the connection first (no standard code exists).
CLIENT_CLOSED_REQUEST = 499
log = logging.getLogger("moa.http")
# Where a streamed response that already sent its 200 reports that it ended in an error event
# (``stream_failed``): set per request by the middleware, read by it once the response is done.
_STREAM_OUTCOME: ContextVar[dict[str, int] | None] = ContextVar("moa_stream_outcome", default=None)


def stream_failed(status: int) -> None:
    """Say that this request's stream, whose headers went out as 200, ended in an error event of
    ``status`` (every provider failed: 502; the deadline passed: 504): the request is then logged
    with that status, not the 200 its headers carried, and its span marked as failed. Called from
    the streaming body, which runs in a task of its own: the holder is shared, not the variable."""
    holder = _STREAM_OUTCOME.get()
    if holder is not None:
        holder["status"] = status


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]


# OpenTelemetry's known HTTP methods; any other (a client may send any token) is ``_OTHER``.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
# The log line's route for a path no route matched.
UNMATCHED = "(unmatched)"


def route_template(scope: Scope) -> str | None:
    """The template of the route that handled the request (set in the scope by the router once it
    matched), or None when none did."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else None


def span_name(method: str, route: str | None) -> str:
    """``{method} {route}``; the method alone (``HTTP`` for an unknown one) when no route matched."""
    shown = method if method in KNOWN_METHODS else "HTTP"
    return f"{shown} {route}" if route else shown


def request_id(scope: Scope) -> str:
    """The client's ``X-Request-Id`` when it is usable, else a new one (``req_`` and 32 hex)."""
    for k, v in scope.get("headers", []):
        if k.lower() == REQUEST_ID_HEADER.encode():
            value = v.decode("latin-1").strip()
            if _REQUEST_ID.fullmatch(value):
                return value
    return f"req_{uuid.uuid4().hex}"


def untraced_request_span() -> trace.Span:
    """With no tracing SDK installed and no incoming ``traceparent``, a request still gets a trace
    id of its own (a non-recording span, exported nowhere): it is returned in ``x-moa-trace-id``,
    written with every log line of the request and carried across every Ray hop, so one id finds
    the request's log lines on every replica whether or not traces are exported."""
    ids = random.getrandbits(128), random.getrandbits(64)
    return NonRecordingSpan(SpanContext(trace_id=ids[0] or 1, span_id=ids[1] or 1, is_remote=False))


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
        method = scope.get("method", "GET")
        # Named by the method until the route is known (after the app ran): never by the path.
        span = tracer().start_span(
            span_name(method, None),
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method if method in KNOWN_METHODS else "_OTHER",
                "url.scheme": scope.get("scheme", "http"),
            },
        )
        if not span.get_span_context().is_valid:
            span = untraced_request_span()
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        outcome: dict[str, int] = {}
        outcome_token = _STREAM_OUTCOME.set(outcome)
        trace_id = trace_id_hex(span)
        rid = request_id(scope)
        span.set_attribute("moa.request_id", rid)
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
                headers = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), rid.encode())]
                if trace_id:
                    headers.append((TRACE_ID_HEADER.encode(), trace_id.encode()))
                message["headers"] = headers
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
            route = route_template(scope)
            span.update_name(span_name(method, route))
            if route is not None:
                span.set_attribute("http.route", route)
            span.set_attribute("http.response.status_code", status)
            # A stream that ended in an error event is the error's, though its headers said 200.
            failed = outcome.get("status") if status == 200 else None
            if failed is not None:
                span.set_attribute("moa.stream.error_status", failed)
            outcome_status = failed or status
            if outcome_status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            latency = time.monotonic() - t0
            state = scope.get("state")
            user = state.get(END_USER_STATE) if isinstance(state, dict) else None
            if isinstance(user, str):
                span.set_attribute("enduser.id", user)
            log.info(
                "request",
                extra={
                    "event": "request",
                    "route": route or UNMATCHED,
                    "status": outcome_status,
                    "http_status": status if failed is not None else None,
                    "latency_s": round(latency, 4),
                    "request_id": rid,
                    "user": user if isinstance(user, str) else None,
                },
            )
            span.end()
            _STREAM_OUTCOME.reset(outcome_token)
            otel_context.detach(token)
