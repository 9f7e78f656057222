"""Provider-call spans after the OpenTelemetry GenAI semantic conventions.

Prompt and completion text are recorded only when content capture is switched on; API keys and
auth headers never are (the adapters hand over no key, and nothing here reads headers).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from moa.types import CallRequest, CallResult, ChatMessage, error_text
from moa_observability.tracing import tracer

# gen_ai.provider.name well-known values; an OpenAI-compatible endpoint reports its config name.
PROVIDER_NAMES = {"openai": "openai", "anthropic": "anthropic", "gemini": "gcp.gemini"}
MAX_CAPTURED_CHARS = 16_000


def start_call_span(
    req: CallRequest, provider_kind: str, base_url: str | None, *, stream: bool, capture_content: bool
) -> trace.Span:
    """A CLIENT span ``chat {model}``, child of the current context (not made current: it is ended
    from inside an async generator, where attaching would outlive the step)."""
    attrs: dict[str, str | int | float | bool] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": PROVIDER_NAMES.get(provider_kind, req.provider),
        "gen_ai.request.model": req.model,
        "gen_ai.request.stream": stream,
        "moa.provider": req.provider,
    }
    p = req.params
    optional = {
        "gen_ai.request.temperature": p.temperature,
        "gen_ai.request.max_tokens": p.max_tokens,
        "gen_ai.request.top_p": p.top_p,
        "gen_ai.request.seed": p.seed,
    }
    attrs |= {k: v for k, v in optional.items() if v is not None}
    if req.role:
        attrs["moa.role"] = req.role
    if base_url:
        parts = urlsplit(base_url)
        if parts.hostname:
            attrs["server.address"] = parts.hostname
            attrs["server.port"] = parts.port or (443 if parts.scheme == "https" else 80)
    if capture_content:
        attrs["gen_ai.input.messages"] = _messages_json(req.messages)
    return tracer().start_span(f"chat {req.model}", kind=SpanKind.CLIENT, attributes=attrs)


def end_call_span(span: trace.Span, result: CallResult | None, *, capture_content: bool) -> None:
    """Record the outcome; ``None`` means the call was cancelled."""
    if result is None:
        span.set_attribute("error.type", "cancelled")
        span.set_status(Status(StatusCode.ERROR, "cancelled"))
        span.end()
        return
    if result.model:
        span.set_attribute("gen_ai.response.model", result.model)
    span.set_attribute("gen_ai.usage.input_tokens", result.usage.input_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", result.usage.output_tokens)
    if result.usage.cached_tokens:
        span.set_attribute("gen_ai.usage.cache_read.input_tokens", result.usage.cached_tokens)
    if result.finish_reason:
        span.set_attribute("gen_ai.response.finish_reasons", [result.finish_reason])
    if result.ttft_s is not None:
        span.set_attribute("gen_ai.response.time_to_first_chunk", result.ttft_s)
    span.set_attribute("moa.attempts", result.attempts)
    if result.provider_service_s is not None:
        # The provider's own account of its time: latency beyond it is the network's and ours.
        span.set_attribute("moa.provider_service_s", result.provider_service_s)
    if result.adjustments:
        span.set_attribute("moa.adjustments", result.adjustments)
    if result.tool_calls:
        # The functions it called (the request's own declarations); their arguments are content,
        # recorded only with capture_content.
        span.set_attribute("moa.tool_calls", [c.name for c in result.tool_calls])
    span.set_attribute("moa.cost_usd", result.cost_usd)
    if result.error is not None:
        span.set_attribute("error.type", result.error.kind.value)
        # The provider's own words (redacted of keys by the adapter): the kind alone cannot say
        # "request (1346 tokens) exceeds the available context size (1024 tokens)".
        why = error_text(result.error.message)
        span.set_status(Status(StatusCode.ERROR, f"{result.error.kind.value}: {why}" if why else None))
    elif capture_content:
        answer = ChatMessage(role="assistant", content=result.text, tool_calls=tuple(result.tool_calls))
        span.set_attribute("gen_ai.output.messages", _messages_json([answer]))
    span.end()


def _parts(m: ChatMessage) -> list[dict[str, Any]]:
    """A message's parts as the GenAI conventions write them: its text, its tool calls, or the
    tool result it carries."""
    if m.role == "tool":
        return [{"type": "tool_call_response", "id": m.tool_call_id, "response": m.content}]
    parts: list[dict[str, Any]] = [{"type": "text", "content": m.content}] if m.content else []
    parts += [
        {"type": "tool_call", "id": c.id, "name": c.name, "arguments": c.arguments} for c in m.tool_calls
    ]
    return parts or [{"type": "text", "content": ""}]


def _messages_json(messages: Sequence[ChatMessage]) -> str:
    text = json.dumps([{"role": m.role, "parts": _parts(m)} for m in messages])
    return text[:MAX_CAPTURED_CHARS]
