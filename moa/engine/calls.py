"""Small pieces shared by every stage that calls a model: parameter merging, reference budgets,
and calling through a transport that might raise instead of failing cleanly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from moa.config import MoAConfig
from moa.engine.caller import ModelCaller
from moa.engine.plan import ModelRef, ProposerSpec
from moa.engine.prompts import trim_references
from moa.tokens import approx_message_tokens, approx_tokens
from moa.types import (
    CallError,
    CallRequest,
    CallResult,
    ChatMessage,
    ErrorKind,
    GenerationParams,
    StreamEvent,
    TextDelta,
    Usage,
)

# How long the transport may hold the text of a call nobody reads as it comes (a proposer's, an
# aggregator's whose client does not stream): streamed only so that a cut call is billed for
# what it wrote, in a few batches rather than a message per token (CallRequest.batch_s). What a
# cut call is billed for can miss at most this much of its text more.
UNSEEN_BATCH_S = 0.1
# Tokens reserved for an aggregator's answer when the request does not say.
DEFAULT_ANSWER_RESERVE = 2048
# Room for the aggregation template itself around the references.
TEMPLATE_OVERHEAD_TOKENS = 512


def merge_params(params: GenerationParams, spec: ModelRef) -> GenerationParams:
    """The request's parameters, overridden by what the plan fixes for this call."""
    update: dict[str, object] = {}
    temperature = getattr(spec, "temperature", None)
    if temperature is not None:
        update["temperature"] = temperature
    max_tokens = getattr(spec, "max_tokens", None)
    if max_tokens is not None:
        update["max_tokens"] = max_tokens if params.max_tokens is None else min(max_tokens, params.max_tokens)
    if isinstance(spec, ProposerSpec) and spec.seed is not None:
        update["seed"] = spec.seed
    return params.model_copy(update=update) if update else params


def fit_references(
    config: MoAConfig,
    references: Sequence[str],
    ref: ModelRef,
    messages: Sequence[ChatMessage],
    params: GenerationParams,
    budget: int | None,
) -> tuple[list[str], list[str]]:
    """Trim references to the token budget of the model that reads them; returns (references, notes)."""
    if not references:
        return [], []
    if budget is None:
        known = ref.provider in config.providers
        window = config.price(ref.provider, ref.model).context_window if known else 128_000
        reserve = params.max_tokens or getattr(ref, "max_tokens", None) or DEFAULT_ANSWER_RESERVE
        overhead = approx_message_tokens(m.content for m in messages) + TEMPLATE_OVERHEAD_TOKENS
        budget = max(window - reserve - overhead, 64)
    trimmed = trim_references(references, budget)
    return trimmed.answers, [f"{ref}: {note}" for note in trimmed.notes]


def provider_kind(config: MoAConfig, provider: str) -> str:
    pcfg = config.providers.get(provider)
    return pcfg.kind.value if pcfg else "unknown"


def transport_failure(config: MoAConfig, req: CallRequest, exc: BaseException) -> CallResult:
    return CallResult(
        provider=req.provider,
        provider_kind=provider_kind(config, req.provider),
        requested_model=req.model,
        error=CallError(kind=ErrorKind.SERVER_ERROR, message=f"transport failure: {type(exc).__name__}"),
    )


def prompt_tokens(messages: Sequence[ChatMessage]) -> int:
    """A prompt's tokens, estimated, as a call cut before its provider reported them is billed."""
    return approx_message_tokens(m.content for m in messages)


def cut_result(
    config: MoAConfig,
    req: CallRequest | tuple[str, str, int],
    received: str,
    kind: ErrorKind,
    why: str,
    latency_s: float,
) -> CallResult:
    """A call that reached its provider and was cut before it reported its usage (by us: a
    straggler, a deadline, a cancelled layer; or by the client going away), billed as providers
    bill it: the prompt, read in full, plus what it generated, estimated by the text received.
    ``req`` is the request, or (provider, model, prompt tokens) where only those are known.

    The estimate can err low by the few tokens still in flight when the stream was closed (sent by
    the provider, never read); it never counts a token twice. The provider's own count is used
    wherever it arrives (a finished call's result), so only calls cut short are estimated."""
    if isinstance(req, CallRequest):
        provider, model, prompt = req.provider, req.model, prompt_tokens(req.messages)
    else:
        provider, model, prompt = req
    usage = Usage(input_tokens=prompt, output_tokens=approx_tokens(received))
    known = provider in config.providers
    cost = config.price(provider, model).cost(usage.input_tokens, usage.output_tokens) if known else 0.0
    return CallResult(
        provider=provider,
        provider_kind=provider_kind(config, provider),
        requested_model=model,
        text=received,
        usage=usage,
        cost_usd=cost,
        usage_estimated=True,
        latency_s=latency_s,
        streamed=True,
        error=CallError(kind=kind, message=why),
    )


def timeout_result(
    config: MoAConfig, req: CallRequest, why: str, latency_s: float, received: str = ""
) -> CallResult:
    """A call we stopped waiting for ourselves (its share of the request deadline ran out): billed
    for its prompt and whatever it sent (``cut_result``)."""
    return cut_result(config, req, received, ErrorKind.TIMEOUT, why, latency_s)


async def safe_call(caller: ModelCaller, config: MoAConfig, req: CallRequest) -> CallResult:
    """Call through the transport; a transport that raises (a dead replica, say) still yields a result."""
    try:
        return await caller.call(req)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return transport_failure(config, req, exc)


async def collect(
    caller: ModelCaller, config: MoAConfig, req: CallRequest, received: list[str]
) -> CallResult:
    """One call, streamed to its end: the text arrives in ``received`` as it is written, so a call
    cut before it answers is billed for what it generated (``cut_result``), not for nothing.

    Calls the engine may cut (proposers that turn stragglers, aggregators whose client leaves) are
    streamed for this reason even when the client's request is not: closing a stream also stops
    the provider generating (and billing), where a cut non-streamed call is often generated, and
    billed, in full."""
    async for ev in safe_stream(caller, config, req):
        if isinstance(ev, TextDelta):
            received.append(ev.text)
        else:
            return ev
    raise AssertionError("safe_stream always ends with a result")  # pragma: no cover


async def safe_stream(caller: ModelCaller, config: MoAConfig, req: CallRequest) -> AsyncIterator[StreamEvent]:
    """Stream through the transport; always ends with exactly one CallResult."""
    got_result = False
    try:
        async for ev in caller.stream(req):
            got_result = got_result or isinstance(ev, CallResult)
            yield ev
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if not got_result:
            yield transport_failure(config, req, exc)
        return
    if not got_result:
        yield transport_failure(config, req, RuntimeError("stream ended without a result"))
