"""OpenAI Chat Completions through ``openai.AsyncOpenAI``; also any OpenAI-compatible endpoint."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

import openai
from openai.types.chat import ChatCompletion

from moa.providers.base import (
    Attempt,
    AttemptError,
    ProviderClient,
    classify_common,
    classify_generated_sdk,
    header_retry_hint,
    parse_duration,
    provider_service_time,
    refused_param,
    unexpected_failure,
)
from moa.types import CallRequest, ErrorKind, GenerationParams, Usage

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


class OpenAIClient(ProviderClient):
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

    def _adapt(self, model: str, params: GenerationParams) -> tuple[GenerationParams, list[str]]:
        stop = params.stop
        if self.kind == "openai" and stop and len(stop) > MAX_STOP:
            note = f"stop: kept the first {MAX_STOP} of {len(stop)} sequences (the OpenAI API's limit)"
            return params.model_copy(update={"stop": stop[:MAX_STOP]}), [note]
        return params, []

    def _refused_param(self, message: str) -> str | None:
        return refused_param(message, REFUSED, {})

    async def _complete_once(self, req: CallRequest, timeout_s: float) -> Attempt:
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

    async def _stream_once(self, req: CallRequest, timeout_s: float) -> AsyncIterator[str | Attempt]:
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

    def _classify(self, exc: BaseException, in_stream: bool) -> AttemptError:
        return (
            classify_generated_sdk(openai, exc, in_stream, retry_hint)
            or classify_common(exc, in_stream)
            or unexpected_failure(exc)
        )

    async def aclose(self) -> None:
        await self._sdk.close()


class OpenAICompatibleClient(OpenAIClient):
    """vLLM, Ray Serve LLM, Ollama, Together, Groq...: the same protocol at another base_url."""

    kind = "openai_compatible"


def _usage(u: Any) -> Usage:
    if u is None:
        return Usage()
    details = getattr(u, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) or 0
    return Usage(
        input_tokens=u.prompt_tokens or 0, output_tokens=u.completion_tokens or 0, cached_tokens=cached
    )
