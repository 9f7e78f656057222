"""Answer chains: one fusion (or single-model answer) through a chain of models, recorded in the run.

Every stage that asks a chain of models for one answer goes through ``answer_chain``: the final
aggregators and the fallback chain, a refine round's synthesis, and each staircase step (the same
chain, continuing the answer so far for a few tokens). A staircase proposer of a later layer is a
chain of its one model, with its role prompt (``Writer``): its steps are the same calls.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from opentelemetry import trace

from moa.engine import spans
from moa.engine.calls import cut_result
from moa.engine.context import RunContext
from moa.engine.fusion import FuseJob, Fuser, FuseStart, LocalFuser
from moa.plan import AggregatorSpec, ModelRef, ProposerSpec
from moa.result import CallRecord, Stage
from moa.types import CallResult, ErrorKind, GenerationParams, TextDelta
from moa_observability.tracing import iterate_in, tracer


async def answer_chain(
    ctx: RunContext,
    chain: Sequence[ModelRef],
    stage: Stage,
    references: Sequence[str],
    *,
    stream: bool,
    params: GenerationParams | None = None,
    round_: int | None = None,
    later: int = 0,
    prefix: str = "",
    step: int | None = None,
    layer: int | None = None,
    role: str | None = None,
) -> AsyncGenerator[TextDelta | CallResult, None]:
    """Fuse (or, without references, simply answer) through ``chain``; record every attempt.

    Yields the answer's deltas and then the successful result; yields no result when the whole
    chain fails. A stream that breaks after text was sent is continued by the next model of the
    chain (see ``fuse``); text cannot be retracted, so a chain that fails after text went out
    ends the run rather than turning to the fallback chain. ``params`` overrides the run's (a
    staircase step's token limit); ``prefix`` is the answer's text already sent, which it continues.

    A proposer's chain (``Stage.PROPOSER``: a staircase proposer of layer ``layer``, with its
    ``role``) is one model of a layer, and the layer decides what its failure means: it runs where
    proposer calls run (the run's caller, not the aggregator deployment), stays off the run's
    critical path (the layer accounts for its proposers), yields its failed result too, and never
    ends the run.
    """
    ctx.deadline.check()
    plan = ctx.plan
    proposer = stage is Stage.PROPOSER
    fuser: Fuser = LocalFuser(ctx.caller, ctx.config) if proposer else ctx.fuser
    job = FuseJob(
        chain=tuple(_as_aggregator(ref) for ref in chain),
        messages=tuple(ctx.messages),
        references=tuple(references),
        params=params or ctx.params,
        call_timeout_s=plan.call_timeout_s,
        remaining_s=ctx.deadline.to_wire(),
        later=later,
        reference_budget_tokens=plan.reference_budget_tokens,
        stream=stream,
        prefix=prefix,
        role=role,
    )
    job_start = ctx.offset()
    emitted = False
    emitted_before = False  # whether text went out before the attempt being recorded
    failed: CallResult | None = None  # a proposer's last failed attempt
    # The attempt in flight (its model called, its step not back yet) and the text it sent: if the
    # chain is cut now (the client left, the run was cancelled), that call is billed as it stands.
    started: FuseStart | None = None
    here = ""
    span = tracer().start_span(
        "moa.fuse", attributes=spans.fuse_attributes(stage, len(references), round_, step)
    )
    events = iterate_in(trace.set_span_in_context(span), fuser.fuse(job))
    try:
        async for ev in events:
            if isinstance(ev, FuseStart):
                started, here = ev, ""
                continue
            if isinstance(ev, TextDelta):
                here += ev.text
                if stream:  # a chain whose client does not stream still streams, unseen
                    emitted = True
                    yield ev
                continue
            started = None
            res = ev.result
            ctx.note(*(f"{stage.value} {note}" for note in ev.notes))
            rec = CallRecord.from_result(
                res, stage=stage, started_s=job_start + ev.started_s, layer=layer, round=round_, role=role
            )
            rec.continued_after_chars = ev.continued_chars
            rec.staircase_step = step
            # An attempt after one that sent text took over its broken answer.
            rec.took_over = emitted_before
            emitted_before = emitted
            # References, an answer to continue, a step: a prompt the run built, not the client's.
            ctx.record(res, rec, built=bool(references) or bool(prefix) or rec.took_over or step is not None)
            if not proposer:
                ctx.add_provider_service(res.provider_service_s)
            name = f"{res.provider}/{res.requested_model}"
            if rec.took_over and ev.continued_chars is not None:
                ctx.note(f"{name} continued the answer after its first {ev.continued_chars} characters")
                spans.fuse_continued(span, name, ev.continued_chars, res.ok)
            if res.ok:
                spans.fuse_answered(span, name)
                yield res
                return
            if proposer:
                failed = res
            elif emitted:
                ctx.note(f"{name} failed mid-stream, after its text had gone out")
                spans.fuse_broken(span, name)
        spans.fuse_exhausted(span)
        if failed is not None:
            yield failed  # a proposer's failure: its layer counts it
            return
        if emitted:
            ctx.raise_failed()  # text is out: no fallback can take it back
        ctx.deadline.check()
    finally:
        await events.aclose()
        if started is not None:
            _bill_cut(ctx, started, here, stage, job_start, step, layer, round_, role)
        span.end()


def _bill_cut(
    ctx: RunContext,
    started: FuseStart,
    text: str,
    stage: Stage,
    job_start: float,
    step: int | None,
    layer: int | None,
    round_: int | None,
    role: str | None,
) -> None:
    """Record an attempt cut before its step came back, at what its provider bills for it (its
    prompt and the text it sent). Its failure is not one of the run's: the run itself was cut."""
    res = cut_result(
        ctx.config,
        (started.provider, started.model, started.prompt_tokens),
        text,
        ErrorKind.CANCELLED,
        "cancelled: the request ended first",
        ctx.offset() - job_start,
        started.call_id,
    )
    rec = CallRecord.from_result(res, stage=stage, started_s=job_start, layer=layer, round=round_, role=role)
    rec.staircase_step = step
    ctx.records.append(rec)
    if ctx.on_call is not None:
        ctx.on_call(rec)


async def synthesise(ctx: RunContext, references: list[str], *, round_: int) -> str | None:
    """An intermediate synthesis (between refine rounds), with the aggregator fallback chain."""
    final: CallResult | None = None
    chain = answer_chain(ctx, ctx.plan.aggregators, Stage.AGGREGATOR, references, stream=False, round_=round_)
    async with aclosing(chain):
        async for ev in chain:
            if isinstance(ev, CallResult):
                final = ev
    return final.text if final is not None else None


@dataclass(frozen=True)
class Writer:
    """Who writes a staircase's answer in steps: the final aggregators (their chain), or one
    proposer of a later layer (a chain of its one model, with its layer and role prompt)."""

    chain: Sequence[ModelRef]
    stage: Stage
    layer: int | None = None
    role: str | None = None


async def staircase_step(
    ctx: RunContext, writer: Writer, references: list[str], answer: str, step: int
) -> AsyncGenerator[TextDelta | CallResult, None]:
    """One intermediate staircase step: ``writer``'s answer so far, continued for a few tokens
    from the answers it reads up to the step's boundary. Yields the deltas, then the step's
    result (an aggregator step that failed yields none; a proposer's yields its failure)."""
    limit = ctx.plan.staircase_step_tokens
    params = ctx.params.model_copy(update={"max_tokens": min(limit, ctx.params.max_tokens or limit)})
    chain = answer_chain(
        ctx,
        writer.chain,
        writer.stage,
        references,
        stream=True,
        params=params,
        prefix=answer,
        step=step,
        layer=writer.layer,
        role=writer.role,
    )
    async with aclosing(chain):
        async for ev in chain:
            yield ev


def _as_aggregator(ref: ModelRef) -> AggregatorSpec | ProposerSpec:
    """The spec a fusion job calls with: a proposer keeps its own (temperature, seed, limit)."""
    if isinstance(ref, AggregatorSpec | ProposerSpec):
        return ref
    return AggregatorSpec(provider=ref.provider, model=ref.model)
