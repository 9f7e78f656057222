"""What every SDK adapter reads off its wire the same way: HTTP statuses and SDK exceptions typed
as ``AttemptError``, the waits a refusal asks for, the service time a response reports, the
parameter or context window a refusal names, and API keys kept out of every message."""

from __future__ import annotations

import email.utils
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from types import ModuleType
from typing import get_args

import aiohttp
import httpx
import httpx2
from pydantic import ValidationError

from moa.providers.transport import AttemptError
from moa.types import DroppableParam, ErrorKind

# The provider's own report of how long it spent on a request: OpenAI documents this header on its
# API responses ("time taken processing your API request", integer milliseconds), and
# OpenAI-compatible servers copy it. Anthropic and Gemini document nothing of the kind.
PROVIDER_SERVICE_HEADER = "openai-processing-ms"
# Sent only by this project's provider simulator (``moa.simulator``), on every wire: the time it
# deliberately spent, in milliseconds with decimals. No real provider sends it.
SIMULATOR_SERVICE_HEADER = "x-simulator-service-ms"
# A key echoed with its middle masked, as OpenAI's 401 does ("Incorrect API key provided:
# sk-proj-****...abcd."): a run of three or more mask characters, or "..." followed by the key's
# tail. The whole token goes, with whatever it still shows of the key.
MASKED_KEY = re.compile(r"[\w\-:/.]*(?:[*\u2022]{3,}|\.{3}(?=[\w-]{4}))[\w\-]*")
log = logging.getLogger("moa.providers")
DROPPABLE: tuple[str, ...] = get_args(DroppableParam)


# Connection-level exception classes of the HTTP stacks the SDKs use.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    httpx.TransportError,
    httpx2.TransportError,
    aiohttp.ClientError,
)


def _http_cause(exc: BaseException) -> BaseException | None:
    """The HTTP stack's own exception under an SDK's wrapper (``raise ... from``): aiohttp's
    original when there is one, else the outermost httpx exception (httpx maps its own stack's
    errors to the right class; the SDKs' aiohttp transport maps every broken connection, a refused
    one included, to ``httpx.ConnectTimeout``, so there the original is the truth)."""
    found: BaseException | None = None
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, aiohttp.ClientError):
            found = seen  # the deepest aiohttp error: the original
        elif found is None and isinstance(seen, httpx.TransportError | httpx2.TransportError):
            found = seen
        seen = seen.__cause__
    return found


def connection_failure(exc: BaseException, in_stream: bool) -> AttemptError | None:
    """A failure of the connection itself, typed by what the HTTP stack saw rather than by the
    SDK's wrapper: a connection that was never made (refused, unresolved, timed out while
    connecting) sent nothing, so nothing is billed and it is never a stream cut mid-way, whatever
    the call; a timeout on an open connection is a timeout; any other break is a stream cut
    mid-way once the stream is open (``in_stream``), else a failed connection."""
    cause = _http_cause(exc)
    if cause is None:
        return None
    name = type(cause).__name__
    timed_out = isinstance(
        cause, aiohttp.ServerTimeoutError | httpx.TimeoutException | httpx2.TimeoutException
    )
    never_connected = isinstance(
        cause,
        aiohttp.ClientConnectorError
        | aiohttp.ConnectionTimeoutError
        | httpx.ConnectError
        | httpx.ConnectTimeout
        | httpx2.ConnectError
        | httpx2.ConnectTimeout,
    )
    if never_connected:
        kind = ErrorKind.TIMEOUT if timed_out else ErrorKind.SERVER_ERROR
        return AttemptError(kind, f"connection failed: never connected ({name})", unsent=True)
    if timed_out:
        return AttemptError(ErrorKind.TIMEOUT, "the call timed out")
    if in_stream:
        return AttemptError(ErrorKind.MALFORMED_RESPONSE, f"stream cut mid-way: {name}")
    return AttemptError(ErrorKind.SERVER_ERROR, f"connection failed: {name}")


def kind_for_status(status: int) -> ErrorKind:
    if status == 429:
        return ErrorKind.RATE_LIMITED
    if status in (401, 403):
        return ErrorKind.AUTH
    if status == 408:
        return ErrorKind.TIMEOUT
    if status >= 500:
        return ErrorKind.SERVER_ERROR
    return ErrorKind.BAD_REQUEST


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds (fractional allowed) or an HTTP date."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


# A duration as Go prints one (OpenAI's ``x-ratelimit-reset-*``: "1s", "6m0s", "20ms") or as
# protobuf's JSON writes one (Gemini's ``RetryInfo.retryDelay``: "53s", "2.463586755s").
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|\u00b5s|ns)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "\u00b5s": 1e-6, "ns": 1e-9}


def parse_duration(value: str | None) -> float | None:
    """Seconds in a Go or protobuf duration string, or None if it is not one."""
    if not value:
        return None
    value = value.strip()
    parts = list(_DURATION_PART.finditer(value))
    if not parts or "".join(m.group() for m in parts) != value:
        return None
    return max(sum(float(m.group(1)) * _DURATION_UNITS[m.group(2)] for m in parts), 0.0)


def parse_reset_time(value: str | None) -> float | None:
    """Seconds from now until an RFC 3339 timestamp (Anthropic's ``anthropic-ratelimit-*-reset``)."""
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return max(when.timestamp() - time.time(), 0.0)


def header_retry_hint(
    headers: Mapping[str, str] | None,
    limits: Mapping[str, str],
    reset: Callable[[str | None], float | None],
) -> float | None:
    """How long a 429 says to wait, read from its headers the way the provider documents them.

    ``Retry-After`` first (RFC 9110; Anthropic documents it on every 429). Without one, the rate
    limit headers: ``limits`` maps each ``*-remaining`` header to its ``*-reset`` header, and the
    wait is the latest reset among the limits that are spent (remaining 0), since a request needs
    every limit to have room again. A limit that still has room says nothing about this 429.
    """
    if not headers:
        return None
    hint = parse_retry_after(headers.get("retry-after"))
    if hint is not None:
        return hint
    waits = []
    for remaining, reset_header in limits.items():
        left = headers.get(remaining)
        if left is None or left.strip() != "0":
            continue
        wait = reset(headers.get(reset_header))
        if wait is not None:
            waits.append(wait)
    return max(waits) if waits else None


def provider_service_time(headers: Mapping[str, str] | None) -> float | None:
    """The service time (seconds) a response says the provider spent on it, or None if it says none.

    Read here, once, for every adapter. A real provider's own header is the real signal
    (``openai-processing-ms``). The simulator's header is the one fallback, so that a benchmark can
    split latency into service time and our overhead on every wire, Anthropic's and Gemini's
    included. When both are present only the simulator sent them, and its header wins: it carries
    the same time without rounding it to a whole millisecond, a rounding the benchmark's overhead
    figures (milliseconds with one decimal, summed over a critical path) would show.
    """
    if not headers:
        return None
    for name in (SIMULATOR_SERVICE_HEADER, PROVIDER_SERVICE_HEADER):
        value = headers.get(name)
        if value is None:
            continue
        try:
            ms = float(value)
        except ValueError:
            continue
        if math.isfinite(ms) and ms >= 0:
            return ms / 1000
    return None


# Error types an error event can carry mid-stream (Anthropic's Errors page), by what they mean for us.
STREAM_ERROR_KINDS = {
    "overloaded_error": ErrorKind.SERVER_ERROR,
    "api_error": ErrorKind.SERVER_ERROR,
    "rate_limit_error": ErrorKind.RATE_LIMITED,
    "timeout_error": ErrorKind.TIMEOUT,
    "authentication_error": ErrorKind.AUTH,
    "permission_error": ErrorKind.AUTH,
    "invalid_request_error": ErrorKind.BAD_REQUEST,
}


def redact_key(text: str, secret: str | None) -> str:
    """``text`` with no part of an API key left in it: the key itself, any masked echo of a key, and
    the key's first 8 or last 4 characters standing as a word of their own (what masked echoes show)."""
    if secret:
        text = text.replace(secret, "***")
    text = MASKED_KEY.sub("***", text)
    if secret and len(secret) >= 12:
        for fragment in {secret[:8], secret[-4:]}:
            text = re.sub(rf"(?<![\w-]){re.escape(fragment)}(?![\w-])", "***", text)
    return text


# How servers refuse a prompt longer than the model's context window, each naming the window:
# llama.cpp's llama-server ("request (1346 tokens) exceeds the available context size (1024
# tokens), try increasing it", type exceed_context_size_error; older builds "exceeds context size
# (N tokens)" or "is larger than the max context size (N tokens)"), OpenAI's
# context_length_exceeded and vLLM ("This model's maximum context length is N tokens. ...").
CONTEXT_REFUSAL = re.compile(
    r"(?:available|max) context size \((\d+) tokens\)|exceeds context size \((\d+) tokens\)"
    r"|maximum context length is (\d+) tokens"
)


def context_window_in(message: str) -> int | None:
    """The context window a provider's refusal names, if the refusal is a prompt too long for it."""
    m = CONTEXT_REFUSAL.search(message)
    if m is None:
        return None
    window = int(next(g for g in m.groups() if g))
    return window if window > 0 else None


def status_error(
    status: int, message: str, headers: Mapping[str, str] | None, retry_after_s: float | None
) -> AttemptError:
    """A refusal with an HTTP status; ``retry_after_s`` is the wait the provider asked for, read by
    the adapter from wherever that provider puts it (a header, or Gemini's error body)."""
    return AttemptError(
        kind_for_status(status),
        message,
        status=status,
        retry_after_s=retry_after_s,
        service_s=provider_service_time(headers),
    )


def classify_common(exc: BaseException, in_stream: bool) -> AttemptError | None:
    """Failures that look the same whatever the SDK: timeouts, broken bodies, broken connections."""
    if isinstance(exc, AttemptError):
        return exc
    if isinstance(exc, TimeoutError):
        return AttemptError(ErrorKind.TIMEOUT, "the call timed out")
    if isinstance(exc, json.JSONDecodeError | ValidationError | UnicodeDecodeError):
        return AttemptError(ErrorKind.MALFORMED_RESPONSE, f"unparseable response: {type(exc).__name__}")
    if (failed := connection_failure(exc, in_stream)) is not None:
        return failed
    if isinstance(exc, TRANSPORT_ERRORS):
        if "Timeout" in type(exc).__name__:
            return AttemptError(ErrorKind.TIMEOUT, "the call timed out")
        if in_stream:
            return AttemptError(ErrorKind.MALFORMED_RESPONSE, f"stream cut mid-way: {type(exc).__name__}")
        return AttemptError(ErrorKind.SERVER_ERROR, f"connection failed: {type(exc).__name__}")
    return None


def classify_generated_sdk(
    sdk: ModuleType,
    exc: BaseException,
    in_stream: bool,
    retry_hint: Callable[[Mapping[str, str]], float | None],
) -> AttemptError | None:
    """The ``openai`` and ``anthropic`` SDKs share one generated exception hierarchy: type it once.
    ``retry_hint`` reads the provider's wait from a refusal's headers (each documents its own)."""
    if isinstance(exc, sdk.APIStatusError):
        body = exc.body
        err = body.get("error", body) if isinstance(body, dict) else None
        detail = err.get("message") if isinstance(err, dict) else None
        if exc.status_code < 400:
            # An error event inside a stream (Anthropic's "event: error" after a 200): the HTTP
            # status says nothing, the event's own error type says what failed. Not a refusal with
            # a status either: the prompt was read and tokens may have been produced.
            return _mid_stream(err, type(exc).__name__)
        message = f"{exc.status_code}: {detail or type(exc).__name__}"
        headers = exc.response.headers
        return status_error(exc.status_code, message, headers, retry_hint(headers))
    if isinstance(exc, sdk.APIConnectionError) and (failed := connection_failure(exc, in_stream)):
        return failed
    if isinstance(exc, sdk.APITimeoutError):
        return AttemptError(ErrorKind.TIMEOUT, "the call timed out")
    if isinstance(exc, sdk.APIConnectionError):
        if in_stream:
            return AttemptError(ErrorKind.MALFORMED_RESPONSE, "stream cut mid-way")
        return AttemptError(ErrorKind.SERVER_ERROR, "connection failed")
    if isinstance(exc, sdk.APIResponseValidationError):
        return AttemptError(ErrorKind.MALFORMED_RESPONSE, "response failed validation")
    if type(exc) is sdk.APIError:
        # What the SDK's stream raises for a chunk carrying an ``error`` after the 200 (OpenAI's
        # way of failing mid-stream; its body is the error object): the provider's failure,
        # typed by the error's own type as an error event is, never one of ours.
        return _mid_stream(getattr(exc, "body", None), str(exc))
    return None


def _mid_stream(err: object, fallback: str) -> AttemptError:
    """A failure the provider reported after the 200 (an error event, an error chunk), typed by
    the error object's own ``type`` (a server error when it names none), its ``message`` said
    (``fallback`` without one)."""
    error = err if isinstance(err, dict) else {}
    etype = error.get("type")
    kind = STREAM_ERROR_KINDS.get(etype or "", ErrorKind.SERVER_ERROR)
    return AttemptError(kind, f"{etype or 'error'} mid-stream: {error.get('message') or fallback}")


def refused_param(message: str, patterns: re.Pattern[str], names: Mapping[str, str]) -> str | None:
    """The droppable parameter (our name) a provider's 400 message says the model refuses, if any.

    ``patterns`` captures the provider's name of the parameter in its first matching group;
    ``names`` maps the provider's names to ours where they differ.
    """
    m = patterns.search(message)
    if m is None:
        return None
    found = next(g for g in m.groups() if g)
    name = names.get(found, found)
    return name if name in DROPPABLE else None


def unexpected_failure(exc: BaseException) -> AttemptError:
    """Anything no rule recognised was raised on our side (text the SDK cannot encode, an SDK that
    refuses its arguments, a bug of ours): the provider did nothing wrong, so it is ``internal`` and
    never counts against the provider's health. Logged with its type so it gets fixed."""
    log.error(
        "internal failure before or around a provider call: %s",
        type(exc).__name__,
        extra={"event": "internal_error", "error_type": type(exc).__name__},
    )
    return AttemptError(ErrorKind.INTERNAL, f"internal error on our side: {type(exc).__name__}")
