"""OpenAI Chat Completions through ``openai.AsyncOpenAI``; also any OpenAI-compatible endpoint."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import openai
from openai.types.chat import ChatCompletion

from moa.config import Endpoint, ProviderConfig
from moa.providers.transport import Attempt, AttemptError, SDKTransport
from moa.providers.wire import (
    classify_common,
    classify_generated_sdk,
    header_retry_hint,
    parse_duration,
    provider_service_time,
    refused_param,
    unexpected_failure,
)
from moa.types import CallRequest, ErrorKind, GenerationParams, Usage

log = logging.getLogger("moa.providers")
# How long the one-off read of a server's model listing may take (it never delays a call twice).
LISTING_TIMEOUT_S = 3.0
FINISH = {"stop": "stop", "length": "length", "content_filter": "content_filter"}
# OpenAI's API takes at most this many stop sequences.
MAX_STOP = 4
# How OpenAI refuses a parameter: "Unsupported parameter: 'temperature' is not supported with this
# model." or "Unsupported value: 'temperature' does not support 0.5 with this model. Only the
# default (1) value is supported." (reasoning models); compatible servers may not know a field
# ("Unrecognized request argument supplied: seed").
REFUSED = re.compile(
    r"Unsupported (?:parameter|value): '(\w+)'|Unrecognized request argument supplied: (\w+)"
)

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
        )

    def _args(self, req: CallRequest, timeout_s: float) -> dict[str, Any]:
        p = req.params
        args: dict[str, Any] = {
            "model": req.model,
            "messages": [{"role": m.role, "content": m.content} for m in req.messages],
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
        return Attempt(
            text=choice.message.content or "",
            model=completion.model,
            usage=_usage(completion.usage),
            finish_reason=FINISH.get(choice.finish_reason or "", "other"),
            service_s=service,
        )

    async def open_stream(self, req: CallRequest, timeout_s: float) -> AsyncIterator[str | Attempt]:
        stream = await self._sdk.chat.completions.create(
            **self._args(req, timeout_s), stream=True, stream_options={"include_usage": True}
        )
        service = provider_service_time(stream.response.headers)
        finish, model, usage = None, None, None
        try:
            async for chunk in stream:
                model = chunk.model or model
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    if choice.delta.content:
                        yield choice.delta.content
                    if choice.finish_reason:
                        finish = choice.finish_reason
        finally:
            await stream.close()
        if finish is None:
            raise AttemptError(
                ErrorKind.MALFORMED_RESPONSE, "stream ended before its final chunk", service_s=service
            )
        yield Attempt(
            text="",
            model=model,
            usage=_usage(usage),
            finish_reason=FINISH.get(finish, "other"),
            service_s=service,
        )

    def classify(self, exc: BaseException, in_stream: bool) -> AttemptError:
        return (
            classify_generated_sdk(openai, exc, in_stream, retry_hint)
            or classify_common(exc, in_stream)
            or unexpected_failure(exc)
        )

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


def _usage(u: Any) -> Usage:
    if u is None:
        return Usage()
    details = getattr(u, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) or 0
    return Usage(
        input_tokens=u.prompt_tokens or 0, output_tokens=u.completion_tokens or 0, cached_tokens=cached
    )
