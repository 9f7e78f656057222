"""Anthropic Messages API through ``anthropic.AsyncAnthropic``."""

from __future__ import annotations

import inspect
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anthropic
from anthropic.types import Message

from moa.providers.transport import Attempt, AttemptError, SDKTransport
from moa.providers.wire import (
    classify_common,
    classify_generated_sdk,
    header_retry_hint,
    parse_reset_time,
    provider_service_time,
    refused_param,
    unexpected_failure,
)
from moa.types import CallRequest, ErrorKind, GenerationParams, Usage

# The Messages API requires max_tokens; used when the request does not say.
DEFAULT_MAX_TOKENS = 1024
FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "refusal": "content_filter"}
# Anthropic's temperature range; ours (OpenAI's) goes to 2.
MAX_TEMPERATURE = 1.0
# How the API refuses a parameter: "`temperature` is deprecated for this model." (models that
# dropped it), or "seed: Extra inputs are not permitted." (a field it does not know).
REFUSED = re.compile(r"`(\w+)` is (?:deprecated|not supported)|(\w+): Extra inputs are not permitted")
NAMES = {"stop_sequences": "stop"}
# Anthropic's Rate limits page: a 429 carries ``retry-after`` (seconds), and every response the
# ``anthropic-ratelimit-*-remaining`` / ``-reset`` pair of each limit, the reset in RFC 3339.
RATE_LIMITS = {
    f"anthropic-ratelimit-{limit}-remaining": f"anthropic-ratelimit-{limit}-reset"
    for limit in ("requests", "tokens", "input-tokens", "output-tokens")
}


def retry_hint(headers: Mapping[str, str]) -> float | None:
    """Anthropic's wait: its ``retry-after``, else the reset of the spent limit."""
    return header_retry_hint(headers, RATE_LIMITS, parse_reset_time)


# OpenAI parameters the Messages API has no counterpart for: dropped, each with a note on the call.
_NO_SUCH_PARAM = {
    "frequency_penalty": "the Anthropic API has no frequency penalty",
    "presence_penalty": "the Anthropic API has no presence penalty",
    "logit_bias": "the Anthropic API has no logit bias (and other token ids)",
    "reasoning_effort": "Anthropic models take a thinking token budget instead, which this service "
    "does not set",
}


class AnthropicTransport(SDKTransport):
    kind = "anthropic"

    def _make_sdk(self) -> Any:
        cfg, endpoint = self.cfg, self.endpoint
        return anthropic.AsyncAnthropic(
            api_key=self._secret,
            base_url=endpoint.base_url,
            max_retries=0,
            timeout=anthropic.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s),
            # The SDK opens its own anthropic.messages.create CLIENT span with gen_ai.* attributes
            # for each call; beside ours (moa_observability.genai) every call would count twice in
            # GenAI views. Ours carries what theirs does and is the one span per model call.
            open_telemetry=False,
        )

    def _args(self, req: CallRequest, timeout_s: float) -> dict[str, Any]:
        p = req.params
        system = "\n\n".join(m.content for m in req.messages if m.role == "system")
        turns: list[dict[str, str]] = []
        for m in req.messages:
            if m.role == "system":
                continue
            if turns and turns[-1]["role"] == m.role:  # the API wants alternating turns
                turns[-1]["content"] += "\n\n" + m.content
            else:
                turns.append({"role": m.role, "content": m.content})
        args: dict[str, Any] = {
            "model": req.model,
            "messages": turns,
            "max_tokens": p.max_tokens or DEFAULT_MAX_TOKENS,
            # What is left of the call's deadline, with the configured connect timeout: a bare
            # number here would replace the client's Timeout, connect_timeout_s included.
            "timeout": anthropic.Timeout(timeout_s, connect=min(self.cfg.connect_timeout_s, timeout_s)),
        }
        if system:
            args["system"] = system
        # anthropic 2.x no longer models temperature or top_p in messages.create() (it raises
        # TypeError on them); the API still takes them, so they go as extra body fields.
        sampling = {"temperature": p.temperature, "top_p": p.top_p}
        extra = {k: v for k, v in sampling.items() if v is not None}
        if extra:
            args["extra_body"] = extra
        if p.stop:
            args["stop_sequences"] = list(p.stop)
        return args

    def adapt(self, model: str, params: GenerationParams) -> tuple[GenerationParams, list[str]]:
        update: dict[str, object] = {}
        notes: list[str] = []
        if params.seed is not None:
            update["seed"] = None
            notes.append("seed dropped: the Anthropic API has no seed")
        for name, value in _NO_SUCH_PARAM.items():
            if getattr(params, name) is not None:
                update[name] = None
                notes.append(f"{name} dropped: {value}")
        t = params.temperature
        if t is not None and t > MAX_TEMPERATURE:
            update["temperature"] = MAX_TEMPERATURE
            notes.append(f"temperature {t:g} clamped to {MAX_TEMPERATURE:.1f} (Anthropic's range is 0-1)")
        if t is not None and params.top_p is not None:
            # Claude's current models refuse the pair ("cannot both be specified"); the temperature
            # is what callers (and our plans) set on purpose.
            update["top_p"] = None
            notes.append(f"top_p dropped: {model} takes temperature or top_p, not both")
        return (params.model_copy(update=update) if update else params), notes

    def refused_param(self, message: str) -> str | None:
        return refused_param(message, REFUSED, NAMES)

    async def send(self, req: CallRequest, timeout_s: float) -> Attempt:
        raw = await self._sdk.messages.with_raw_response.create(**self._args(req, timeout_s))
        service = provider_service_time(raw.headers)
        message = raw.parse()
        if inspect.isawaitable(message):  # the async client's parse() is a coroutine
            message = await message
        if not isinstance(message, Message):
            raise AttemptError(ErrorKind.MALFORMED_RESPONSE, "response is not a message", service_s=service)
        text = "".join(block.text for block in message.content if block.type == "text")
        return Attempt(
            text=text,
            model=message.model,
            usage=_usage(message.usage),
            finish_reason=FINISH.get(message.stop_reason or "", "other"),
            service_s=service,
        )

    async def open_stream(self, req: CallRequest, timeout_s: float) -> AsyncIterator[str | Attempt]:
        stream = await self._sdk.messages.create(**self._args(req, timeout_s), stream=True)
        service = provider_service_time(stream.response.headers)
        model, usage, output_tokens, stop, finished = None, None, 0, None, False
        try:
            async for event in stream:
                if event.type == "message_start":
                    model, usage = event.message.model, event.message.usage
                elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                    yield event.delta.text
                elif event.type == "message_delta":
                    stop = event.delta.stop_reason
                    output_tokens = event.usage.output_tokens
                elif event.type == "message_stop":
                    finished = True
        finally:
            await stream.close()
        if not finished:
            raise AttemptError(
                ErrorKind.MALFORMED_RESPONSE, "stream ended before message_stop", service_s=service
            )
        u = _usage(usage)
        u = u.model_copy(update={"output_tokens": output_tokens or u.output_tokens})
        yield Attempt(
            text="", model=model, usage=u, finish_reason=FINISH.get(stop or "", "other"), service_s=service
        )

    def classify(self, exc: BaseException, in_stream: bool) -> AttemptError:
        if isinstance(exc, AssertionError):  # the SDK asserts on a non-JSON stream body
            return AttemptError(ErrorKind.MALFORMED_RESPONSE, "response failed validation")
        return (
            classify_generated_sdk(anthropic, exc, in_stream, retry_hint)
            or classify_common(exc, in_stream)
            or unexpected_failure(exc)
        )

    async def aclose(self) -> None:
        await self._sdk.close()


def _usage(u: Any) -> Usage:
    """Anthropic's input_tokens exclude cache reads and writes; ours count every input token."""
    if u is None:
        return Usage()
    cached = getattr(u, "cache_read_input_tokens", None) or 0
    created = getattr(u, "cache_creation_input_tokens", None) or 0
    return Usage(
        input_tokens=(u.input_tokens or 0) + cached + created,
        output_tokens=u.output_tokens or 0,
        cached_tokens=cached,
    )
