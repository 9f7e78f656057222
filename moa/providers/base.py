"""What every provider adapter shares: limits, one retry loop inside one deadline, error typing,
and the normalised result. An adapter only says how to send one attempt on its SDK."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import math
import random
import re
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import ModuleType
from typing import Any, ClassVar, get_args

from pydantic import ValidationError

from moa.config import Endpoint, ProviderConfig
from moa.deadline import Deadline
from moa.limits import DEFAULT_OUTPUT_RESERVE, ProviderLimits, RateBudgetExceeded
from moa.tokens import approx_message_tokens, approx_tokens
from moa.types import (
    CallError,
    CallRequest,
    CallResult,
    DroppableParam,
    ErrorKind,
    GenerationParams,
    StreamEvent,
    TextDelta,
    Usage,
    error_text,
)
from moa_observability.genai import end_call_span, start_call_span
from moa_observability.logs import span_ids

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


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level exception classes of the HTTP stacks the SDKs use (whichever are installed)."""
    found: list[type[BaseException]] = [ConnectionError]
    for module, name in (
        ("httpx", "TransportError"),
        ("httpx2", "TransportError"),
        ("aiohttp", "ClientError"),
    ):
        try:
            found.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


TRANSPORT_ERRORS = _transport_errors()


@dataclass
class Attempt:
    """A successful attempt, before normalisation."""

    text: str
    model: str | None
    usage: Usage
    finish_reason: str | None
    service_s: float | None = None


class AttemptError(Exception):
    """A failed attempt, already typed."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        status: int | None = None,
        retry_after_s: float | None = None,
        service_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind, self.message, self.status = kind, message, status
        self.retry_after_s, self.service_s = retry_after_s, service_s


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
            etype = err.get("type") if isinstance(err, dict) else None
            kind = STREAM_ERROR_KINDS.get(etype or "", ErrorKind.SERVER_ERROR)
            return AttemptError(kind, f"{etype or 'error'} mid-stream: {detail or type(exc).__name__}")
        message = f"{exc.status_code}: {detail or type(exc).__name__}"
        headers = exc.response.headers
        return status_error(exc.status_code, message, headers, retry_hint(headers))
    if isinstance(exc, sdk.APITimeoutError):
        return AttemptError(ErrorKind.TIMEOUT, "the call timed out")
    if isinstance(exc, sdk.APIConnectionError):
        if in_stream:
            return AttemptError(ErrorKind.MALFORMED_RESPONSE, "stream cut mid-way")
        return AttemptError(ErrorKind.SERVER_ERROR, "connection failed")
    if isinstance(exc, sdk.APIResponseValidationError):
        return AttemptError(ErrorKind.MALFORMED_RESPONSE, "response failed validation")
    return None


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


class ProviderClient(ABC):
    """One provider's client: its SDK client (created once, pooled), its limits, its retry loop."""

    kind: ClassVar[str]

    def __init__(
        self,
        name: str,
        cfg: ProviderConfig,
        endpoint: Endpoint,
        limits: ProviderLimits | None = None,
        *,
        capture_content: bool = False,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.endpoint = endpoint
        self.limits = limits or ProviderLimits.from_config(cfg)
        self.capture_content = capture_content
        self._secret = endpoint.api_key.get_secret_value() if endpoint.api_key else None
        # Parameters each model refused with a 400 in this process: never sent to it again.
        self._refused: dict[str, set[str]] = {}
        # One SDK client per adapter, created once and reused: its connection pool is shared.
        self._sdk = self._make_sdk()

    # -- what an adapter provides ----------------------------------------------------------------

    @abstractmethod
    def _make_sdk(self) -> Any:
        """The provider's official async SDK client, with SDK-internal retries off."""

    @abstractmethod
    async def _complete_once(self, req: CallRequest, timeout_s: float) -> Attempt:
        """Send one non-streaming attempt; raise on failure."""

    @abstractmethod
    def _stream_once(self, req: CallRequest, timeout_s: float) -> AsyncIterator[str | Attempt]:
        """Send one streaming attempt: yield text pieces, then one Attempt; raise on failure."""

    @abstractmethod
    def _classify(self, exc: BaseException, in_stream: bool) -> AttemptError:
        """Type an exception raised by this SDK."""

    def _adapt(self, model: str, params: GenerationParams) -> tuple[GenerationParams, list[str]]:
        """Fit the parameters to what this provider's API accepts (ranges, limits, combinations);
        return them with one note per change. The default changes nothing."""
        return params, []

    def _refused_param(self, message: str) -> str | None:
        """The parameter (our name) a 400 message says the model refuses, in this API's words."""
        return None

    async def aclose(self) -> None:
        return None

    # -- the shared machinery --------------------------------------------------------------------

    async def complete(self, req: CallRequest) -> CallResult:
        result: CallResult | None = None
        async for ev in self._run(req, stream=False):
            if isinstance(ev, CallResult):
                result = ev
        assert result is not None
        return result

    def stream(
        self, req: CallRequest, *, on_cut: Callable[[Usage], None] | None = None
    ) -> AsyncIterator[StreamEvent]:
        """The call, streamed. ``on_cut`` is told what the call consumed, as far as this client
        knows (every prompt an attempt sent, the text received), if the stream is closed before
        its result: a provider replica passes on that receipt for the ledger, having seen text its
        caller had not yet (``moa.engine.receipts``)."""
        return self._run(req, stream=True, on_cut=on_cut)

    def health(self) -> dict[str, object]:
        return {
            "provider": self.name,
            "kind": self.kind,
            "simulated": self.endpoint.simulated,
            **self.limits.snapshot(),
        }

    def _needs_key(self) -> str | None:
        """The environment variable to set when this provider has no key (None when it needs none)."""
        if self.endpoint.api_key is None and self.cfg.api_key_env:
            return self.cfg.api_key_env
        return None

    def _result(self, req: CallRequest, t0: float, **fields: Any) -> CallResult:
        base: dict[str, Any] = {
            "provider": self.name,
            "provider_kind": self.kind,
            "requested_model": req.model,
            "latency_s": time.monotonic() - t0,
        }
        return CallResult(**(base | fields))

    def _redact(self, text: str) -> str:
        return redact_key(text, self._secret)

    def _failure(self, req: CallRequest, t0: float, err: AttemptError, **fields: Any) -> CallResult:
        # A prompt refused as too long for the model: the window it names travels with the
        # failure, so the engine can fit the references to it and call again at once. Like any
        # bad request it says nothing about the provider's health (the breaker stays neutral).
        window = context_window_in(err.message) if err.kind is ErrorKind.BAD_REQUEST else None
        error = CallError(
            kind=err.kind,
            message=self._redact(err.message),
            status_code=err.status,
            retry_after_s=err.retry_after_s,
            context_window=window,
        )
        return self._result(req, t0, error=error, **fields)

    def _served_window(self, model: str) -> int | None:
        """The context window the server itself reports for ``model``, if it is known by now (never
        waited for: see ``OpenAICompatibleClient``). Only an OpenAI-compatible server reports one;
        the default knows none."""
        return None

    def _prepare(self, req: CallRequest) -> tuple[CallRequest, list[str]]:
        """The request as it will be sent: parameters the model refuses (configured, or learned
        from an earlier 400) dropped, then fitted to the API; with a note for each change."""
        p, notes = req.params, []
        configured = set(self.cfg.price(req.model).unsupported_params)
        learned = self._refused.get(req.model, set())
        drop: dict[str, None] = {}
        for name in DROPPABLE:
            if getattr(p, name) is None or (name not in configured and name not in learned):
                continue
            how = "per config" if name in configured else "learned from its 400"
            notes.append(f"{name} dropped: refused by {req.model} ({how})")
            drop[name] = None
        if drop:
            p = p.model_copy(update=drop)
        p, fitted = self._adapt(req.model, p)
        notes += fitted
        return (req if p is req.params else req.model_copy(update={"params": p})), notes

    def _learn_refusal(self, sent: CallRequest, err: AttemptError) -> bool:
        """Whether ``err`` is the model refusing a parameter this request sent: if so, remember it
        (it is dropped from every later request to this model) and say the call may go again."""
        if err.kind is not ErrorKind.BAD_REQUEST or err.status != 400:
            return False
        name = self._refused_param(err.message)
        if name is None or getattr(sent.params, name) is None:
            return False
        self._refused.setdefault(sent.model, set()).add(name)
        log.warning(
            "%s refused %s; not sent to it again in this process (%s)",
            sent.model,
            name,
            self._redact(err.message),
            extra={"event": "parameter_refused", "provider": self.name, "model": sent.model},
        )
        return True

    async def _run(
        self, req: CallRequest, stream: bool, on_cut: Callable[[Usage], None] | None = None
    ) -> AsyncIterator[StreamEvent]:
        """One call, traced (a GenAI ``chat {model}`` span) and logged, whatever its outcome; with
        ``on_cut``, told what it consumed if it ends without a result (see ``stream``).

        What it consumed is counted here, where it is complete however the call ends."""
        span = start_call_span(
            req, self.kind, self.endpoint.base_url, stream=stream, capture_content=self.capture_content
        )
        self._served_window(req.model)  # starts reading the server's listing, once, unawaited
        result: CallResult | None = None
        used = _Consumption(input_tokens=approx_message_tokens(m.content for m in req.messages))
        try:
            # Closed with this generator, not when it is collected: a consumer that stops at a
            # yield (a provider replica cancelled while its text waits) closes the provider's
            # stream now, and the provider stops writing, and billing, now.
            async with contextlib.aclosing(self._gated(req, stream, used)) as events:
                async for ev in events:
                    if isinstance(ev, CallResult):
                        window = self._served_window(req.model)
                        if window is not None and ev.context_window is None:
                            ev = ev.model_copy(update={"context_window": window})
                        result = ev
                    yield ev
        finally:
            if result is None and on_cut is not None:
                on_cut(used.billed())
            end_call_span(span, result, capture_content=self.capture_content)
            if result is not None:
                log.info(
                    "provider call",
                    extra={
                        "event": "provider_call",
                        "provider": result.provider,
                        "model": result.requested_model,
                        "status": "ok" if result.ok else "error",
                        "error_kind": result.error.kind.value if result.error else None,
                        # Already redacted of the key (``_failure``): what the provider said.
                        "error_message": error_text(result.error.message) if result.error else None,
                        "latency_s": round(result.latency_s, 4),
                        "input_tokens": result.usage.input_tokens,
                        "output_tokens": result.usage.output_tokens,
                        "cost_usd": result.cost_usd,
                        "attempts": result.attempts,
                        "adjustments": result.adjustments or None,
                        **span_ids(span),
                    },
                )

    async def _gated(
        self, req: CallRequest, stream: bool, used: _Consumption
    ) -> AsyncGenerator[StreamEvent, None]:
        """Breaker, concurrency slot and rate budget around the attempts; the breaker learns the outcome."""
        t0 = time.monotonic()
        deadline = Deadline.after(req.timeout_s or self.cfg.timeout_s)
        # A deadline tighter than the provider's own timeout is the caller's budget (a layer or
        # request deadline): running out of it says nothing about the provider's health.
        caller_budget = req.timeout_s is not None and req.timeout_s < self.cfg.timeout_s
        missing = self._needs_key()
        if missing:
            yield self._failure(
                req, t0, AttemptError(ErrorKind.AUTH, f"no API key: set the {missing} environment variable")
            )
            return
        breaker = self.limits.breaker
        if not breaker.allow():
            wait = breaker.retry_after_s()
            why = f"circuit open after repeated failures; retry in {wait:.1f}s"
            err = AttemptError(ErrorKind.CIRCUIT_OPEN, why, retry_after_s=wait)
            yield self._failure(req, t0, err, streamed=stream)
            return
        outcome: ErrorKind | None = None  # None: success; a kind: failure; unset on cancellation
        cancelled = True
        if not await self.limits.enter(deadline.remaining()):
            breaker.record_neutral()
            why = "no concurrency slot came free before the deadline"
            yield self._failure(req, t0, AttemptError(ErrorKind.TIMEOUT, why), streamed=stream)
            return
        reserved = 0
        try:
            # What the call may consume, never more than the model can produce in one answer.
            max_output = self.cfg.price(req.model).max_output_tokens
            wanted_output = min(req.params.max_tokens or DEFAULT_OUTPUT_RESERVE, max_output)
            reserved = used.input_tokens + wanted_output
            try:
                await self.limits.budget.acquire(reserved, deadline.remaining())
            except RateBudgetExceeded as e:
                reserved = 0  # nothing was taken
                cancelled = False
                why = f"rate budget of this provider exhausted; retry in {e.retry_after_s:.1f}s"
                err = AttemptError(ErrorKind.RATE_LIMITED, why, retry_after_s=e.retry_after_s)
                yield self._failure(req, t0, err, streamed=stream)
                breaker.record_neutral()
                return
            async with contextlib.aclosing(self._attempts(req, stream, t0, deadline, used)) as events:
                async for ev in events:
                    if isinstance(ev, CallResult):
                        outcome = ev.error.kind if ev.error else None
                        cancelled = False
                        if ev.ok:
                            used.actual = ev.usage.total_tokens
                    yield ev
        finally:
            if reserved:
                # Settle with what the call really used, however it ended: its usage when it
                # answered; nothing when every attempt was refused before any token; what was
                # sent and received so far when it failed or was cancelled mid-way.
                await self.limits.budget.settle(reserved, used.tokens())
            self.limits.leave()
            if cancelled:
                breaker.record_neutral()
            elif outcome is None:
                breaker.record_success()
            elif outcome.counts_against_health and not (outcome is ErrorKind.TIMEOUT and caller_budget):
                breaker.record_failure()
            else:
                breaker.record_neutral()

    async def _attempts(
        self, req: CallRequest, stream: bool, t0: float, deadline: Deadline, used: _Consumption
    ) -> AsyncGenerator[StreamEvent, None]:
        """The retry loop: retryable failures are retried with jittered backoff (or as Retry-After
        says) while the deadline allows; a stream is never retried once text has been sent. A 400
        refusing a parameter is retried at once without it (not counted as a retry)."""
        attempts, relearned, service, parts = 0, 0, None, []
        ttft: float | None = None
        sent, adjustments = self._prepare(req)
        while True:
            attempts += 1
            remaining = deadline.remaining()
            final: Attempt | None = None
            try:
                if deadline.expired:
                    raise AttemptError(ErrorKind.TIMEOUT, "the call's deadline passed")
                used.sent += 1  # from here the provider may have read (and billed) the prompt
                if stream:
                    it = aiter(self._stream_once(sent, remaining))
                    try:
                        while True:
                            async with asyncio.timeout_at(deadline.loop_time()):
                                item = await anext(it, None)
                            if item is None:
                                break
                            if isinstance(item, Attempt):
                                final = item
                            elif item:
                                ttft = ttft if ttft is not None else time.monotonic() - t0
                                parts.append(item)
                                used.received.append(item)
                                yield TextDelta(text=item)
                    finally:
                        await _aclose(it)
                    if final is None:
                        raise AttemptError(
                            ErrorKind.MALFORMED_RESPONSE, "stream ended without its final event"
                        )
                else:
                    async with asyncio.timeout_at(deadline.loop_time()):
                        final = await self._complete_once(sent, remaining)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                err = exc if isinstance(exc, AttemptError) else self._classify(exc, in_stream=stream)
                if err.status is not None or err.kind is ErrorKind.INTERNAL:
                    # Refused with a status (nothing generated), or never sent at all.
                    used.refused += 1
                if err.service_s is not None:
                    service = (service or 0.0) + err.service_s
                if not parts and self._learn_refusal(sent, err):
                    relearned += 1
                    sent, adjustments = self._prepare(req)
                    continue
                delay = self._retry_delay(err, attempts - relearned, deadline, emitted=bool(parts))
                if delay is None:
                    # What the provider bills for the attempts that read the prompt, and the text
                    # a broken stream sent: never nothing for a call that generated.
                    billed = used.billed()
                    yield self._failure(
                        req,
                        t0,
                        err,
                        usage=billed,
                        cost_usd=self._cost(req, billed),
                        usage_estimated=billed.total_tokens > 0,
                        attempts=attempts,
                        streamed=stream,
                        ttft_s=ttft,
                        provider_service_s=service,
                        text="".join(parts),
                        adjustments=adjustments,
                    )
                    return
                await asyncio.sleep(delay)
                continue
            if final.service_s is not None:
                service = (service or 0.0) + final.service_s
            text = "".join(parts) if stream else final.text
            model = final.model or req.model
            # The provider's usage for the attempt that answered, plus the prompts that earlier
            # failed attempts had it read (a timeout, a broken connection), estimated.
            retried = used.billed(answered=True)
            usage = final.usage + retried
            yield self._result(
                req,
                t0,
                model=model,
                text=text,
                usage=usage,
                usage_estimated=retried.total_tokens > 0,
                finish_reason=final.finish_reason,
                ttft_s=ttft,
                cost_usd=self._cost(req, usage),
                attempts=attempts,
                streamed=stream,
                provider_service_s=service,
                adjustments=adjustments,
            )
            return

    def _cost(self, req: CallRequest, usage: Usage) -> float:
        return self.cfg.price(req.model).cost(usage.input_tokens, usage.output_tokens, usage.cached_tokens)

    def _retry_delay(
        self, err: AttemptError, attempts: int, deadline: Deadline, emitted: bool
    ) -> float | None:
        """How long to wait before the next attempt, or None to give up now."""
        retry = self.cfg.retry
        if emitted or not err.kind.retryable or attempts >= retry.max_attempts:
            return None
        if err.retry_after_s is not None:
            if err.retry_after_s > retry.max_retry_after_s:
                return None
            delay = err.retry_after_s
        else:
            cap = min(retry.backoff_max_s, retry.backoff_base_s * 2 ** (attempts - 1))
            delay = random.uniform(0, cap)
        if delay >= deadline.remaining():
            return None
        return delay


@dataclass
class _Consumption:
    """What one call consumed of the token budget, as far as we can know it."""

    input_tokens: int
    sent: int = 0  # attempts that went out
    refused: int = 0  # of those, attempts refused with a status (or that never left our side)
    received: list[str] = field(default_factory=list)  # streamed text received so far
    actual: int | None = None  # the provider's own usage, once it answered

    def billed(self, answered: bool = False) -> Usage:
        """What the provider bills for the attempts that did not answer: each one that read the
        prompt (every attempt sent but those refused with a status), and the text received; with
        ``answered``, the last attempt is the one that answered, and its own usage is reported."""
        reads = self.sent - self.refused - (1 if answered else 0)
        output = 0 if answered else approx_tokens("".join(self.received))
        return Usage(input_tokens=self.input_tokens * max(reads, 0), output_tokens=output)

    def tokens(self) -> int:
        if self.actual is not None:
            return self.actual
        # An attempt refused with a status consumed nothing; any other (a timeout, a cut stream,
        # our cancellation) had its prompt read, and produced what we received.
        read_prompt = self.sent > self.refused or bool(self.received)
        output = approx_tokens("".join(self.received))
        return (self.input_tokens if read_prompt else 0) + output


async def _aclose(it: AsyncIterator[Any]) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()
