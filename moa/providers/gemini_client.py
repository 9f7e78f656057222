"""Gemini through the ``google-genai`` SDK (the maintained successor of ``google-generativeai``)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

from google import genai
from google.genai import errors, types

from moa.providers.transport import Attempt, AttemptError, SDKTransport
from moa.providers.wire import (
    classify_common,
    parse_duration,
    provider_service_time,
    refused_param,
    status_error,
    unexpected_failure,
)
from moa.types import CallRequest, ErrorKind, GenerationParams, Usage

FINISH = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
}
# The Gemini API takes at most this many stop sequences.
MAX_STOP = 5
# How the API refuses a field: 'Invalid JSON payload received. Unknown name "seed" at
# 'generation_config': Cannot find field.', or names a feature a model lacks ("... is not enabled
# for models/...").
REFUSED = re.compile(r'Unknown name "(\w+)"|(\w+) is not (?:enabled|supported) for')
NAMES = {
    "topP": "top_p",
    "stopSequences": "stop",
    "stop_sequences": "stop",
    "presencePenalty": "presence_penalty",
    "frequencyPenalty": "frequency_penalty",
}
# OpenAI parameters generateContent has no counterpart for: dropped, each with a note on the call.
_NO_SUCH_PARAM = {
    "logit_bias": "the Gemini API has no logit bias (and other token ids)",
    "reasoning_effort": "Gemini models take a thinking token budget instead, which this service does not set",
}
# The API refuses a wrong key with 400 INVALID_ARGUMENT, not 401; its ErrorInfo reason says why.
AUTH_REASONS = frozenset({"API_KEY_INVALID"})
# The wait a refusal asks for: Gemini sends no Retry-After header; it puts a ``google.rpc.RetryInfo``
# in the error body's details, its ``retryDelay`` a protobuf duration ("53s").
RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"


class GeminiTransport(SDKTransport):
    kind = "gemini"

    def _make_sdk(self) -> Any:
        cfg, endpoint = self.cfg, self.endpoint
        return genai.Client(
            # The SDK refuses to build without a key; with none, calls fail as auth before sending.
            api_key=self._secret or "unset",
            http_options=types.HttpOptions(
                base_url=endpoint.base_url,
                api_version="v1beta",
                timeout=int(cfg.timeout_s * 1000),
                # One attempt: without this the async transport retries connection errors itself.
                retry_options=types.HttpRetryOptions(attempts=1),
            ),
        )

    def _args(self, req: CallRequest, timeout_s: float) -> dict[str, Any]:
        p = req.params
        system = "\n\n".join(m.content for m in req.messages if m.role == "system")
        contents = [
            types.Content(
                role="model" if m.role == "assistant" else "user", parts=[types.Part(text=m.content)]
            )
            for m in req.messages
            if m.role != "system"
        ]
        config = types.GenerateContentConfig(
            system_instruction=system or None,
            temperature=p.temperature,
            top_p=p.top_p,
            max_output_tokens=p.max_tokens,
            seed=p.seed,
            stop_sequences=list(p.stop) if p.stop else None,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            http_options=types.HttpOptions(
                timeout=max(int(timeout_s * 1000), 1), retry_options=types.HttpRetryOptions(attempts=1)
            ),
        )
        return {"model": req.model, "contents": contents, "config": config}

    def adapt(self, model: str, params: GenerationParams) -> tuple[GenerationParams, list[str]]:
        update: dict[str, object] = {}
        notes: list[str] = []
        stop = params.stop
        if stop and len(stop) > MAX_STOP:
            update["stop"] = stop[:MAX_STOP]
            notes.append(f"stop: kept the first {MAX_STOP} of {len(stop)} sequences (the Gemini API's limit)")
        for name, why in _NO_SUCH_PARAM.items():
            if getattr(params, name) is not None:
                update[name] = None
                notes.append(f"{name} dropped: {why}")
        return (params.model_copy(update=update) if update else params), notes

    def refused_param(self, message: str) -> str | None:
        return refused_param(message, REFUSED, NAMES)

    async def send(self, req: CallRequest, timeout_s: float) -> Attempt:
        response = await self._sdk.aio.models.generate_content(**self._args(req, timeout_s))
        service = _service(response)
        if not response.candidates:
            raise AttemptError(ErrorKind.MALFORMED_RESPONSE, "response has no candidates", service_s=service)
        candidate = response.candidates[0]
        return Attempt(
            text=_text(response),
            model=response.model_version,
            usage=_usage(response.usage_metadata),
            finish_reason=_finish(candidate.finish_reason),
            service_s=service,
        )

    async def open_stream(self, req: CallRequest, timeout_s: float) -> AsyncIterator[str | Attempt]:
        stream = await self._sdk.aio.models.generate_content_stream(**self._args(req, timeout_s))
        service, finish, model, usage = None, None, None, None
        async for chunk in stream:
            service = service if service is not None else _service(chunk)
            model = chunk.model_version or model
            usage = chunk.usage_metadata or usage
            text = _text(chunk)
            if text:
                yield text
            if chunk.candidates and chunk.candidates[0].finish_reason:
                finish = chunk.candidates[0].finish_reason
        if finish is None:
            raise AttemptError(
                ErrorKind.MALFORMED_RESPONSE, "stream ended without a finish reason", service_s=service
            )
        yield Attempt(
            text="", model=model, usage=_usage(usage), finish_reason=_finish(finish), service_s=service
        )

    def classify(self, exc: BaseException, in_stream: bool) -> AttemptError:
        if isinstance(exc, errors.UnknownApiResponseError):
            return AttemptError(ErrorKind.MALFORMED_RESPONSE, "unparseable response")
        if isinstance(exc, errors.APIError):
            headers: Mapping[str, str] | None = getattr(exc.response, "headers", None)
            message = f"{exc.code}: {exc.message or exc.status}"
            err = status_error(exc.code, message, headers, retry_delay(exc.details))
            if _reasons(exc.details) & AUTH_REASONS:
                err.kind = ErrorKind.AUTH
            return err
        return classify_common(exc, in_stream) or unexpected_failure(exc)

    async def aclose(self) -> None:
        await self._sdk.aio.aclose()


def _details(body: Any) -> list[dict[str, Any]]:
    """The ``details`` of an error body (AIP-193), each a typed ``google.rpc`` message."""
    error = body.get("error", body) if isinstance(body, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    return [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []


def _reasons(body: Any) -> set[str]:
    """The ``google.rpc.ErrorInfo`` reasons in an error body's details."""
    return {d["reason"] for d in _details(body) if isinstance(d.get("reason"), str)}


def retry_delay(body: Any) -> float | None:
    """The seconds a ``google.rpc.RetryInfo`` in the error body asks to wait, if it has one."""
    for d in _details(body):
        if d.get("@type") == RETRY_INFO:
            delay = d.get("retryDelay")
            return parse_duration(delay) if isinstance(delay, str) else None
    return None


def _text(response: types.GenerateContentResponse) -> str:
    if not response.candidates or not response.candidates[0].content:
        return ""
    return "".join(part.text or "" for part in response.candidates[0].content.parts or [] if not part.thought)


def _finish(reason: Any) -> str:
    name = getattr(reason, "name", None) or str(reason or "")
    return FINISH.get(name, "other")


def _service(response: types.GenerateContentResponse) -> float | None:
    http = response.sdk_http_response
    return provider_service_time(http.headers) if http is not None else None


def _usage(u: types.GenerateContentResponseUsageMetadata | None) -> Usage:
    if u is None:
        return Usage()
    return Usage(
        input_tokens=u.prompt_token_count or 0,
        output_tokens=u.candidates_token_count or 0,
        cached_tokens=u.cached_content_token_count or 0,
    )
