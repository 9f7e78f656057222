"""Tracing setup and W3C context propagation, shared by the core and the Ray deployments.

Tracing is on when an OTLP endpoint is configured through the standard variables
(``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); otherwise no tracer
provider is installed and every span is OpenTelemetry's no-op, which costs next to nothing.
Context crosses Ray hops explicitly: the caller ``inject()``s a carrier dict into the call, the
callee ``extract()``s it, so one request stays one trace across processes and nodes.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACER_NAME = "moa"
_propagator = TraceContextTextMapPropagator()
_lock = threading.Lock()
_provider: Any = None

T = TypeVar("T")


def tracing_configured(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def setup_tracing(attributes: Mapping[str, str] | None = None) -> bool:
    """Install the SDK with an OTLP exporter, once per process, when an endpoint is configured.

    ``attributes`` become resource attributes (Ray node, deployment, replica); ``service.name``
    comes from ``OTEL_SERVICE_NAME`` (default ``moa``). Returns whether tracing is on.
    """
    global _provider
    if not tracing_configured():
        return False
    with _lock:
        if _provider is not None:
            return True
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME", "moa"), **dict(attributes or {})}
        )
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(_exporter(), schedule_delay_millis=500))
        trace.set_tracer_provider(provider)
        _provider = provider
        return True


def _exporter() -> Any:
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    )
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as e:  # the gRPC exporter is an optional extra
            raise RuntimeError("OTLP over gRPC needs opentelemetry-exporter-otlp-proto-grpc") from e
        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter()  # endpoint, headers and timeout from the standard OTEL_* variables


def flush_tracing(timeout_ms: int = 5000) -> None:
    """Export what is buffered (a replica shutting down must not lose its last spans)."""
    if _provider is not None:
        _provider.force_flush(timeout_ms)


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def inject() -> dict[str, str]:
    """The current context as a W3C carrier (``traceparent``), to send along with a Ray call."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier


def extract(carrier: Mapping[str, str] | None) -> Context:
    return _propagator.extract(dict(carrier or {}))


def trace_id_hex(span: trace.Span | None = None) -> str | None:
    ctx = (span or trace.get_current_span()).get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


@contextlib.contextmanager
def attached(ctx: Context) -> Iterator[None]:
    """``ctx`` attached for a block with no ``yield`` inside (spans started there are its children)."""
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


async def iterate_in(ctx: Context, events: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    """Iterate ``events`` with ``ctx`` attached only while each item is produced.

    Attaching around a whole generator breaks when a consumer abandons it; attaching per step keeps
    every attach/detach pair on the same stack frame.
    """
    it = aiter(events)
    try:
        while True:
            token = otel_context.attach(ctx)
            try:
                item = await anext(it, _END)
            finally:
                otel_context.detach(token)
            if item is _END:
                return
            yield item
    finally:
        # A consumer that stops early closes us; close what we wrap now, not at garbage collection.
        close = getattr(it, "aclose", None)
        if close is not None:
            await close()


_END: Any = object()
