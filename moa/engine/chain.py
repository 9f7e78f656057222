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
from opentelemetry.trace import Span

from moa.engine import spans
from moa.engine.calls import cut_result
from moa.engine.context import RunContext
from moa.engine.fusion import FuseJob, Fuser, FuseStart, FuseStep, LocalFuser
from moa.errors import DOCUMENT_REJECTED
from moa.plan import AggregatorSpec, ModelRef, ProposerSpec
from moa.result import CallRecord, Stage
from moa.types import CallResult, ErrorKind, GenerationParams, TextDelta
from moa_observability.tracing import iterate_in, tracer


@dataclass(frozen=True)
class Writer:
    """Who writes an answer through a chain, and what its records say of them: the final
    aggregators or the fallback chain (their chain), a refine round's synthesis (its ``round``), or
    one proposer of a later staircase layer (a chain of its one model, with its ``layer`` and
    ``role`` prompt)."""

    chain: Sequence[ModelRef]
    stage: Stage
    layer: int | None = None
    round: int | None = None
    role: str | None = None


@dataclass(frozen=True)
class Part:
    """Which part of the answer a chain writes: what follows ``prefix`` (the answer's text already
    sent, which it continues), as staircase step ``step`` (None: to the end), under ``params`` (a
    step's token limit; None: the run's)."""

    prefix: str = ""
    step: int | None = None
    params: GenerationParams | None = None


WHOLE = Part()


async def answer_chain(
    ctx: RunContext,
    writer: Writer,
    references: Sequence[str],
    *,
    stream: bool,
    later: int = 0,
    part: Part = WHOLE,
) -> AsyncGenerator[TextDelta | CallResult, None]:
    """Fuse (or, without references, simply answer) through ``writer``'s chain; record every attempt.

    Yields the answer's deltas and then the successful result; yields no result when the whole
    chain fails. A stream that breaks after text was sent is continued by the next model of the
    chain (see ``fuse``); text cannot be retracted, so a chain that fails after text went out
    ends the run rather than turning to the fallback chain. ``later`` counts the models the run
    may still try after this chain (they get their share of the deadline).

    A proposer's chain (``Stage.PROPOSER``: a staircase proposer of a later layer) is one model of
    a layer, and the layer decides what its failure means: it runs where proposer calls run (the
    run's caller, not the aggregator deployment), stays off the run's critical path (the layer
    accounts for its proposers), yields its failed result too, and never ends the run.
    """
    ctx.deadline.check()
    proposer = writer.stage is Stage.PROPOSER
    fuser: Fuser = LocalFuser(ctx.caller, ctx.config) if proposer else ctx.fuser
    job = _job(ctx, writer, references, stream, later, part)
    # References, an answer to continue, a step: a prompt the run built, not the client's.
    attempts = _Attempts(ctx, writer, part, built=bool(references) or bool(part.prefix))
    attrs = spans.fuse_attributes(writer.stage, len(references), writer.round, part.step)
    span = tracer().start_span("moa.fuse", attributes=attrs)
    events = iterate_in(trace.set_span_in_context(span), fuser.fuse(job))
    try:
        async for ev in events:
            if isinstance(ev, FuseStart):
                attempts.started, attempts.here = ev, ""
            elif isinstance(ev, TextDelta):
                attempts.here += ev.text
                if stream:  # a chain whose client does not stream still streams, unseen
                    attempts.emitted = True
                    yield ev
            elif (res := attempts.ended(ev, span)).ok:
                yield res
                return
        spans.fuse_exhausted(span)
        if attempts.failed is not None:
            yield attempts.failed  # a proposer's failure: its layer counts it
            return
        if attempts.emitted:
            ctx.raise_failed()  # text is out: no fallback can take it back
        ctx.deadline.check()
    finally:
        await events.aclose()
        attempts.bill_cut()
        span.end()


def _job(
    ctx: RunContext, writer: Writer, references: Sequence[str], stream: bool, later: int, part: Part
) -> FuseJob:
    """What the fuser is asked: ``writer``'s chain over ``references``, under the run's deadline."""
    plan = ctx.plan
    return FuseJob(
        chain=tuple(_as_aggregator(ref) for ref in writer.chain),
        messages=tuple(ctx.messages),
        references=tuple(references),
        params=part.params or ctx.params,
        call_timeout_s=plan.call_timeout_s,
        remaining_s=ctx.deadline.to_wire(),
        later=later,
        reference_budget_tokens=plan.reference_budget_tokens,
        stream=stream,
        prefix=part.prefix,
        role=writer.role,
        tools=ctx.tools,
        # The answer's format binds the chains that write the final answer, not a refine round's
        # synthesis (the next round's proposers read it) nor a staircase proposer's steps.
        response_format=ctx.response_format
        if writer.round is None and writer.stage is not Stage.PROPOSER
        else None,
    )


class _Attempts:
    """One chain's attempts as the run records them: each as it ends, and the one in flight (its
    model called, its step not back yet) billed as it stands if the chain is cut (the client left,
    the run was cancelled)."""

    def __init__(self, ctx: RunContext, writer: Writer, part: Part, *, built: bool) -> None:
        self.ctx, self.writer, self.part, self.built = ctx, writer, part, built
        self.start_s = ctx.offset()
        self.emitted = False
        self.emitted_before = False  # whether text went out before the attempt being recorded
        self.failed: CallResult | None = None  # a proposer's last failed attempt
        self.started: FuseStart | None = None
        self.here = ""  # the text the attempt in flight sent

    def _record(self, res: CallResult, started_s: float) -> CallRecord:
        w = self.writer
        rec = CallRecord.from_result(
            res, stage=w.stage, started_s=started_s, layer=w.layer, round=w.round, role=w.role
        )
        rec.staircase_step = self.part.step
        rec.choice = self.ctx.choice
        return rec

    def ended(self, ev: FuseStep, span: Span) -> CallResult:
        """Record the attempt ``ev`` reports, and say on ``span`` what it did."""
        ctx, stage = self.ctx, self.writer.stage
        self.started = None
        res = ev.result
        ctx.note(*(f"{stage.value} {note}" for note in ev.notes))
        rec = self._record(res, self.start_s + ev.started_s)
        rec.continued_after_chars = ev.continued_chars
        # An attempt after one that sent text took over its broken answer.
        rec.took_over = self.emitted_before
        self.emitted_before = self.emitted
        ctx.record(res, rec, built=self.built or rec.took_over or self.part.step is not None)
        if stage is not Stage.PROPOSER:
            ctx.add_provider_service(res.provider_service_s)
        name = f"{res.provider}/{res.requested_model}"
        if rec.took_over and ev.continued_chars is not None:
            ctx.note(f"{name} continued the answer after its first {ev.continued_chars} characters")
            spans.fuse_continued(span, name, ev.continued_chars, res.ok)
        if res.ok:
            spans.fuse_answered(span, name)
        elif res.error is not None and res.error.kind is ErrorKind.INVALID_OUTPUT:
            document = res.error.message.startswith(DOCUMENT_REJECTED)
            spans.fuse_rejected(span, name, res.error.message, calls=not document)
        elif stage is Stage.PROPOSER:
            self.failed = res
        elif self.emitted:
            ctx.note(f"{name} failed mid-stream, after its text had gone out")
            spans.fuse_broken(span, name)
        return res

    def bill_cut(self) -> None:
        """Record the attempt in flight, if any, at what its provider bills for it (its prompt and
        the text it sent). Its failure is not one of the run's: the run itself was cut."""
        started, ctx = self.started, self.ctx
        if started is None:
            return
        res = cut_result(
            ctx.config,
            (started.provider, started.model, started.prompt_tokens),
            self.here,
            ErrorKind.CANCELLED,
            "cancelled: the request ended first",
            ctx.offset() - self.start_s,
            started.call_id,
        )
        rec = self._record(res, self.start_s)
        ctx.records.append(rec)
        if ctx.on_call is not None:
            ctx.on_call(rec)


async def synthesise(ctx: RunContext, references: list[str], *, round_: int) -> str | None:
    """An intermediate synthesis (between refine rounds), with the aggregator fallback chain."""
    final: CallResult | None = None
    writer = Writer(chain=ctx.plan.aggregators, stage=Stage.AGGREGATOR, round=round_)
    chain = answer_chain(ctx, writer, references, stream=False)
    async with aclosing(chain):
        async for ev in chain:
            if isinstance(ev, CallResult):
                final = ev
    return final.text if final is not None else None


async def staircase_step(
    ctx: RunContext, writer: Writer, references: list[str], answer: str, step: int
) -> AsyncGenerator[TextDelta | CallResult, None]:
    """One intermediate staircase step: ``writer``'s answer so far, continued for a few tokens
    from the answers it reads up to the step's boundary. Yields the deltas, then the step's
    result (an aggregator step that failed yields none; a proposer's yields its failure)."""
    limit = ctx.plan.staircase_step_tokens
    params = ctx.params.model_copy(update={"max_tokens": min(limit, ctx.params.max_tokens or limit)})
    part = Part(prefix=answer, step=step, params=params)
    chain = answer_chain(ctx, writer, references, stream=True, part=part)
    async with aclosing(chain):
        async for ev in chain:
            yield ev


def _as_aggregator(ref: ModelRef) -> AggregatorSpec | ProposerSpec:
    """The spec a fusion job calls with: a proposer keeps its own (temperature, seed, limit)."""
    if isinstance(ref, AggregatorSpec | ProposerSpec):
        return ref
    return AggregatorSpec(provider=ref.provider, model=ref.model)
