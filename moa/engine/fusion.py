"""Fusion: turning a layer's answers into one, by an aggregator model and its fallback chain.

It is a job description plus one function, so the engine can run it in-process and the Ray
aggregator deployment can run exactly the same code next to its handles.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Protocol

from pydantic import BaseModel, Field

from moa.caller import ModelCaller
from moa.config import MoAConfig
from moa.deadline import Deadline
from moa.engine.calls import (
    UNSEEN_BATCH_S,
    WINDOWS,
    fit_call,
    merge_params,
    provider_kind,
    safe_stream,
    timeout_result,
)
from moa.engine.continuation import LeadingTrim, continuation
from moa.engine.contract import Contract
from moa.engine.prompts import extend_system, with_references
from moa.engine.structured import instruction
from moa.engine.toolcalls import MAX_VIOLATIONS
from moa.plan import AggregatorSpec, ProposerSpec
from moa.providers.consumption import prompt_read
from moa.types import (
    CallRequest,
    CallResult,
    ChatMessage,
    GenerationParams,
    ResponseFormat,
    StreamEvent,
    TextDelta,
    ToolSet,
)


class FuseJob(BaseModel):
    """Everything an aggregator needs, and nothing it does not (it crosses process boundaries)."""

    # The models tried in order: aggregators, or one staircase proposer (its temperature and seed).
    chain: tuple[AggregatorSpec | ProposerSpec, ...]
    messages: tuple[ChatMessage, ...]
    references: tuple[str, ...] = ()
    params: GenerationParams = GenerationParams()
    call_timeout_s: float = Field(gt=0)
    # The request deadline as it crosses to the aggregator deployment: the seconds it had left when
    # the job was made (``Deadline.to_wire``); None means no request deadline. See ``deadline``.
    remaining_s: float | None = None
    # Models the run may still try after this chain (the fallback chain): they get their share too.
    later: int = Field(default=0, ge=0)
    reference_budget_tokens: int | None = None
    stream: bool = False
    # The answer's text already sent (a staircase step continues it): the chain continues it too.
    prefix: str = ""
    # The role prompt of the proposer this job is (a staircase proposer's step); None for aggregators.
    role: str | None = None
    # The request's tools: every model of the chain may call them, and an answer that breaks their
    # contract (``moa.engine.toolcalls.check``) goes on to the next model with the violations.
    tools: ToolSet | None = None
    # The request is background work (a batch's): so is every call of the chain (``CallRequest``).
    background: bool = False
    # The answer's format (``moa.engine.structured``): every model of the chain is asked for it,
    # and an answer that is not such a document goes on to the next model with the violations.
    response_format: ResponseFormat | None = None

    @property
    def contract(self) -> Contract:
        return Contract(self.tools, self.response_format)

    def deadline(self) -> Deadline:
        """The request deadline, rebuilt on this side of the process boundary."""
        return Deadline.after(self.remaining_s)


class FuseStep(BaseModel):
    """One attempt of the chain: its result, when it started (seconds into the job), and notes."""

    result: CallResult
    started_s: float
    notes: list[str] = Field(default_factory=list)
    # This attempt continued an answer an earlier attempt had partly streamed: its length so far.
    continued_chars: int | None = None


class FuseStart(BaseModel):
    """An attempt of the chain is about to call its model: who, and how long its prompt is (in
    estimated tokens), so that the consumer can bill the attempt if it is cut before its step."""

    provider: str
    model: str
    prompt_tokens: int
    # The attempt's ``CallRequest.call_id``: a cut attempt's receipt comes under it.
    call_id: str | None = None


FuseEvent = TextDelta | FuseStart | FuseStep


class Fuser(Protocol):
    def fuse(self, job: FuseJob) -> AsyncIterator[FuseEvent]: ...


async def fuse(job: FuseJob, caller: ModelCaller, config: MoAConfig) -> AsyncIterator[FuseEvent]:
    """Try each aggregator in turn: yield the answer's deltas (when streaming) and a step per attempt.

    Stops after the first success, or when the deadline has passed. A streamed attempt that breaks
    after text went out is continued by the next aggregator from exactly where the text stopped
    (``moa.engine.continuation``), so the client gets one answer; the successful step's text is
    then the whole answer. Under a deadline, each model still to be tried (here and in
    ``job.later``) gets an equal share of the time left, so one that hangs cannot eat the time of
    the ones after it: a whole call's share when not streaming, the share for its first token when
    streaming (after which it may use all the time left).
    """
    t0 = time.monotonic()
    deadline = job.deadline()
    sent = job.prefix  # the answer's text already out: earlier steps, attempts that broke mid-stream
    attempts = [(index, spec) for index, spec in enumerate(job.chain)]
    refitted: set[int] = set()  # the models already called again after naming a smaller window
    rejected: list[str] = []  # why the chain's last answer broke the contract, for the next model
    while attempts:
        index, spec = attempts.pop(0)
        elapsed = time.monotonic() - t0
        if deadline.expired:
            return
        timeout, share = _timeout(job, deadline, index)
        req, trim, refs, notes = _request(job, config, spec, sent, timeout, rejected)
        yield FuseStart(
            provider=spec.provider,
            model=spec.model,
            prompt_tokens=prompt_read(req, provider_kind(config, spec.provider)),
            call_id=req.call_id,
        )
        # Every attempt streams, seen by the client or not: a cut stream stops its provider and
        # leaves the text it wrote to bill (``FuseStart``); only a visible one (``job.stream``) is
        # continued by the next model when it breaks, and waits only a share for its first token.
        first_wait = None if share is None or not job.stream else min(share, timeout)
        res: CallResult | None = None
        prefix, here = sent, ""
        async with aclosing(_attempt(caller, config, req, trim, first_wait, t0 + elapsed)) as events:
            async for ev in events:
                if isinstance(ev, TextDelta):
                    here += ev.text
                    yield ev
                else:
                    res = ev
        assert res is not None
        if res.ok and prefix:
            res = res.model_copy(update={"text": prefix + here})
        if res.ok and job.contract.binding:
            res = _checked(res, job.contract, rejected, notes)
        window = res.error.context_window if res.error is not None else None
        if WINDOWS.learn(spec.provider, spec.model, window) and not here and index not in refitted and refs:
            # The model refused the prompt as too long and named its real window: the same model
            # is called again at once with the references fitted to it (once: the window is only
            # ever lowered, so a second refusal goes down the chain as any failure does).
            refitted.add(index)
            attempts.insert(0, (index, spec))
            notes.append(f"{spec}: refused the prompt for its {window}-token window; references fitted to it")
        yield FuseStep(result=res, started_s=elapsed, notes=notes, continued_chars=len(prefix) or None)
        if res.ok:
            return
        if job.stream:
            sent = prefix + here


def _timeout(job: FuseJob, deadline: Deadline, index: int) -> tuple[float, float | None]:
    """The timeout of the chain's ``index``-th model, and its share of the deadline (None: no
    deadline, or no model after it to share with)."""
    timeout = job.call_timeout_s
    if deadline.at is None:
        return timeout, None
    left = deadline.remaining()
    still = len(job.chain) - index + job.later
    share = left / still if still > 1 else None
    return min(timeout, left if job.stream or share is None else share), share


def _checked(res: CallResult, contract: Contract, rejected: list[str], notes: list[str]) -> CallResult:
    """``res`` if it keeps the contract (a document made bare); else the failure it is
    (``INVALID_OUTPUT``: never held against its provider's health), what the next model is told of
    it kept in ``rejected``."""
    verdict = contract.check(res)
    if verdict.ok:
        return verdict.result
    rejected[:] = [verdict.correction()]
    name = f"{res.provider}/{res.requested_model}"
    notes.append(f"{name}: answer rejected: {'; '.join(verdict.violations[:MAX_VIOLATIONS])}")
    return verdict.rejected()


def _request(  # six: the job, its model, and what the chain has done so far
    job: FuseJob,
    config: MoAConfig,
    spec: AggregatorSpec | ProposerSpec,
    sent: str,
    timeout: float,
    rejected: list[str] | None = None,
) -> tuple[CallRequest, LeadingTrim, list[str], list[str]]:
    """One attempt's request: the references fitted to its model's window, continuing ``sent`` (the
    answer's text already out) when there is any, told why the chain's last answer was rejected
    (``rejected``) if it was; with how to trim its answer's start, the references it reads and a
    note per change made to fit them."""
    refs, notes, cap = fit_call(
        config, job.references, spec, job.messages, job.params, job.reference_budget_tokens
    )
    params = merge_params(job.params, spec)
    if cap is not None and params.max_tokens is None:
        params = params.model_copy(update={"max_tokens": cap})
    messages = with_references(job.messages, refs, config.templates, role=job.role)
    if job.response_format is not None:
        messages = extend_system(messages, instruction(job.response_format))
    if rejected:
        messages = extend_system(messages, rejected[0])
    trim = LeadingTrim(False)
    if sent:
        cont = continuation(messages, sent, provider_kind(config, spec.provider), config.templates)
        messages, trim = cont.messages, LeadingTrim(cont.trim_leading)
    req = CallRequest(
        provider=spec.provider,
        model=spec.model,
        messages=tuple(messages),
        params=params,
        timeout_s=timeout,
        batch_s=None if job.stream else UNSEEN_BATCH_S,
        tools=job.tools,
        background=job.background,
        response_format=job.response_format,
    )
    return req, trim, refs, notes


async def _attempt(  # six: the attempt's request and how to read its stream
    caller: ModelCaller,
    config: MoAConfig,
    req: CallRequest,
    trim: LeadingTrim,
    first_wait: float | None,
    since: float,
) -> AsyncGenerator[TextDelta | CallResult, None]:
    """One model's attempt, streamed: its deltas (their leading whitespace ``trim``med), then its
    result. A first token that does not come within ``first_wait`` seconds ends it as a timeout,
    billed for its prompt and whatever it sent (``since``: when the attempt started)."""
    events = aiter(safe_stream(caller, config, req))
    res: CallResult | None = None
    here = ""
    try:
        ev: StreamEvent | None = await _first(events, first_wait)
        while ev is not None:
            if isinstance(ev, TextDelta):
                text = trim(ev.text)
                if text:
                    here += text
                    yield TextDelta(text=text)
            else:
                res = ev
            ev = await anext(events, None)
    except TimeoutError:
        why = f"no first token within its {first_wait:.1f}s share of the deadline; trying the next"
        res = timeout_result(config, req, why, time.monotonic() - since, here)
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    assert res is not None
    yield res


async def _first(events: AsyncIterator[StreamEvent], within: float | None) -> StreamEvent | None:
    """The stream's first event, waiting at most ``within`` seconds (TimeoutError past it)."""
    if within is None:
        return await anext(events, None)
    async with asyncio.timeout(within):
        return await anext(events, None)


class LocalFuser:
    """The in-process fuser: the same function, over whatever caller the engine uses."""

    def __init__(self, caller: ModelCaller, config: MoAConfig) -> None:
        self.caller = caller
        self.config = config

    def fuse(self, job: FuseJob) -> AsyncIterator[FuseEvent]:
        return fuse(job, self.caller, self.config)
