"""Structured JSON logs carrying the trace and span ids of the request they describe."""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from typing import Any

from opentelemetry import trace

LOGGER_NAME = "moa"
# Keys a log record's ``extra`` may carry into the JSON line; anything else is dropped, so a stray
# object (a request with headers, say) can never carry a secret into the logs.
FIELDS = (
    "event",
    "provider",
    "model",
    "preset",
    "status",
    # A stream that ended in an error event: the 200 its headers carried (``status`` is the error's).
    "http_status",
    "error_kind",
    # The provider's own reason for a failed call, redacted of keys where it is made
    # (``moa.providers.wire.redact_key``) and cut to ``MAX_ERROR_CHARS``.
    "error_message",
    "latency_s",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "attempts",
    "adjustments",
    "layer",
    "path",
    "route",
    "decision",
    "request_id",
    "user",
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        ctx = trace.get_current_span().get_span_context()
        trace_id = getattr(record, "trace_id", None) or (
            format(ctx.trace_id, "032x") if ctx.is_valid else None
        )
        span_id = getattr(record, "span_id", None) or (format(ctx.span_id, "016x") if ctx.is_valid else None)
        if trace_id:
            body["trace_id"], body["span_id"] = trace_id, span_id
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                body[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            body["error"] = record.exc_info[0].__name__  # the type only: no trace, no locals
        return json.dumps(body, default=str)


def configure_json_logging(level: int = logging.INFO, path: str | None = None) -> None:
    """Send the ``moa`` loggers' records as JSON lines (once per process): to ``path`` when given,
    each line written and flushed as it is logged, otherwise to stderr."""
    logger = logging.getLogger(LOGGER_NAME)
    if any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        return
    # WatchedFileHandler reopens the file when its owner rotates it away.
    handler: logging.Handler = (
        logging.handlers.WatchedFileHandler(path) if path else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def span_ids(span: trace.Span) -> dict[str, str]:
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}
