"""Fusion: turning a layer's answers into one, by an aggregator model and its fallback chain.

It is a job description plus one function, so the engine can run it in-process and the Ray
aggregator deployment can run exactly the same code next to its handles.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Protocol

from pydantic import BaseModel, Field

from moa.config import MoAConfig
from moa.engine.caller import ModelCaller
from moa.engine.calls import fit_references, merge_params, safe_call, safe_stream
from moa.engine.plan import AggregatorSpec
from moa.engine.prompts import with_references
from moa.types import CallRequest, CallResult, ChatMessage, GenerationParams, TextDelta


class FuseJob(BaseModel):
    """Everything an aggregator needs, and nothing it does not (it crosses process boundaries)."""

    chain: tuple[AggregatorSpec, ...]
    messages: tuple[ChatMessage, ...]
    references: tuple[str, ...] = ()
    params: GenerationParams = GenerationParams()
    call_timeout_s: float = Field(gt=0)
    # Time left for the whole chain; None means no request deadline.
    deadline_s: float | None = None
    reference_budget_tokens: int | None = None
    stream: bool = False


class FuseStep(BaseModel):
    """One attempt of the chain: its result, when it started (seconds into the job), and notes."""

    result: CallResult
    started_s: float
    notes: list[str] = Field(default_factory=list)


FuseEvent = TextDelta | FuseStep


class Fuser(Protocol):
    def fuse(self, job: FuseJob) -> AsyncIterator[FuseEvent]: ...


async def fuse(job: FuseJob, caller: ModelCaller, config: MoAConfig) -> AsyncIterator[FuseEvent]:
    """Try each aggregator in turn: yield the answer's deltas (when streaming) and a step per attempt.

    Stops after the first success, after a streamed attempt that failed once text was sent (it
    cannot be retracted), or when the deadline has passed.
    """
    t0 = time.monotonic()
    for spec in job.chain:
        elapsed = time.monotonic() - t0
        timeout = job.call_timeout_s
        if job.deadline_s is not None:
            left = job.deadline_s - elapsed
            if left <= 0:
                return
            timeout = min(timeout, left)
        refs, notes = fit_references(
            config, job.references, spec, job.messages, job.params, job.reference_budget_tokens
        )
        req = CallRequest(
            provider=spec.provider,
            model=spec.model,
            messages=tuple(with_references(job.messages, refs, config.templates)),
            params=merge_params(job.params, spec),
            timeout_s=timeout,
        )
        res: CallResult | None = None
        emitted = False
        if job.stream:
            async for ev in safe_stream(caller, config, req):
                if isinstance(ev, TextDelta):
                    emitted = True
                    yield ev
                else:
                    res = ev
        else:
            res = await safe_call(caller, config, req)
        assert res is not None
        yield FuseStep(result=res, started_s=elapsed, notes=notes)
        if res.ok or emitted:
            return


class LocalFuser:
    """The in-process fuser: the same function, over whatever caller the engine uses."""

    def __init__(self, caller: ModelCaller, config: MoAConfig) -> None:
        self.caller = caller
        self.config = config

    def fuse(self, job: FuseJob) -> AsyncIterator[FuseEvent]:
        return fuse(job, self.caller, self.config)
