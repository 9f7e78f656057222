"""The bodies and headers of a finished answer, as OpenAI's API shapes them, plus the opt-in
``moa`` detail and this service's ``x-moa-*`` headers."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from moa.api.schemas import ChatCompletionRequest
from moa.cache import CacheTicket
from moa.result import Choice, MoAResult
from moa.types import ToolCall, Usage


def finish_reason(reason: str | None, legacy: bool = False) -> str:
    """OpenAI's finish reason for ours (``function_call`` for a legacy ``functions`` request)."""
    if reason == "tool_calls":
        return "function_call" if legacy else "tool_calls"
    return reason if reason in ("stop", "length", "content_filter") else "stop"


def tool_calls(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """``message.tool_calls`` as OpenAI shapes them."""
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


def message(req: ChatCompletionRequest, result: MoAResult | Choice) -> dict[str, Any]:
    """The answer's ``message``: its text (null when it is only calls, as OpenAI sends it) and its
    calls, as ``tool_calls``, or as the legacy ``function_call`` when the request gave ``functions``."""
    body: dict[str, Any] = {"role": "assistant", "content": result.text, "refusal": None}
    if result.refusal is not None:  # the model refused the requested format: content null
        return body | {"content": None, "refusal": result.refusal}
    if not result.tool_calls:
        return body
    body["content"] = result.text or None
    if req.functions is not None:
        call = result.tool_calls[0]
        body["function_call"] = {"name": call.name, "arguments": call.arguments}
    else:
        body["tool_calls"] = tool_calls(result.tool_calls)
    return body


def usage(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def moa_detail(result: MoAResult) -> dict[str, Any]:
    """The opt-in per-call breakdown (``moa: {"detail": true}``)."""
    return {
        "preset": result.preset,
        "aggregation": result.plan.aggregation,
        "decision": result.decision.model_dump(mode="json"),
        "answered_by": f"{result.provider}/{result.model}",
        "fallback": result.fallback,
        "fallback_reason": result.fallback_reason,
        "answer_source": result.answer_source,
        "notes": result.notes,
        "cache": result.cache.model_dump(mode="json"),
        "tool_vote": result.tool_vote.model_dump(mode="json") if result.tool_vote else None,
        "document_vote": result.document_vote.model_dump(mode="json") if result.document_vote else None,
        # With n > 1: who wrote each answer, and how (``calls`` carry their ``choice``).
        "choices": [
            {
                "index": c.index,
                "answered_by": f"{c.provider}/{c.model}",
                "fallback": c.fallback,
                "fallback_reason": c.fallback_reason,
                "answer_source": c.answer_source,
            }
            for c in result.choices
        ],
        "calls": [c.model_dump(mode="json") for c in result.calls],
        "totals": {
            "calls": len(result.calls),
            "cost_usd": result.cost_usd,
            "wall_time_s": result.wall_time_s,
            "critical_path_s": result.critical_path_s,
            "provider_critical_path_s": result.provider_critical_path_s,
            "stragglers_cancelled": result.stragglers_cancelled,
            # Aggregators that took over an answer another one had started streaming.
            "aggregator_switches": sum(c.took_over for c in result.calls),
            "staircase_steps": sum(c.staircase_step is not None for c in result.calls),
        },
    }


def completion_body(req: ChatCompletionRequest, result: MoAResult) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": f"chatcmpl-moa-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": answered_model(req.model, result.preset),
        "system_fingerprint": None,
        # One per answer (``n``), each with its own index and finish reason.
        "choices": [
            {
                "index": choice.index,
                "message": message(req, choice),
                "logprobs": None,
                "finish_reason": finish_reason(choice.finish_reason, req.functions is not None),
            }
            for choice in result.answers()
        ],
        "usage": usage(result.usage),
    }
    if req.moa.detail:
        body["moa"] = moa_detail(result)
    return body


def answered_model(requested: str, ran: str | None) -> str:
    """The response's ``model``: what ``auto`` resolved to (the preset that ran), as OpenAI
    answers with the resolved model; any other request's own ``model``."""
    return ran if requested == "auto" and ran else requested


def preset_header(ran: str | None) -> dict[str, str]:
    """``x-moa-preset``: the preset (or ``provider/model``) that answered."""
    return {"x-moa-preset": ran} if ran else {}


def cache_header(ticket: CacheTicket | None) -> dict[str, str]:
    """``x-moa-cache``: hit-exact, hit-semantic, miss, or bypass (not read: the request said so,
    a fresh sample was asked for, or the cache is off)."""
    return {"x-moa-cache": ticket.outcome.status if ticket is not None else "bypass"}


def answer_header(result: MoAResult) -> dict[str, str]:
    """``x-moa-answer-source``: aggregator, fallback, or proposal (every aggregator failed and a
    proposal answered unaggregated). A streamed response's headers leave before the answer is
    known: there it is only in ``moa.detail``."""
    return {"x-moa-answer-source": result.answer_source}


def overhead_ms(result: MoAResult, since: float) -> float:
    """What the service itself added to a request, in milliseconds: its wall time from when the
    route received it (``since``, a ``time.monotonic()`` reading) to now, minus the time it
    waited on its model calls' critical path (``MoAResult.critical_path_s``). A cached answer
    waited on no call: all of its time is the service's."""
    return max((time.monotonic() - since - result.critical_path_s) * 1000, 0.0)


def overhead_header(result: MoAResult, since: float) -> dict[str, str]:
    """``x-moa-overhead-ms``: ``overhead_ms``, as gateways report theirs, on every answer that is
    not streamed (a stream's headers leave before its answer: its overhead is in the
    ``moa_request_overhead`` histogram only)."""
    return {"x-moa-overhead-ms": f"{overhead_ms(result, since):.1f}"}


def cost_header(result: MoAResult) -> dict[str, str]:
    """``x-moa-cost-usd``: what the request's calls cost, in US dollars, when it was answered (a
    call it cut may be charged a little more once its provider says what it consumed). It is the
    caller's own spend, so every caller gets it, with or without ``moa.detail``; ``moa batch``
    holds its budget with it."""
    return {"x-moa-cost-usd": f"{result.cost_usd:.8f}"}
