"""Small pieces shared by every stage that calls a model: parameter merging, reference budgets,
and calling through a transport that might raise instead of failing cleanly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from moa.caller import ModelCaller
from moa.config import MoAConfig
from moa.engine.prompts import trim_references
from moa.errors import ContextWindowExceeded
from moa.plan import ModelRef, ProposerSpec
from moa.providers.consumption import prompt_read
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
    prompt_texts,
)

# How long the transport may hold the text of a call nobody reads as it comes (a proposer's, an
# aggregator's whose client does not stream): streamed only so that a cut call is billed for
# what it wrote, in a few batches rather than a message per token (CallRequest.batch_s). What a
# cut call is billed for can miss at most this much of its text more.
UNSEEN_BATCH_S = 0.1
# Tokens reserved for an aggregator's answer when the request does not say.
DEFAULT_ANSWER_RESERVE = 2048
# Room for the aggregation template itself around the references (the cost projection's bound).
TEMPLATE_OVERHEAD_TOKENS = 512
# Tokens each rendered reference costs beyond its text (its tags and separators), when fitting.
REFERENCE_TAG_TOKENS = 16
# The least the references get however small the window: below it they say nothing useful.
MIN_REFERENCE_BUDGET = 64


class LearnedWindows:
    """Context windows the providers told this process of, by (provider, model): the window a
    server said it serves (its model listing) or named when it refused a prompt as too long.

    Per process, as ``ProviderClient`` keeps the parameters a model refused: on Ray the provider
    replica hears it, the failure (``CallError.context_window``) or result carries it to the
    ingress, and each process that fits references (the ingress, the aggregator deployment) keeps
    its own copy here. Only ever lowered: the smallest window heard is the one that holds."""

    def __init__(self) -> None:
        self._windows: dict[tuple[str, str], int] = {}

    def get(self, provider: str, model: str) -> int | None:
        return self._windows.get((provider, model))

    def learn(self, provider: str, model: str, window: int | None) -> bool:
        """Remember ``window``; True when it is news (smaller than what was known)."""
        if window is None or window <= 0:
            return False
        known = self._windows.get((provider, model))
        if known is not None and known <= window:
            return False
        self._windows[(provider, model)] = window
        return True

    def learn_from(self, res: CallResult) -> bool:
        """Whatever ``res`` says of its model's window (a listing, or a refusal naming it)."""
        told = res.error.context_window if res.error is not None else None
        return self.learn(res.provider, res.requested_model, told or res.context_window)

    def clear(self) -> None:
        self._windows.clear()


WINDOWS = LearnedWindows()


def context_window(config: MoAConfig, ref: ModelRef) -> int:
    """The window to fit a call to ``ref`` into: what its server said, else what the config
    declares (a self-hosted server may serve less than declared: llama.cpp shares its context
    among its slots), else 128,000."""
    known = ref.provider in config.providers
    declared = config.price(ref.provider, ref.model).context_window if known else 128_000
    learned = WINDOWS.get(ref.provider, ref.model)
    return min(declared, learned) if learned is not None else declared


def check_window(
    config: MoAConfig,
    answering: Sequence[ModelRef],
    messages: Sequence[ChatMessage],
    params: GenerationParams,
) -> None:
    """Refuse (``ContextWindowExceeded``, a 400 naming the numbers) a request whose messages, with
    the answer it asks for (its ``max_tokens``, else one token), fit the window of none of the
    models that could answer it: nothing the service can trim, no model of the chain to turn to."""
    if not answering:
        return
    prompt = approx_message_tokens(prompt_texts(messages))
    answer = params.max_tokens or 1
    windows = {str(ref): context_window(config, ref) for ref in answering}
    best = max(windows, key=lambda name: windows[name])
    if prompt + answer > windows[best]:
        raise ContextWindowExceeded(
            f"the request needs about {prompt + answer} tokens ({prompt} in the messages, {answer} "
            f"for the answer) but the largest context window of the models that would answer it "
            f"is {windows[best]} tokens ({best}): shorten the messages or lower max_tokens"
        )


def template_tokens(config: MoAConfig, references: int) -> int:
    """What the aggregation template adds around ``references`` references (estimated, a bound)."""
    template = config.templates.aggregate_system.replace("{references}", "")
    return approx_tokens(template) + REFERENCE_TAG_TOKENS * references


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


def fit_call(
    config: MoAConfig,
    references: Sequence[str],
    ref: ModelRef,
    messages: Sequence[ChatMessage],
    params: GenerationParams,
    budget: int | None,
) -> tuple[list[str], list[str], int | None]:
    """Fit a call that reads ``references`` into its model's window (``context_window``): returns
    the references trimmed to their budget, a note per change, and the ``max_tokens`` the call
    must send (None: as asked).

    Without ``reference_budget_tokens`` the window is shared: the client's messages and the
    template first, then the answer's reservation (the request's ``max_tokens``, else the plan's,
    else ``DEFAULT_ANSWER_RESERVE``), then the references. When nobody set ``max_tokens`` the
    reservation is capped at half of what the messages leave, so the references keep a useful
    share (a 2,048-token reservation in a 1,024-token window left them the 64-token floor), and
    the cap is sent as ``max_tokens``: a server that has no room for more would otherwise fill
    its window and stop mid-answer, or refuse the prompt for the answer it might write."""
    if not references:
        return [], [], None
    cap: int | None = None
    notes: list[str] = []
    if budget is None:
        window = context_window(config, ref)
        overhead = approx_message_tokens(prompt_texts(messages)) + template_tokens(config, len(references))
        left = max(window - overhead, 0)
        asked = params.max_tokens or getattr(ref, "max_tokens", None)
        reserve = asked or DEFAULT_ANSWER_RESERVE
        if asked is None and reserve > left // 2:
            reserve = cap = max(left // 2, 1)
            why = f"to leave the references half of its {window}-token window"
            notes.append(f"{ref}: answer capped at {cap} tokens {why}")
        budget = max(left - reserve, MIN_REFERENCE_BUDGET)
    trimmed = trim_references(references, budget)
    return trimmed.answers, notes + [f"{ref}: {note}" for note in trimmed.notes], cap


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


def cut_result(  # seven: the call as known (request or its parts), and how and when it was cut
    config: MoAConfig,
    req: CallRequest | tuple[str, str, int],
    received: str,
    kind: ErrorKind,
    why: str,
    latency_s: float,
    call_id: str | None = None,
) -> CallResult:
    """A call that reached its provider and was cut before it reported its usage (by us: a
    straggler, a deadline, a cancelled layer; or by the client going away), billed as providers
    bill it: the prompt, read in full, plus what it generated, estimated by the text received.
    ``req`` is the request, or (provider, model, prompt tokens) where only those are known, with
    the request's ``call_id`` when it is known.

    The text received misses the tokens still in flight when the stream was closed (sent by the
    provider, never read here): the provider's ``cut_margin_tokens`` are added for them, so the
    estimate errs high, by at most that margin, rather than low. The provider's own count is
    used wherever it arrives (a finished call's result), so only calls cut short are estimated;
    and the result names the call (``cut_id``), so that a transport which saw more of its text (a
    provider replica on Ray) can have the ledger charge that instead (``moa.engine.receipts``)."""
    if isinstance(req, CallRequest):
        provider, model = req.provider, req.model
        prompt = prompt_read(req, provider_kind(config, req.provider))
        call_id = req.call_id
    else:
        provider, model, prompt = req
    pcfg = config.providers.get(provider)
    margin = pcfg.cut_margin_tokens if pcfg is not None else 0
    usage = Usage(input_tokens=prompt, output_tokens=approx_tokens(received) + margin)
    cost = config.price(provider, model).cost(usage.input_tokens, usage.output_tokens) if pcfg else 0.0
    return CallResult(
        provider=provider,
        provider_kind=provider_kind(config, provider),
        requested_model=model,
        text=received,
        usage=usage,
        cost_usd=cost,
        usage_estimated=True,
        cut_id=call_id,
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
