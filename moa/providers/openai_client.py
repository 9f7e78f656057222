"""OpenAI Chat Completions through ``openai.AsyncOpenAI``; also any OpenAI-compatible endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import ssl
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import httpx2
import openai
from openai.types.chat import ChatCompletion

from moa.config import Endpoint, ProviderConfig
from moa.providers.sse import sse_events
from moa.providers.structured import openai_response_format
from moa.providers.transport import Attempt, AttemptError, RefusalFragment, SDKTransport, ToolFragment
from moa.providers.wire import (
    classify_common,
    classify_generated_sdk,
    header_retry_hint,
    parse_duration,
    provider_service_time,
    refused_param,
    unexpected_failure,
)
from moa.types import CallRequest, ChatMessage, ErrorKind, GenerationParams, ToolCall, ToolSet, Usage

log = logging.getLogger("moa.providers")
# How long the one-off read of a server's model listing may take (it never delays a call twice).
LISTING_TIMEOUT_S = 3.0
# OpenAI's finish reasons, ours; "function_call" is the legacy functions' way of saying "tool_calls"
# (we always send modern tools, but a compatible server may answer the old way).
FINISH = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content_filter",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
}
# OpenAI's API takes at most this many stop sequences.
MAX_STOP = 4
# How OpenAI refuses a parameter: "Unsupported parameter: 'temperature' is not supported with this
# model." or "Unsupported value: 'temperature' does not support 0.5 with this model. Only the
# default (1) value is supported." (reasoning models); compatible servers may not know a field
# ("Unrecognized request argument supplied: seed").
REFUSED = re.compile(
    r"Unsupported (?:parameter|value): '(\w+)'|Unrecognized request argument supplied: (\w+)"
)

# How an OpenAI-compatible server refuses tools outright, with a 500 although nothing failed:
# llama.cpp's llama-server started with --no-jinja ("tools param requires --jinja flag"; jinja is
# on by default since late 2025) and its builds from before it streamed tool calls ("Cannot use
# tools with stream"). No retry can help and the server is healthy: it refuses the request.
TOOLS_REFUSED = re.compile(r"tools param requires --jinja flag|Cannot use tools with stream")

# Where OpenAI says when a spent limit has room again (Rate limits guide, "Rate limits in headers"):
# each ``x-ratelimit-remaining-*`` header with its ``x-ratelimit-reset-*``, a Go duration ("6m0s").
RATE_LIMITS = {
    "x-ratelimit-remaining-requests": "x-ratelimit-reset-requests",
    "x-ratelimit-remaining-tokens": "x-ratelimit-reset-tokens",
}


def retry_hint(headers: Mapping[str, str]) -> float | None:
    """OpenAI's wait: ``Retry-After`` where a server sends one (compatible servers do), else the
    reset of the spent limit, which is what OpenAI itself documents on a 429."""
    return header_retry_hint(headers, RATE_LIMITS, parse_duration)


class OpenAITransport(SDKTransport):
    kind = "openai"

    def _make_sdk(self) -> Any:
        cfg, endpoint = self.cfg, self.endpoint
        return openai.AsyncOpenAI(
            # An OpenAI-compatible server may need no key; the SDK insists on some value.
            api_key=self._secret or "none",
            base_url=endpoint.base_url,
            max_retries=0,  # our retry loop owns retries and the deadline
            timeout=openai.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s),
            # aiohttp underneath (the SDK's documented option): its HTTP parser is compiled, where
            # the default transport parses every streamed chunk in Python (docs/BENCHMARKS.md).
            http_client=openai.DefaultAioHttpClient(),
        )

    def _args(self, req: CallRequest, timeout_s: float) -> dict[str, Any]:
        p = req.params
        args: dict[str, Any] = {
            "model": req.model,
            "messages": [_message(i, m) for i, m in enumerate(req.messages)],
            # What is left of the call's deadline, with the configured connect timeout: a bare
            # number here would replace the client's Timeout, connect_timeout_s included.
            "timeout": openai.Timeout(timeout_s, connect=min(self.cfg.connect_timeout_s, timeout_s)),
        }
        if p.max_tokens is not None:
            # OpenAI's own API wants max_completion_tokens; compatible servers know max_tokens.
            args["max_completion_tokens" if self.kind == "openai" else "max_tokens"] = p.max_tokens
        optional = {
            "temperature": p.temperature,
            "top_p": p.top_p,
            "seed": p.seed,
            "frequency_penalty": p.frequency_penalty,
            "presence_penalty": p.presence_penalty,
            "logit_bias": p.logit_bias,
            "reasoning_effort": p.reasoning_effort,
        }
        args |= {k: v for k, v in optional.items() if v is not None}
        if p.stop:
            args["stop"] = list(p.stop)
        if req.tools is not None:
            args |= _tool_args(req.tools)
        if req.response_format is not None:
            # OpenAI's own API holds a strict schema to Structured Outputs' subset; a compatible
            # server (vLLM, llama.cpp) takes the schema as it is, whatever strict says.
            args["response_format"] = openai_response_format(
                req.response_format, strict_subset=self.kind == "openai"
            )
        return args

    def adapt(self, model: str, params: GenerationParams) -> tuple[GenerationParams, list[str]]:
        stop = params.stop
        if self.kind == "openai" and stop and len(stop) > MAX_STOP:
            note = f"stop: kept the first {MAX_STOP} of {len(stop)} sequences (the OpenAI API's limit)"
            return params.model_copy(update={"stop": stop[:MAX_STOP]}), [note]
        return params, []

    def refused_param(self, message: str) -> str | None:
        return refused_param(message, REFUSED, {})

    async def send(self, req: CallRequest, timeout_s: float) -> Attempt:
        raw = await self._sdk.chat.completions.with_raw_response.create(**self._args(req, timeout_s))
        service = provider_service_time(raw.headers)
        completion = raw.parse()
        if not isinstance(completion, ChatCompletion) or not completion.choices:
            raise AttemptError(
                ErrorKind.MALFORMED_RESPONSE, "response is not a chat completion", service_s=service
            )
        choice = completion.choices[0]
        calls = _message_calls(choice.message, service)
        return Attempt(
            text=choice.message.content or "",
            model=completion.model,
            usage=_usage(completion.usage),
            finish_reason=_finish(choice.finish_reason, calls, service),
            service_s=service,
            tool_calls=calls,
            # Structured Outputs' refusal: content null, the model's words in message.refusal.
            refusal=choice.message.refusal,
        )

    async def open_stream(
        self, req: CallRequest, timeout_s: float
    ) -> AsyncIterator[str | ToolFragment | RefusalFragment | Attempt]:
        # The SDK's raw streaming response: the SDK builds and sends the request and raises its
        # typed status errors; each chunk is read as its JSON object (``_chunks``), not built into
        # a pydantic object (most of a streamed call's CPU, docs/BENCHMARKS.md). A field the
        # chunk lacks reads as None, as it does on the SDK's objects.
        opened = self._sdk.chat.completions.with_streaming_response.create(
            **self._args(req, timeout_s), stream=True, stream_options={"include_usage": True}
        )
        async with opened as response, contextlib.aclosing(_chunks(response)) as chunks:
            service = provider_service_time(response.headers)
            finish, model, usage = None, None, None
            calls = _StreamedCalls()
            refusal: list[str] | None = None  # delta.refusal pieces (the first is often "")
            async for chunk in chunks:
                model = chunk.get("model") or model
                if chunk.get("usage") is not None:
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    if content := delta.get("content"):
                        yield content
                    if (refused := delta.get("refusal")) is not None:
                        refusal = (refusal or []) + [refused]
                        if refused:
                            yield RefusalFragment(refused)
                    for piece in delta.get("tool_calls") or ():
                        fn = piece.get("function") or {}
                        index, call_id = piece.get("index"), piece.get("id")
                        for fragment in calls.add(index, call_id, fn.get("name"), fn.get("arguments")):
                            yield ToolFragment(fragment)
                    if (fc := delta.get("function_call")) is not None:  # legacy: one call, no id
                        for fragment in calls.add(LEGACY, None, fc.get("name"), fc.get("arguments")):
                            yield ToolFragment(fragment)
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
        if finish is None:
            raise AttemptError(
                ErrorKind.MALFORMED_RESPONSE, "stream ended before its final chunk", service_s=service
            )
        assembled = calls.assembled(service)
        yield Attempt(
            text="",
            model=model,
            usage=_usage(usage),
            finish_reason=_finish(finish, assembled, service),
            service_s=service,
            tool_calls=assembled,
            refusal="".join(refusal) if refusal is not None else None,
        )

    def classify(self, exc: BaseException, in_stream: bool) -> AttemptError:
        err = (
            classify_generated_sdk(openai, exc, in_stream, retry_hint)
            or classify_common(exc, in_stream)
            or unexpected_failure(exc)
        )
        if err.kind is ErrorKind.SERVER_ERROR and err.status and TOOLS_REFUSED.search(err.message):
            # A server that takes no tools says so with a 500: not its fault, and no retry helps.
            err.kind = ErrorKind.BAD_REQUEST
            err.message += " (the server refuses tool calling: a refusal, not a fault)"
        return err

    async def aclose(self) -> None:
        await self._sdk.close()


class OpenAICompatibleTransport(OpenAITransport):
    """vLLM, Ray Serve LLM, Ollama, Together, Groq...: the same protocol at another base_url.

    A self-hosted server often serves a model with a smaller window than the model has (llama.cpp
    divides its ``--ctx-size`` among its ``--parallel`` slots; vLLM has ``--max-model-len``), so
    the window the config declares may be wrong. Where the server says what it serves, the client
    reads it once, on its first call (``known_window``): vLLM's ``GET /v1/models`` lists each
    model's ``max_model_len``, a recent llama.cpp's its per-slot ``meta.n_ctx``; where the listing
    has neither (an older llama.cpp lists only the trained window, ``meta.n_ctx_train``), its
    ``GET /props`` is asked for the per-slot ``default_generation_settings.n_ctx``. A listing
    that fails or says nothing costs a call nothing: the window is then learned from a refusal."""

    kind = "openai_compatible"

    def __init__(self, name: str, cfg: ProviderConfig, endpoint: Endpoint) -> None:
        super().__init__(name, cfg, endpoint)
        # The listing, read once in the background from the first call on: no call waits for it.
        self._listing: asyncio.Task[dict[str, int]] | None = None

    def known_window(self, model: str) -> int | None:
        if self._listing is None:
            self._listing = asyncio.get_running_loop().create_task(self._read_windows())
            return None
        if not self._listing.done() or self._listing.cancelled():
            return None
        listed = self._listing.result()
        return listed.get(model) or listed.get("*")

    async def served_window(self, model: str) -> int | None:
        """The window the server reports for ``model``, reading its listing now if need be (for
        tests and tools; calls never wait for it)."""
        self.known_window(model)
        assert self._listing is not None
        await asyncio.shield(self._listing)
        return self.known_window(model)

    async def _read_windows(self) -> dict[str, int]:
        """Model -> served window, from the server's own listing (``*``: the one model a llama.cpp
        server serves, whatever it is called). Never raises: a server without the endpoints, or
        one that is down, simply says nothing."""
        windows: dict[str, int] = {}
        try:
            async with asyncio.timeout(LISTING_TIMEOUT_S):
                page = await self._sdk.models.list()
                llama: list[int] = []
                for m in page.data:
                    extra = m.model_extra or {}
                    if isinstance(extra.get("max_model_len"), int) and extra["max_model_len"] > 0:
                        windows[m.id] = extra["max_model_len"]
                    n_ctx = _llamacpp_slot_window(m.owned_by, extra)
                    if n_ctx is not None:
                        aliases = extra.get("aliases")
                        names = (
                            [m.id, *(a for a in aliases if isinstance(a, str))]
                            if isinstance(aliases, list)
                            else [m.id]
                        )
                        windows |= dict.fromkeys(names, n_ctx)
                        llama.append(n_ctx)
                if len(llama) == 1:  # one model, served whatever name a request gives
                    windows["*"] = llama[0]
                if windows:
                    return windows
                root = str(self._sdk.base_url).rstrip("/").removesuffix("/v1")
                async with httpx.AsyncClient(timeout=LISTING_TIMEOUT_S) as http:
                    headers = {"Authorization": f"Bearer {self._secret}"} if self._secret else {}
                    r = await http.get(root + "/props", headers=headers)
                if r.status_code == 200:
                    settings = r.json().get("default_generation_settings") or {}
                    n_ctx = settings.get("n_ctx")
                    if isinstance(n_ctx, int) and n_ctx > 0:
                        windows["*"] = n_ctx
        except Exception as exc:
            log.info(
                "%s: the server's context window could not be read (%s)",
                self.name,
                type(exc).__name__,
                extra={"event": "window_listing", "provider": self.name},
            )
        return windows

    async def aclose(self) -> None:
        if self._listing is not None and not self._listing.done():
            self._listing.cancel()
        await super().aclose()


def _llamacpp_slot_window(owned_by: Any, extra: Mapping[str, Any]) -> int | None:
    """A llama.cpp listing entry's per-slot window, ``meta.n_ctx`` (recent builds; older ones list
    only the trained window, ``meta.n_ctx_train``, which is never the one served)."""
    meta = extra.get("meta")
    if owned_by != "llamacpp" or not isinstance(meta, Mapping):
        return None
    n_ctx = meta.get("n_ctx")
    return n_ctx if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) and n_ctx > 0 else None


# The key of a legacy ``function_call`` among a stream's calls (real calls have indexes from 0).
LEGACY = -1


def _new_call_id() -> str:
    """An id for a call the server gave none (a legacy ``function_call``; some compatible
    servers' streams), in OpenAI's form."""
    return "call_" + uuid.uuid4().hex[:24]


def _unsendable(message: str) -> AttemptError:
    """A conversation no OpenAI request can carry: a fault upstream of this adapter, so refused
    as ours before anything is sent (saying what is wrong), never held against the provider."""
    return AttemptError(ErrorKind.INTERNAL, message)


def _message(i: int, m: ChatMessage) -> dict[str, Any]:
    """One turn as OpenAI's chat completions take it: an assistant turn with the calls it made
    (content null when it said nothing else, as OpenAI writes it), a tool turn answering one call
    by its id (OpenAI's tool messages carry no function name)."""
    if m.role == "tool":
        if not m.tool_call_id:
            raise _unsendable(f"messages[{i}]: a tool result without the tool_call_id it answers")
        return {"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content}
    if m.tool_calls:
        if m.role != "assistant":
            raise _unsendable(
                f"messages[{i}]: a {m.role} turn carrying tool calls (only assistant turns can)"
            )
        calls = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
        return {"role": "assistant", "content": m.content or None, "tool_calls": calls}
    if m.images:
        return {"role": m.role, "content": _content_parts(m)}
    return {"role": m.role, "content": m.content}


def _content_parts(m: ChatMessage) -> list[dict[str, Any]]:
    """A user turn with images as OpenAI's content parts: its text, then each ``image_url`` (an
    https URL or a data URL, as the client gave it; ``detail`` only when one was chosen)."""
    parts: list[dict[str, Any]] = [{"type": "text", "text": m.content}] if m.content else []
    for image in m.images:
        url: dict[str, Any] = {"url": image.url}
        if image.detail != "auto":
            url["detail"] = image.detail
        parts.append({"type": "image_url", "image_url": url})
    return parts


def _tool_args(tools: ToolSet) -> dict[str, Any]:
    """The request's tools in OpenAI's modern form (always: a client's legacy ``functions`` are
    the API layer's to answer the legacy way), its choice, and ``parallel_tool_calls: false``
    only when parallel calls are off (OpenAI's default is true, and it refuses the field
    without tools, which is never the case here)."""
    declared = []
    for t in tools.tools:
        fn: dict[str, Any] = {"name": t.name}
        if t.description is not None:
            fn["description"] = t.description
        fn["parameters"] = t.parameters
        if t.strict is not None:
            fn["strict"] = t.strict
        declared.append({"type": "function", "function": fn})
    choice = tools.choice
    if choice.mode == "function":
        if not choice.name:
            raise _unsendable("tool_choice: a named function choice without the function's name")
        tool_choice: Any = {"type": "function", "function": {"name": choice.name}}
    else:
        tool_choice = choice.mode
    args: dict[str, Any] = {"tools": declared, "tool_choice": tool_choice}
    if not tools.parallel:
        args["parallel_tool_calls"] = False
    return args


def _malformed(message: str, service: float | None) -> AttemptError:
    return AttemptError(ErrorKind.MALFORMED_RESPONSE, message, service_s=service)


def _message_calls(message: Any, service: float | None) -> list[ToolCall]:
    """The calls of a completion's message: its ``tool_calls`` (function calls; we offer no
    other kind), or a compatible server's legacy ``function_call`` (given an id). Arguments stay
    as the model wrote them."""
    calls: list[ToolCall] = []
    for k, call in enumerate(message.tool_calls or ()):
        fn = getattr(call, "function", None)
        if fn is None or not fn.name:
            raise _malformed(f"tool call {k} is not a named function call", service)
        calls.append(ToolCall(id=call.id or _new_call_id(), name=fn.name, arguments=fn.arguments or ""))
    legacy = message.function_call
    if legacy is not None:
        if calls or not legacy.name:
            raise _malformed("a legacy function_call beside tool calls, or without a name", service)
        calls.append(ToolCall(id=_new_call_id(), name=legacy.name, arguments=legacy.arguments or ""))
    return calls


def _finish(reason: str | None, calls: list[ToolCall], service: float | None) -> str:
    """Our finish reason. A model that called tools finished with ``tool_calls`` (some compatible
    servers say ``stop``); one cut short by its token limit keeps ``length``, its last call's
    arguments being unfinished. A finish that names calls none of which came is malformed."""
    finish = FINISH.get(reason or "", "other")
    if finish == "tool_calls" and not calls:
        raise _malformed(f"finish_reason {reason!r} without any tool call", service)
    if calls and finish == "stop":
        return "tool_calls"
    return finish


@dataclass
class _Pending:
    """A call being streamed: its id and name (once), its arguments' fragments in order."""

    id: str | None = None
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class _StreamedCalls:
    """A stream's tool calls, assembled by ``index`` from their fragments: OpenAI sends a call's
    id and name whole in its first fragment, then pieces of its arguments, and calls of one answer
    may interleave. Some compatible servers repeat the id (DeepSeek, Qwen) or the name in later
    fragments: a repeat is read once. A fragment without an index (some compatible servers) is the
    call its id opens, else the call being written."""

    def __init__(self) -> None:
        self._calls: dict[int, _Pending] = {}
        self._last: int | None = None

    def add(self, index: int | None, id: str | None, name: str | None, arguments: str | None) -> list[str]:
        """Take a fragment; return the generated text it carries (a name, an arguments piece)."""
        if index is None:
            known = id is not None and any(c.id == id for c in self._calls.values())
            opens = id is not None and not known
            index = max(self._calls, default=-1) + 1 if opens or self._last is None else self._last
        call = self._calls.setdefault(index, _Pending())
        self._last = index
        if id and call.id is None:
            call.id = id
        out = []
        if name and name != call.name:
            call.name += name
            out.append(name)
        if arguments:
            call.arguments.append(arguments)
            out.append(arguments)
        return out

    def assembled(self, service: float | None) -> list[ToolCall]:
        """The whole calls, in index order; a call that never got its name is malformed."""
        calls = []
        for index in sorted(self._calls):
            c = self._calls[index]
            if not c.name:
                raise _malformed(f"streamed tool call {index} never named its function", service)
            calls.append(ToolCall(id=c.id or _new_call_id(), name=c.name, arguments="".join(c.arguments)))
        return calls


def _usage(u: Any) -> Usage:
    """A completion's usage (the SDK's object), or a streamed chunk's (its JSON object)."""
    if u is None:
        return Usage()
    if isinstance(u, Mapping):
        details = u.get("prompt_tokens_details")
        cached = (details.get("cached_tokens") if details is not None else None) or 0
        return Usage(
            input_tokens=u.get("prompt_tokens") or 0,
            output_tokens=u.get("completion_tokens") or 0,
            cached_tokens=cached,
        )
    details = getattr(u, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) or 0
    return Usage(
        input_tokens=u.prompt_tokens or 0, output_tokens=u.completion_tokens or 0, cached_tokens=cached
    )


# What the SDK's stream reports as a broken connection while reading (``APIConnectionError``).
CONNECTION_ERRORS = (httpx2.RequestError, ssl.SSLError, anyio.EndOfStream)
# How long the rest of a body after ``data: [DONE]`` is read, so that its connection goes back to
# the pool (the SDK's own stream waits as long, then closes the connection).
DRAIN_S = 0.1


async def _chunks(response: Any) -> AsyncGenerator[Any, None]:
    """The chunks of a raw streamed chat completion as their JSON objects, read as the SDK's own
    stream (``openai.AsyncStream``) reads them: up to ``data: [DONE]`` (then the rest of an
    HTTP/1.1 body drained, briefly); an object with an ``error`` raises ``openai.APIError`` with
    the SDK's message and body (a failure after the 200); a timeout or a broken connection while
    reading raises ``APITimeoutError`` or ``APIConnectionError``; data that is not JSON raises
    ``json.JSONDecodeError``. (The SDK's special case of the Assistants API's ``thread.*`` events
    is not for chat completions.)"""
    request = response.http_request
    body = aiter(response.http_response.aiter_bytes())
    done = False
    try:
        async with contextlib.aclosing(sse_events(body)) as events:
            async for _, data in events:
                if data.startswith("[DONE]"):
                    done = True
                    break
                chunk = json.loads(data)
                if isinstance(chunk, Mapping) and chunk.get("error"):
                    raise _stream_error(chunk["error"], request)
                if not _is_chunk(chunk):
                    raise AttemptError(
                        ErrorKind.MALFORMED_RESPONSE, "a streamed event that is not a chat completion chunk"
                    )
                yield chunk
        if done and response.http_version == "HTTP/1.1":
            with contextlib.suppress(TimeoutError, *CONNECTION_ERRORS):
                async with asyncio.timeout(DRAIN_S):
                    async for _ in body:
                        pass
    except httpx2.TimeoutException as err:
        raise openai.APITimeoutError(request=request) from err
    except CONNECTION_ERRORS as err:
        raise openai.APIConnectionError(request=request) from err


def _is_chunk(chunk: Any) -> bool:
    """Whether a streamed event has a chunk's shape as far as it is read: an object whose
    ``choices``, when present, are objects, each ``delta`` an object when present. A provider's
    event of another shape is its malformed response, not a failure of ours."""
    if not isinstance(chunk, Mapping):
        return False
    choices = chunk.get("choices")
    if choices is None:
        return True
    return isinstance(choices, list) and all(
        isinstance(c, Mapping) and isinstance(c.get("delta") or {}, Mapping) for c in choices
    )


def _stream_error(error: Any, request: Any) -> openai.APIError:
    """What the SDK raises for a chunk carrying an ``error``: its message, or the SDK's words."""
    message = error.get("message") if isinstance(error, Mapping) else None
    if not message or not isinstance(message, str):
        message = "An error occurred during streaming"
    return openai.APIError(message=message, request=request, body=error)
